//! The recipe language: one Dockerfile-like instruction a line, and the health check.
//!
//! ```text
//! RUN [--timeout=<duration>] <shell command>   sh -c, in WORKDIR, with ENV, as USER
//! START <shell command>                        a background process that keeps running
//! ENV <KEY>=<value>                            $VAR and ${VAR} expanded when it runs
//! WORKDIR <path>                               created when missing
//! USER <name>                                  created (passwordless sudo) when missing
//! COPY <src>... <dst>                          from the build's uploaded archive
//! ```
//! Blank lines and lines starting with `#` are skipped. Anything else is an error naming the
//! line. Parsing is pure: what a line means in the guest is the runner's business.

use std::time::Duration;

/// Longest recipe, in lines (blank and comment lines included).
pub const MAX_LINES: usize = 1000;
/// Longest recipe line.
pub const MAX_LINE_BYTES: usize = 16 * 1024;
/// A `RUN` without `--timeout`.
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// The longest `--timeout` a step may ask for.
pub const MAX_RUN_TIMEOUT: Duration = Duration::from_secs(2 * 3600);

/// One recipe instruction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Instruction {
    Run { cmd: String, timeout: Duration },
    Start { cmd: String },
    Env { key: String, value: String },
    Workdir { path: String },
    User { name: String },
    Copy { sources: Vec<String>, dest: String },
}

/// An instruction and the recipe line (1-based) it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub line: usize,
    pub text: String,
    pub instruction: Instruction,
}

impl Step {
    /// Does this step need files from the build's archive?
    pub fn copies(&self) -> bool {
        matches!(self.instruction, Instruction::Copy { .. })
    }
}

/// When and how the finished build is judged healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Healthcheck {
    pub cmd: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub start_period: Duration,
    /// Failed checks allowed after the start period; 0 means no limit (the build's own
    /// deadline still applies).
    pub retries: u32,
}

/// A recipe that cannot be run, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipeError {
    /// 1-based line of the recipe; 0 for the recipe as a whole.
    pub line: usize,
    pub message: String,
}

impl std::fmt::Display for RecipeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            0 => write!(f, "recipe: {}", self.message),
            n => write!(f, "recipe line {n}: {}", self.message),
        }
    }
}

fn err(line: usize, message: impl Into<String>) -> RecipeError {
    RecipeError {
        line,
        message: message.into(),
    }
}

/// Parses a whole recipe. At least one instruction is required.
pub fn parse(lines: &[String]) -> Result<Vec<Step>, RecipeError> {
    if lines.len() > MAX_LINES {
        return Err(err(0, format!("at most {MAX_LINES} lines")));
    }
    let mut steps = Vec::new();
    for (i, raw) in lines.iter().enumerate() {
        let n = i + 1;
        if raw.len() > MAX_LINE_BYTES {
            return Err(err(n, format!("longer than {MAX_LINE_BYTES} bytes")));
        }
        if raw.contains('\0') || raw.contains('\n') || raw.contains('\r') {
            return Err(err(n, "contains a NUL or a line break"));
        }
        let text = raw.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        let instruction = parse_line(text).map_err(|m| err(n, m))?;
        steps.push(Step {
            line: n,
            text: text.to_string(),
            instruction,
        });
    }
    if steps.is_empty() {
        return Err(err(0, "needs at least one instruction"));
    }
    Ok(steps)
}

