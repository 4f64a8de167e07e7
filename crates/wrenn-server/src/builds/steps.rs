//! The steps of a build inside its capsule: the session a recipe builds up (user, home,
//! workdir, environment), each instruction, the pre-build and post-build housekeeping, the
//! health check, and how every command's output is streamed live and recorded.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use envd_client::{CommandSpec, EnvdClient, ExecEvent, ExecSpec, StartSpec, TemplateDefaults};
use tracing::warn;
use wrenn_api::{BuildLog, BuildPhase, MAX_LOG_BYTES};

use super::live::LiveEvent;
use super::recipe::{self, Healthcheck, Instruction};
use super::runner::{Run, Stop};
use crate::error::from_envd;

/// How long the health check may keep failing before the build fails.
const HEALTH_DEADLINE: Duration = Duration::from_secs(600);
/// Pre- and post-build commands.
pub(super) const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(600);
/// Where the build's own files live in the guest (a tmpfs: never in the template's disk).
const BUILD_DIR: &str = "/tmp/.wrenn-build";
/// Environment variables a template's defaults never carry (they belong to the session).
const SESSION_VARS: &[&str] = &[
    "HOME", "USER", "LOGNAME", "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "TERM", "_", "SHELL",
];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where a guest CA bundle goes (Debian's `update-ca-certificates` picks up `.crt` files here).
const GUEST_CA_FILE: &str = "/usr/local/share/ca-certificates/wrenn-build-ca.crt";

/// The state a recipe builds up as it runs: who runs the next step, where, with what.
pub(super) struct Session {
    pub(super) user: String,
    pub(super) home: String,
    pub(super) workdir: Option<String>,
    /// Variables set by `ENV` (and the base template's defaults).
    pub(super) env: BTreeMap<String, String>,
    /// Variables every build command gets but the template does not keep.
    pub(super) build_env: BTreeMap<String, String>,
}

impl Session {
    pub(super) fn lookup(&self, key: &str) -> Option<String> {
        match key {
            "HOME" => Some(self.home.clone()),
            "USER" | "LOGNAME" => Some(self.user.clone()),
            _ => self.env.get(key).cloned().or_else(|| match key {
                "PATH" => Some(DEFAULT_PATH.into()),
                _ => None,
            }),
        }
    }

    pub(super) fn command(&self, cmd: &str) -> CommandSpec {
        let mut envs = self.build_env.clone();
        envs.extend(self.env.clone());
        envs.insert("HOME".into(), self.home.clone());
        CommandSpec {
            cmd: cmd.to_string(),
            args: Vec::new(),
            envs,
            cwd: Some(self.workdir.clone().unwrap_or_else(|| self.home.clone())),
            user: Some(self.user.clone()),
        }
    }

    /// A command run as root in `/` whatever the recipe set (the runner's own work).
    pub(super) fn as_root(&self, cmd: &str) -> CommandSpec {
        CommandSpec {
            cmd: cmd.to_string(),
            args: Vec::new(),
            envs: self.build_env.clone(),
            cwd: Some("/".into()),
            user: Some("root".into()),
        }
    }
}

impl Run<'_> {
    /// With a guest CA bundle configured: installs it and points the usual variables at the
    /// system bundle for the build's commands (the template keeps the CA, not the variables).
    pub(super) async fn install_ca(
        &mut self,
        envd: &EnvdClient,
        session: &mut Session,
    ) -> Result<(), Stop> {
        let Some(path) = self.svc.cfg.guest_ca_bundle.clone() else {
            return Ok(());
        };
        let pem = tokio::fs::read(&path)
            .await
            .map_err(|e| Stop::Failed(format!("guest CA bundle {}: {e}", path.display())))?;
        envd.make_dir("/usr/local/share/ca-certificates").await.ok();
        write_guest_file(envd, GUEST_CA_FILE, &pem).await?;
        let bundle = "/etc/ssl/certs/ca-certificates.crt";
        // Appended to the system bundle at once (update-ca-certificates rehashes every CA,
        // which takes a minute under TCG); its copy under ca-certificates/ keeps it in the
        // bundle when a package regenerates it.
        let cmd = format!("mkdir -p /etc/ssl/certs && cat {GUEST_CA_FILE} >> {bundle}");
        let n = self.next_step(BuildPhase::PreBuild);
        self.command_step(
            envd,
            BuildPhase::PreBuild,
            n,
            "install the guest CA bundle",
            session.as_root(&cmd),
            HOUSEKEEPING_TIMEOUT,
        )
        .await?;
        for var in [
            "SSL_CERT_FILE",
            "REQUESTS_CA_BUNDLE",
            "PIP_CERT",
            "NODE_EXTRA_CA_CERTS",
            "CURL_CA_BUNDLE",
        ] {
            session.build_env.insert(var.into(), bundle.into());
        }
        Ok(())
    }

    pub(super) async fn upload_archive(
        &mut self,
        envd: &EnvdClient,
        session: &Session,
        archive: &str,
    ) -> Result<(), Stop> {
        let tar = format!("{BUILD_DIR}/context.tar");
        let mut file = tokio::fs::File::open(archive)
            .await
            .map_err(|e| Stop::Failed(format!("the build's archive is gone: {e}")))?;
        let mut w = envd.write_file(&tar).await?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            use tokio::io::AsyncReadExt;
            let n = file
                .read(&mut buf)
                .await
                .map_err(|e| Stop::Failed(format!("reading the build's archive: {e}")))?;
            if n == 0 {
                break;
            }
            w.send(&buf[..n]).await?;
        }
        w.finish().await?;
        let cmd = format!(
            "mkdir -p {BUILD_DIR}/context && tar -xf {tar} -C {BUILD_DIR}/context --no-same-owner && rm -f {tar}"
        );
        let n = self.next_step(BuildPhase::PreBuild);
        self.command_step(
            envd,
            BuildPhase::PreBuild,
            n,
            "unpack the build archive",
            session.as_root(&cmd),
            HOUSEKEEPING_TIMEOUT,
        )
        .await
    }

    pub(super) async fn recipe_step(
        &mut self,
        envd: &EnvdClient,
        session: &mut Session,
        n: u32,
        step: &recipe::Step,
    ) -> Result<(), Stop> {
        let phase = BuildPhase::Recipe;
        match &step.instruction {
            Instruction::Run { cmd, timeout } => {
                let spec = session.command(cmd);
                self.command_step(envd, phase, n, &step.text, spec, *timeout)
                    .await
            }
            Instruction::Start { cmd } => {
                self.begin(phase, n, &step.text);
                let started = Instant::now();
                let spec = StartSpec {
                    command: session.command(cmd),
                    tag: Some(format!("build-start-{n}")),
                };
                let result = envd.start(spec).await;
                let (ok, stdout, stderr) = match &result {
                    Ok(p) => (true, format!("started pid {}\n", p.pid), String::new()),
                    Err(e) => (false, String::new(), e.to_string()),
                };
                self.end(
                    phase,
                    n,
                    &step.text,
                    stdout,
                    stderr.clone(),
                    ok.then_some(0),
                    ok,
                    started,
                )
                .await;
                if ok {
                    Ok(())
                } else {
                    Err(step_failed(phase, n, &stderr))
                }
            }
            Instruction::Env { key, value } => {
                let started = Instant::now();
                self.begin(phase, n, &step.text);
                let v = recipe::expand(value, |k| session.lookup(k));
                session.env.insert(key.clone(), v.clone());
                self.end(
                    phase,
                    n,
                    &step.text,
                    format!("{key}={v}\n"),
                    String::new(),
                    None,
                    true,
                    started,
                )
                .await;
                Ok(())
            }
            Instruction::Workdir { path } => {
                let dir = recipe::expand(path, |k| session.lookup(k));
                let cmd = format!(
                    "[ -d {d} ] || {{ mkdir -p {d} && chown {u}: {d}; }}",
                    d = shell_quote(&dir),
                    u = shell_quote(&session.user)
                );
                self.command_step(
                    envd,
                    phase,
                    n,
                    &step.text,
                    session.as_root(&cmd),
                    HOUSEKEEPING_TIMEOUT,
                )
                .await?;
                session.workdir = Some(dir);
                Ok(())
            }
            Instruction::User { name } => {
                let q = shell_quote(name);
                let cmd = format!(
                    "id -u {q} >/dev/null 2>&1 || {{ useradd -m -s /bin/bash {q} && mkdir -p /etc/sudoers.d \
                     && printf '%s ALL=(ALL) NOPASSWD:ALL\\n' {q} > /etc/sudoers.d/{q} && chmod 440 /etc/sudoers.d/{q}; }} \
                     && getent passwd {q} | cut -d: -f6"
                );
                let out = self
                    .command_step(
                        envd,
                        phase,
                        n,
                        &step.text,
                        session.as_root(&cmd),
                        HOUSEKEEPING_TIMEOUT,
                    )
                    .await;
                out?;
                let home = self
                    .logs
                    .last()
                    .map(|l| l.stdout.trim().to_string())
                    .filter(|h| h.starts_with('/'))
                    .unwrap_or_else(|| format!("/home/{name}"));
                session.user = name.clone();
                session.home = home;
                Ok(())
            }
            Instruction::Copy { sources, dest } => {
                let dest = recipe::expand(dest, |k| session.lookup(k));
                let dest = if dest.starts_with('/') {
                    dest
                } else {
                    let base = session
                        .workdir
                        .clone()
                        .unwrap_or_else(|| session.home.clone());
                    format!("{}/{dest}", base.trim_end_matches('/'))
                };
                let cmd = copy_script(sources, &dest, &session.user);
                self.command_step(
                    envd,
                    phase,
                    n,
                    &step.text,
                    session.as_root(&cmd),
                    HOUSEKEEPING_TIMEOUT,
                )
                .await
            }
        }
    }

    /// Package caches and the build's own files go; the template's defaults are written and
    /// the disk synced (a base template is the disk alone).
    pub(super) async fn post_build(
        &mut self,
        envd: &EnvdClient,
        session: &Session,
        skip: bool,
    ) -> Result<(), Stop> {
        let phase = BuildPhase::PostBuild;
        if !skip {
            let n = self.next_step(phase);
            let cmd = "if command -v apt-get >/dev/null; then apt-get clean; rm -rf /var/lib/apt/lists/*; fi";
            self.command_step(
                envd,
                phase,
                n,
                cmd,
                session.as_root(cmd),
                HOUSEKEEPING_TIMEOUT,
            )
            .await?;
        }
        let defaults = template_defaults(session);
        let json = serde_json::to_vec_pretty(&defaults)
            .map_err(|e| Stop::Failed(format!("template defaults: {e}")))?;
        envd.make_dir("/etc/wrenn").await.ok();
        write_guest_file(envd, envd_client::TEMPLATE_DEFAULTS_PATH, &json).await?;
        let n = self.next_step(phase);
        let cmd = format!("rm -rf {BUILD_DIR}; sync");
        self.command_step(
            envd,
            phase,
            n,
            &cmd,
            session.as_root(&cmd),
            HOUSEKEEPING_TIMEOUT,
        )
        .await
    }

    pub(super) async fn healthcheck(
        &mut self,
        envd: &EnvdClient,
        session: &Session,
        h: &Healthcheck,
    ) -> Result<(), Stop> {
        let phase = BuildPhase::Healthcheck;
        let label = format!("HEALTHCHECK {}", h.cmd);
        self.begin(phase, 1, &label);
        let started = Instant::now();
        tokio::time::sleep(h.start_period).await;
        let deadline = Instant::now() + HEALTH_DEADLINE;
        let mut failures = 0u32;
        loop {
            let spec = ExecSpec {
                command: session.command(&h.cmd),
                timeout_ms: h.timeout.as_millis() as u64,
            };
            let out = envd.exec(spec).await;
            let (code, stdout, stderr) = match out {
                Ok(o) => (
                    if o.timed_out { -1 } else { o.exit_code },
                    tail(&o.stdout),
                    tail(&o.stderr),
                ),
                Err(e) => (-1, String::new(), e.to_string()),
            };
            if code == 0 {
                self.end(phase, 1, &label, stdout, stderr, Some(0), true, started)
                    .await;
                return Ok(());
            }
            failures += 1;
            let exhausted = h.retries > 0 && failures > h.retries;
            if exhausted || Instant::now() > deadline {
                let why = format!(
                    "healthcheck failed {failures} times (last exit {code}): {}",
                    first_words(if stderr.is_empty() { &stdout } else { &stderr })
                );
                self.end(phase, 1, &label, stdout, stderr, Some(code), false, started)
                    .await;
                return Err(Stop::Failed(why));
            }
            tokio::time::sleep(h.interval).await;
        }
    }

    /// Runs one command as a step: streamed live, its tail recorded, failing the build when
    /// it fails.
    pub(super) async fn command_step(
        &mut self,
        envd: &EnvdClient,
        phase: BuildPhase,
        n: u32,
        label: &str,
        command: CommandSpec,
        timeout: Duration,
    ) -> Result<(), Stop> {
        self.begin(phase, n, label);
        let started = Instant::now();
        let spec = ExecSpec {
            command,
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut stdout = Tail::default();
        let mut stderr = Tail::default();
        let ran = async {
            let mut stream = envd.exec_stream(spec).await?;
            loop {
                match stream.next().await? {
                    ExecEvent::Stdout(b) => {
                        self.output(phase, n, "stdout", &b);
                        stdout.push(&b);
                    }
                    ExecEvent::Stderr(b) => {
                        self.output(phase, n, "stderr", &b);
                        stderr.push(&b);
                    }
                    ExecEvent::Exit {
                        exit_code,
                        timed_out,
                        ..
                    } => return Ok::<_, envd_client::EnvdError>((exit_code, timed_out)),
                }
            }
        };
        let grace = Duration::from_secs(30);
        let result = match tokio::time::timeout(timeout + grace, ran).await {
            Ok(r) => r.map_err(|e| from_envd(e).message),
            Err(_) => Err(format!(
                "no answer from the capsule within {}s",
                (timeout + grace).as_secs()
            )),
        };
        let (out, err) = (stdout.text(), stderr.text());
        match result {
            Ok((0, false)) => {
                self.end(phase, n, label, out, err, Some(0), true, started)
                    .await;
                Ok(())
            }
            Ok((code, timed_out)) => {
                let why = if timed_out {
                    format!("timed out after {}", humantime::format_duration(timeout))
                } else if err.trim().is_empty() {
                    format!("exit code {code}")
                } else {
                    format!("exit code {code}: {}", first_words(&err))
                };
                self.end(phase, n, label, out, err, Some(code), false, started)
                    .await;
                Err(step_failed(phase, n, &why))
            }
            Err(e) => {
                self.end(
                    phase,
                    n,
                    label,
                    out,
                    format!("{err}{e}"),
                    None,
                    false,
                    started,
                )
                .await;
                Err(step_failed(phase, n, &e))
            }
        }
    }

    /// The next step number of a housekeeping phase (recipe steps are numbered by position).
    pub(super) fn next_step(&self, phase: BuildPhase) -> u32 {
        self.logs.iter().filter(|l| l.phase == phase).count() as u32 + 1
    }

    pub(super) fn begin(&self, phase: BuildPhase, step: u32, cmd: &str) {
        self.svc.live.publish(
            &self.row.build.id,
            LiveEvent::Step {
                phase,
                step,
                cmd: cmd.to_string(),
            },
        );
    }

    pub(super) fn output(&self, phase: BuildPhase, step: u32, stream: &'static str, bytes: &[u8]) {
        self.svc.live.publish(
            &self.row.build.id,
            LiveEvent::Output {
                phase,
                step,
                stream,
                data: String::from_utf8_lossy(bytes).into_owned(),
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn end(
        &mut self,
        phase: BuildPhase,
        step: u32,
        cmd: &str,
        stdout: String,
        stderr: String,
        exit: Option<i32>,
        ok: bool,
        started: Instant,
    ) {
        let log = BuildLog {
            step,
            phase,
            cmd: cmd.to_string(),
            stdout,
            stderr,
            exit,
            ok,
            elapsed_ms: started.elapsed().as_millis() as u64,
        };
        self.logs.push(log.clone());
        if let Err(e) = self
            .svc
            .store
            .set_build_logs(&self.row.build.id, &self.logs)
            .await
        {
            warn!(build_id = %self.row.build.id, error = %e, "cannot record a build step");
        }
        self.svc
            .live
            .publish(&self.row.build.id, LiveEvent::Log(log));
    }
}

pub(super) fn step_failed(phase: BuildPhase, n: u32, why: &str) -> Stop {
    Stop::Failed(format!("{} step {n} failed: {why}", phase.as_str()))
}

/// The first 500 characters of a message, on one line.
fn first_words(s: &str) -> String {
    let one: String = s.split_whitespace().collect::<Vec<_>>().join(" ");
    one.chars().take(500).collect()
}

/// The last [`MAX_LOG_BYTES`] of a stream.
#[derive(Default)]
struct Tail {
    bytes: std::collections::VecDeque<u8>,
}

impl Tail {
    fn push(&mut self, b: &[u8]) {
        self.bytes.extend(b);
        let over = self.bytes.len().saturating_sub(MAX_LOG_BYTES);
        self.bytes.drain(..over);
    }

    fn text(&self) -> String {
        let (a, b) = self.bytes.as_slices();
        let mut v = a.to_vec();
        v.extend_from_slice(b);
        String::from_utf8_lossy(&v).into_owned()
    }
}

fn tail(b: &[u8]) -> String {
    let start = b.len().saturating_sub(MAX_LOG_BYTES);
    String::from_utf8_lossy(&b[start..]).into_owned()
}

/// What a template built from `session` gives every capsule and exec.
pub(super) fn template_defaults(session: &Session) -> TemplateDefaults {
    TemplateDefaults {
        user: Some(session.user.clone()),
        env: session
            .env
            .iter()
            .filter(|(k, _)| !SESSION_VARS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        cwd: session.workdir.clone(),
    }
}

pub(super) async fn read_defaults(envd: &EnvdClient) -> Result<TemplateDefaults, Stop> {
    let mut r = envd.read_file(envd_client::TEMPLATE_DEFAULTS_PATH).await?;
    let mut bytes = Vec::new();
    while let Some(chunk) = r.next_chunk().await? {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > envd_client::MAX_TEMPLATE_DEFAULTS_BYTES {
            return Err(Stop::Failed("template defaults too large".into()));
        }
    }
    serde_json::from_slice(&bytes).map_err(|e| Stop::Failed(format!("template defaults: {e}")))
}

async fn write_guest_file(envd: &EnvdClient, path: &str, bytes: &[u8]) -> Result<(), Stop> {
    let mut w = envd.write_file(path).await?;
    w.send(bytes).await?;
    w.finish().await?;
    Ok(())
}

/// A word for `sh`, quoted.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `COPY sources… dest` as a script run as root in the build's context directory: a
/// directory's contents go into `dest`; files go into `dest` when it is a directory (or ends
/// with `/`, or there are several sources), else become `dest`. Copied files belong to `user`.
fn copy_script(sources: &[String], dest: &str, user: &str) -> String {
    let u = shell_quote(user);
    let d = shell_quote(dest);
    let into_dir = sources.len() > 1 || dest.ends_with('/');
    let mut s = format!("set -e\ncd {BUILD_DIR}/context\nD={d}\nU={u}\nG=$(id -gn \"$U\")\n");
    for src in sources {
        let q = shell_quote(src);
        s.push_str(&format!(
            "[ -e {q} ] || [ -L {q} ] || {{ echo \"COPY: \"{q}\" is not in the uploaded archive\" >&2; exit 1; }}\n"
        ));
    }
    if into_dir {
        s.push_str("mkdir -p \"$D\"\n");
    }
    for src in sources {
        let q = shell_quote(src);
        s.push_str(&format!(
            "if [ -d {q} ] && [ ! -L {q} ]; then mkdir -p \"$D\"; tar -C {q} -cf - --owner=\"$U\" --group=\"$G\" . | tar -C \"$D\" -xpf -\n\
             elif [ -d \"$D\" ]; then tar -C \"$(dirname {q})\" -cf - --owner=\"$U\" --group=\"$G\" \"$(basename {q})\" | tar -C \"$D\" -xpf -\n\
             else mkdir -p \"$(dirname \"$D\")\"; cp -P {q} \"$D\"; chown -h \"$U:$G\" \"$D\"; fi\n"
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tails_keep_the_end() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; MAX_LOG_BYTES]);
        t.push(b"end");
        let s = t.text();
        assert_eq!(s.len(), MAX_LOG_BYTES);
        assert!(s.ends_with("aend"));
    }

    #[test]
    fn defaults_drop_session_variables() {
        let s = Session {
            user: "app".into(),
            home: "/home/app".into(),
            workdir: Some("/srv".into()),
            env: [
                ("HOME", "/x"),
                ("GREETING", "hi"),
                ("PATH", "/opt/bin:/usr/bin"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            build_env: BTreeMap::new(),
        };
        let d = template_defaults(&s);
        assert_eq!(d.user.as_deref(), Some("app"));
        assert_eq!(d.cwd.as_deref(), Some("/srv"));
        assert_eq!(d.env.keys().collect::<Vec<_>>(), vec!["GREETING", "PATH"]);
        assert_eq!(s.lookup("HOME").as_deref(), Some("/home/app"));
        assert_eq!(s.lookup("PATH").as_deref(), Some("/opt/bin:/usr/bin"));
    }

    #[test]
    fn copy_scripts_quote_everything() {
        let s = copy_script(&["it's".into()], "/srv/a b", "app");
        assert!(s.contains("D='/srv/a b'"));
        assert!(s.contains("'it'\\''s'"));
        assert!(!s.contains("mkdir -p \"$D\"\nif"));
        let multi = copy_script(&["a".into(), "b".into()], "/srv", "root");
        assert!(multi.contains("mkdir -p \"$D\"\n"));
    }
}
