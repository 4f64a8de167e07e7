//! Who a command runs as and what it starts with: the request's own choices, over the
//! template's defaults (`TEMPLATE_DEFAULTS_PATH`, written by template builds), over root in
//! its home directory.

use std::collections::BTreeMap;
use std::io::Read;

use envd_proto::{
    ErrorKind, Response, TemplateDefaults, MAX_TEMPLATE_DEFAULTS_BYTES, TEMPLATE_DEFAULTS_PATH,
};

pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Everything a new process needs to know about its identity and starting point.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub user: String,
    pub home: String,
    pub cwd: String,
    /// The whole environment: the base, then the template's, then the request's.
    pub env: BTreeMap<String, String>,
}

/// The template's defaults, read afresh (they are small; a capsule restored from a template
/// sees its file). Missing, oversized or unreadable: none.
pub fn template_defaults() -> TemplateDefaults {
    let Ok(f) = std::fs::File::open(TEMPLATE_DEFAULTS_PATH) else {
        return TemplateDefaults::default();
    };
    let mut bytes = Vec::new();
    if f.take(MAX_TEMPLATE_DEFAULTS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .is_err()
        || bytes.len() > MAX_TEMPLATE_DEFAULTS_BYTES
    {
        return TemplateDefaults::default();
    }
    serde_json::from_slice(&bytes).unwrap_or_default()
}

/// Looks a user up in the guest's /etc/passwd: (uid, gid, home).
pub fn user_entry(name: &str) -> Option<(u32, u32, String)> {
    parse_passwd(&std::fs::read_to_string("/etc/passwd").ok()?, name)
}

fn parse_passwd(passwd: &str, name: &str) -> Option<(u32, u32, String)> {
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 6 && f[0] == name)
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?, f[5].to_string())))?
    })
}

/// Resolves a request's user, environment and working directory against the template's
/// defaults. An unknown user or a cwd that is not a directory is the caller's error.
pub fn resolve(
    user: Option<&str>,
    envs: &BTreeMap<String, String>,
    cwd: Option<&str>,
) -> Result<Identity, Response> {
    resolve_with(template_defaults(), user, envs, cwd, user_entry)
}

fn resolve_with(
    defaults: TemplateDefaults,
    user: Option<&str>,
    envs: &BTreeMap<String, String>,
    cwd: Option<&str>,
    lookup: impl Fn(&str) -> Option<(u32, u32, String)>,
) -> Result<Identity, Response> {
    let name = user
        .map(str::to_string)
        .or(defaults.user.clone())
        .unwrap_or_else(|| "root".into());
    let (uid, gid, home) = match name.as_str() {
        "root" => (0, 0, "/root".to_string()),
        u => lookup(u).ok_or_else(|| {
            crate::error(
                ErrorKind::InvalidRequest,
                format!("no user {u:?} in the capsule"),
            )
        })?,
    };
    let cwd = cwd
        .map(str::to_string)
        .or(defaults.cwd.clone())
        .unwrap_or_else(|| home.clone());
    if !std::path::Path::new(&cwd).is_dir() {
        return Err(crate::error(
            ErrorKind::InvalidRequest,
            format!("cwd {cwd} is not a directory"),
        ));
    }
    let mut env: BTreeMap<String, String> = [
        ("PATH", DEFAULT_PATH),
        ("HOME", home.as_str()),
        ("USER", name.as_str()),
        ("LOGNAME", name.as_str()),
        ("SHELL", "/bin/bash"),
        ("LANG", "C.UTF-8"),
        ("TERM", "xterm-256color"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    env.extend(defaults.env);
    env.extend(envs.iter().map(|(k, v)| (k.clone(), v.clone())));
    Ok(Identity {
        uid,
        gid,
        user: name,
        home,
        cwd,
        env,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<(u32, u32, String)> {
        parse_passwd(
            "root:x:0:0:root:/root:/bin/bash\napp:x:1000:1000::/home/app:/bin/bash\n",
            name,
        )
    }

    #[test]
    fn the_request_wins_over_the_template_over_root() {
        let none = BTreeMap::new();
        let id = resolve_with(TemplateDefaults::default(), None, &none, Some("/"), lookup).unwrap();
        assert_eq!(
            (id.uid, id.user.as_str(), id.cwd.as_str()),
            (0, "root", "/")
        );
        assert_eq!(id.env["PATH"], DEFAULT_PATH);

        let defaults = TemplateDefaults {
            user: Some("app".into()),
            env: [
                ("PATH".to_string(), "/opt/bin:/usr/bin".to_string()),
                ("A".into(), "1".into()),
            ]
            .into(),
            cwd: Some("/".into()),
        };
        let id = resolve_with(defaults.clone(), None, &none, None, lookup).unwrap();
        assert_eq!(
            (id.uid, id.gid, id.home.as_str()),
            (1000, 1000, "/home/app")
        );
        assert_eq!(id.env["PATH"], "/opt/bin:/usr/bin");
        assert_eq!(id.env["USER"], "app");
        assert_eq!(id.cwd, "/");

        let mine: BTreeMap<String, String> = [("A".to_string(), "2".to_string())].into();
        let id = resolve_with(defaults.clone(), Some("root"), &mine, Some("/"), lookup).unwrap();
        assert_eq!(
            (id.uid, id.env["A"].as_str(), id.env["HOME"].as_str()),
            (0, "2", "/root")
        );

        assert!(resolve_with(
            defaults.clone(),
            Some("nobody-here"),
            &none,
            Some("/"),
            lookup
        )
        .is_err());
        assert!(resolve_with(defaults, None, &none, Some("/no/such/dir"), lookup).is_err());
    }
}