fn parse_line(text: &str) -> Result<Instruction, String> {
    let (word, rest) = match text.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r.trim()),
        None => (text, ""),
    };
    let need = |what: &str| -> Result<(), String> {
        if rest.is_empty() {
            Err(format!("{word} needs {what}"))
        } else {
            Ok(())
        }
    };
    match word.to_ascii_uppercase().as_str() {
        "RUN" => {
            let (opts, cmd) = split_options(rest, &["timeout"])?;
            if cmd.is_empty() {
                return Err("RUN needs a command".into());
            }
            let timeout = match opts.first() {
                Some((_, v)) => {
                    let t = parse_duration(v)?;
                    if t.is_zero() || t > MAX_RUN_TIMEOUT {
                        return Err(format!(
                            "--timeout must be between 1s and {}",
                            humantime::format_duration(MAX_RUN_TIMEOUT)
                        ));
                    }
                    t
                }
                None => DEFAULT_RUN_TIMEOUT,
            };
            Ok(Instruction::Run {
                cmd: cmd.to_string(),
                timeout,
            })
        }
        "START" => {
            need("a command")?;
            Ok(Instruction::Start {
                cmd: rest.to_string(),
            })
        }
        "ENV" => {
            need("KEY=value")?;
            let (key, value) = rest
                .split_once('=')
                .ok_or_else(|| format!("ENV needs KEY=value, got {rest:?}"))?;
            let key = key.trim();
            if !valid_env_key(key) {
                return Err(format!(
                    "ENV key {key:?} must be letters, digits and '_', not starting with a digit"
                ));
            }
            Ok(Instruction::Env {
                key: key.to_string(),
                value: unquote(value.trim()),
            })
        }
        "WORKDIR" => {
            need("a path")?;
            let path = unquote(rest);
            if !path.starts_with('/') {
                return Err(format!("WORKDIR must be an absolute path, got {path:?}"));
            }
            Ok(Instruction::Workdir { path })
        }
        "USER" => {
            need("a user name")?;
            if !valid_user_name(rest) {
                return Err(format!(
                    "USER name {rest:?} must be 1-32 of a-z, 0-9, '_' or '-', starting with a letter or '_'"
                ));
            }
            Ok(Instruction::User {
                name: rest.to_string(),
            })
        }
        "COPY" => {
            let mut all =
                shlex::split(rest).ok_or_else(|| "COPY: unbalanced quotes".to_string())?;
            if all.len() < 2 {
                return Err("COPY needs at least one source and a destination".into());
            }
            let dest = all.pop().unwrap_or_default();
            for s in &all {
                if s.starts_with('/') || s.split('/').any(|c| c == "..") {
                    return Err(format!(
                        "COPY source {s:?} must be a path inside the build archive (relative, no '..')"
                    ));
                }
            }
            if dest.is_empty() {
                return Err("COPY destination is empty".into());
            }
            Ok(Instruction::Copy { sources: all, dest })
        }
        "FROM" => Err(
            "FROM is not an instruction; set the build's base_template (or base_image) instead"
                .into(),
        ),
        _ => Err(format!(
            "unknown instruction {word:?} (RUN, START, ENV, WORKDIR, USER or COPY)"
        )),
    }
}

/// Parses `[--interval=3s] [--timeout=10s] [--start-period=0] [--retries=0] cmd`.
pub fn parse_healthcheck(text: &str) -> Result<Healthcheck, String> {
    if text.len() > MAX_LINE_BYTES || text.contains(['\0', '\n', '\r']) {
        return Err(format!(
            "healthcheck: at most {MAX_LINE_BYTES} bytes on one line"
        ));
    }
    let (opts, cmd) = split_options(
        text.trim(),
        &["interval", "timeout", "start-period", "retries"],
    )
    .map_err(|e| format!("healthcheck: {e}"))?;
    if cmd.is_empty() {
        return Err("healthcheck needs a command".into());
    }
    let mut h = Healthcheck {
        cmd: cmd.to_string(),
        interval: Duration::from_secs(3),
        timeout: Duration::from_secs(10),
        start_period: Duration::ZERO,
        retries: 0,
    };
    for (k, v) in opts {
        let bad = |e: String| format!("healthcheck --{k}: {e}");
        match k {
            "interval" => h.interval = parse_duration(v).map_err(bad)?,
            "timeout" => h.timeout = parse_duration(v).map_err(bad)?,
            "start-period" => h.start_period = parse_duration(v).map_err(bad)?,
            _ => {
                h.retries = v
                    .parse()
                    .map_err(|_| bad(format!("{v:?} is not a whole number")))?
            }
        }
    }
    if h.interval < Duration::from_millis(100) || h.interval > Duration::from_secs(600) {
        return Err("healthcheck --interval must be between 100ms and 10m".into());
    }
    if h.timeout < Duration::from_millis(100) || h.timeout > Duration::from_secs(600) {
        return Err("healthcheck --timeout must be between 100ms and 10m".into());
    }
    if h.start_period > Duration::from_secs(3600) {
        return Err("healthcheck --start-period must be at most 1h".into());
    }
    Ok(h)
}

/// Options given as `--name=value`.
type Options<'a> = Vec<(&'static str, &'a str)>;

/// Leading `--name=value` options (only `allowed` names), then the rest of the line.
fn split_options<'a>(
    mut rest: &'a str,
    allowed: &[&'static str],
) -> Result<(Options<'a>, &'a str), String> {
    let mut opts = Vec::new();
    while let Some(opt) = rest.strip_prefix("--") {
        let (word, after) = match opt.split_once(char::is_whitespace) {
            Some((w, a)) => (w, a.trim_start()),
            None => (opt, ""),
        };
        let (name, value) = word
            .split_once('=')
            .ok_or_else(|| format!("option --{word} needs a value (--{word}=…)"))?;
        let Some(known) = allowed.iter().find(|a| **a == name) else {
            return Err(format!(
                "unknown option --{name} (allowed: {})",
                allowed
                    .iter()
                    .map(|a| format!("--{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        if opts.iter().any(|(n, _)| n == known) {
            return Err(format!("option --{name} given twice"));
        }
        opts.push((*known, value));
        rest = after;
    }
    Ok((opts, rest))
}

/// `30s`, `5m`, `1h30m`, `500ms`; a bare number is seconds.
pub fn parse_duration(v: &str) -> Result<Duration, String> {
    if let Ok(secs) = v.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(v).map_err(|e| format!("{v:?} is not a duration ({e})"))
}

fn valid_env_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 256
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Linux user names the way `useradd` accepts them by default.
pub fn valid_user_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 32
        && n.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// A value in matching single or double quotes loses them (no escapes inside).
fn unquote(v: &str) -> String {
    for q in ['"', '\''] {
        if v.len() >= 2 && v.starts_with(q) && v.ends_with(q) {
            return v[1..v.len() - 1].to_string();
        }
    }
    v.to_string()
}

/// Expands `$VAR` and `${VAR}` from `lookup`; unknown variables expand to nothing, `$$` is a
/// literal `$`, and a `$` not followed by a name stays.
pub fn expand(value: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(value.len());
    let mut chars = value.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        match chars.peek().map(|(_, c)| *c) {
            Some('$') => {
                chars.next();
                out.push('$');
            }
            Some('{') => match value[i + 2..].find('}') {
                Some(end) if valid_env_key(&value[i + 2..i + 2 + end]) => {
                    out.push_str(&lookup(&value[i + 2..i + 2 + end]).unwrap_or_default());
                    while chars.peek().is_some_and(|(j, _)| *j <= i + 2 + end) {
                        chars.next();
                    }
                }
                _ => out.push('$'),
            },
            Some(c) if c.is_ascii_alphabetic() || c == '_' => {
                let start = i + 1;
                let mut end = start;
                while let Some((j, c)) = chars.peek().copied() {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        end = j + c.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                out.push_str(&lookup(&value[start..end]).unwrap_or_default());
            }
            _ => out.push('$'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn every_instruction() {
        let steps = parse(&lines(&[
            "# a comment",
            "",
            "RUN apt-get install -y python3",
            "run --timeout=90s make",
            "START python3 -m http.server 8000",
            "ENV GREETING=\"hello world\"",
            "WORKDIR /srv/app",
            "USER app_user",
            "COPY src 'two words' /srv/app/",
        ]))
        .unwrap();
        let got: Vec<_> = steps
            .iter()
            .map(|s| (s.line, s.instruction.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (
                    3,
                    Instruction::Run {
                        cmd: "apt-get install -y python3".into(),
                        timeout: DEFAULT_RUN_TIMEOUT
                    }
                ),
                (
                    4,
                    Instruction::Run {
                        cmd: "make".into(),
                        timeout: Duration::from_secs(90)
                    }
                ),
                (
                    5,
                    Instruction::Start {
                        cmd: "python3 -m http.server 8000".into()
                    }
                ),
                (
                    6,
                    Instruction::Env {
                        key: "GREETING".into(),
                        value: "hello world".into()
                    }
                ),
                (
                    7,
                    Instruction::Workdir {
                        path: "/srv/app".into()
                    }
                ),
                (
                    8,
                    Instruction::User {
                        name: "app_user".into()
                    }
                ),
                (
                    9,
                    Instruction::Copy {
                        sources: vec!["src".into(), "two words".into()],
                        dest: "/srv/app/".into()
                    }
                ),
            ]
        );
        assert!(steps[6].copies());
    }

    #[test]
    fn bad_lines_are_named() {
        for (recipe, line, needle) in [
            (vec!["RUN ls", "BOGUS x"], 2, "unknown instruction"),
            (vec!["RUN"], 1, "needs a command"),
            (vec!["RUN --timeout=abc ls"], 1, "not a duration"),
            (vec!["RUN --timeout=0 ls"], 1, "between"),
            (vec!["RUN --timeout=3h ls"], 1, "between"),
            (vec!["RUN --user=x ls"], 1, "unknown option"),
            (vec!["RUN --timeout=1s --timeout=2s ls"], 1, "twice"),
            (vec!["ENV NOVALUE"], 1, "KEY=value"),
            (vec!["ENV 1X=2"], 1, "ENV key"),
            (vec!["WORKDIR relative"], 1, "absolute"),
            (vec!["USER Root"], 1, "USER name"),
            (vec!["USER a b"], 1, "USER name"),
            (vec!["COPY onlyone"], 1, "at least one source"),
            (vec!["COPY ../etc /x"], 1, "inside the build archive"),
            (vec!["COPY /etc/passwd /x"], 1, "inside the build archive"),
            (vec!["COPY 'open /x"], 1, "quotes"),
            (vec!["FROM debian"], 1, "base_template"),
            (vec!["START"], 1, "needs"),
            (vec!["RUN a\nRUN b"], 1, "line break"),
            (vec!["", "# nothing"], 0, "at least one"),
        ] {
            let e = parse(&lines(&recipe)).unwrap_err();
            assert_eq!(e.line, line, "{recipe:?}: {e}");
            assert!(e.to_string().contains(needle), "{recipe:?}: {e}");
        }
        let long = vec!["RUN ls".to_string(); MAX_LINES + 1];
        assert_eq!(parse(&long).unwrap_err().line, 0);
        let wide = vec![format!("RUN {}", "x".repeat(MAX_LINE_BYTES))];
        assert_eq!(parse(&wide).unwrap_err().line, 1);
    }

    #[test]
    fn healthchecks() {
        let h = parse_healthcheck("curl -sf http://127.0.0.1:8888/api/status").unwrap();
        assert_eq!(h.interval, Duration::from_secs(3));
        assert_eq!(h.timeout, Duration::from_secs(10));
        assert_eq!(h.start_period, Duration::ZERO);
        assert_eq!(h.retries, 0);
        let h = parse_healthcheck(
            "--interval=5s --start-period=60s --retries=3 --timeout=2s test -f /x",
        )
        .unwrap();
        assert_eq!(
            (
                h.interval,
                h.timeout,
                h.start_period,
                h.retries,
                h.cmd.as_str()
            ),
            (
                Duration::from_secs(5),
                Duration::from_secs(2),
                Duration::from_secs(60),
                3,
                "test -f /x"
            )
        );
        for bad in [
            "",
            "--interval=5s",
            "--retries=x ls",
            "--interval=1ms ls",
            "--bogus=1 ls",
            "--interval ls",
            "a\nb",
        ] {
            assert!(parse_healthcheck(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn expansion() {
        let env = |k: &str| match k {
            "HOME" => Some("/home/u".to_string()),
            "A_1" => Some("x".to_string()),
            _ => None,
        };
        assert_eq!(expand("$HOME/bin:${A_1}y", env), "/home/u/bin:xy");
        assert_eq!(expand("$MISSING-${MISSING}.", env), "-.");
        assert_eq!(expand("cost $$5 $ ${ ${1x} $", env), "cost $5 $ ${ ${1x} $");
        assert_eq!(expand("ünï$HOME", env), "ünï/home/u");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("soon").is_err());
    }
}
