//! One build, from capsule to template.
//!
//! The build runs in an ordinary capsule of the platform team started from its base template:
//! pre-build (package lists), the recipe's steps, post-build (caches, the uploaded files, the
//! template's defaults written to `envd_proto::TEMPLATE_DEFAULTS_PATH`), the health check if
//! any, then a snapshot of the capsule becomes the template. Every step's output is published
//! live and its tail recorded. The whole run is one future raced against the build's
//! cancellation: cancelling drops it at its current await (an exec stream dropped kills its
//! process), and the clean-up that follows destroys the capsule whatever happened.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envd_client::{CommandSpec, EnvdClient, ExecEvent, ExecSpec, StartSpec, TemplateDefaults};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix, PLATFORM_TEAM_ID};
use wrenn_api::{
    ApiError, BuildLog, BuildPhase, BuildStatus, CapsuleStatus, CreateCapsuleRequest, EventActor,
    MAX_LOG_BYTES,
};

use super::live::LiveEvent;
use super::recipe::{self, Healthcheck, Instruction};
use super::BuildService;
use crate::error::from_envd;
use crate::store::BuildRow;
use crate::store::TemplateOrigin;

/// Changes whenever what the runner does around a recipe changes (pre/post steps, defaults),
/// so templates built by an older runner are rebuilt.
pub(super) const RUNNER_VERSION: &str = "runner-1";

/// How long a build's capsule may take to start.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// How long the health check may keep failing before the build fails.
const HEALTH_DEADLINE: Duration = Duration::from_secs(600);
/// Pre- and post-build commands.
const HOUSEKEEPING_TIMEOUT: Duration = Duration::from_secs(600);
/// Where the build's own files live in the guest (a tmpfs: never in the template's disk).
const BUILD_DIR: &str = "/tmp/.wrenn-build";
/// Environment variables a template's defaults never carry (they belong to the session).
const SESSION_VARS: &[&str] = &[
    "HOME", "USER", "LOGNAME", "PWD", "OLDPWD", "SHLVL", "HOSTNAME", "TERM", "_", "SHELL",
];
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where a guest CA bundle goes (Debian's `update-ca-certificates` picks up `.crt` files here).
const GUEST_CA_FILE: &str = "/usr/local/share/ca-certificates/wrenn-build-ca.crt";

/// Why a build stopped short.
enum Stop {
    Failed(String),
    Cancelled,
}

impl From<ApiError> for Stop {
    fn from(e: ApiError) -> Self {
        Stop::Failed(e.message)
    }
}

impl From<crate::store::StoreError> for Stop {
    fn from(e: crate::store::StoreError) -> Self {
        Stop::Failed(format!("database: {e}"))
    }
}

impl From<envd_client::EnvdError> for Stop {
    fn from(e: envd_client::EnvdError) -> Self {
        Stop::Failed(from_envd(e).message)
    }
}

/// The state a recipe builds up as it runs: who runs the next step, where, with what.
struct Session {
    user: String,
    home: String,
    workdir: Option<String>,
    /// Variables set by `ENV` (and the base template's defaults).
    env: BTreeMap<String, String>,
    /// Variables every build command gets but the template does not keep.
    build_env: BTreeMap<String, String>,
}

impl Session {
    fn lookup(&self, key: &str) -> Option<String> {
        match key {
            "HOME" => Some(self.home.clone()),
            "USER" | "LOGNAME" => Some(self.user.clone()),
            _ => self.env.get(key).cloned().or_else(|| match key {
                "PATH" => Some(DEFAULT_PATH.into()),
                _ => None,
            }),
        }
    }

    fn command(&self, cmd: &str) -> CommandSpec {
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
    fn as_root(&self, cmd: &str) -> CommandSpec {
        CommandSpec {
            cmd: cmd.to_string(),
            args: Vec::new(),
            envs: self.build_env.clone(),
            cwd: Some("/".into()),
            user: Some("root".into()),
        }
    }
}

/// A running build: its record's logs, live channel and capsule.
struct Run<'a> {
    svc: &'a BuildService,
    row: BuildRow,
    logs: Vec<BuildLog>,
    /// The build's capsule, set as soon as it exists so clean-up finds it after a cancel.
    capsule: Arc<Mutex<Option<String>>>,
    /// The disk an OCI image was made into (host, snapshot id), removed after the build.
    image: Arc<Mutex<Option<(String, String)>>>,
}

impl BuildService {
    /// Runs build `id` once its base template exists and a slot is free, unless it was
    /// cancelled meanwhile.
    pub(super) async fn run(&self, id: &str, token: CancellationToken) {
        tokio::select! {
            ready = self.wait_for_base(id) => if let Err(reason) = ready {
                self.fail_pending(id, &reason).await;
                return;
            },
            _ = token.cancelled() => return,
        }
        let _slot = tokio::select! {
            s = self.slots.clone().acquire_owned() => match s {
                Ok(s) => s,
                Err(_) => return,
            },
            _ = token.cancelled() => return,
        };
        match self.store.start_build(id, &self.cfg.replica).await {
            Ok(true) => {}
            Ok(false) => return,
            Err(e) => {
                warn!(build_id = id, error = %e, "cannot start a build");
                return;
            }
        }
        let row = match self.store.build(id).await {
            Ok(Some(r)) => r,
            _ => return,
        };
        info!(build_id = id, template = %row.build.name, "build running");
        self.live.publish(
            id,
            LiveEvent::Status {
                status: BuildStatus::Running,
                error: None,
            },
        );
        let capsule = Arc::new(Mutex::new(None));
        let image = Arc::new(Mutex::new(None));
        let mut run = Run {
            svc: self,
            row,
            logs: Vec::new(),
            capsule: capsule.clone(),
            image: image.clone(),
        };
        let started = Instant::now();
        let outcome = tokio::select! {
            r = run.execute() => r,
            _ = token.cancelled() => Err(Stop::Cancelled),
        };
        let capsule_id = capsule.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = &capsule_id {
            self.destroy_capsule(c).await;
        }
        let imported = image.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some((host_id, snapshot_id)) = imported {
            if let Some(h) = self.pool.get(&host_id) {
                if let Err(e) = h.delete_snapshot(snapshot_id).await {
                    warn!(build_id = id, error = %e, "cannot remove an imported image");
                }
            }
        }
        if let Some(a) = &run.row.archive {
            let _ = std::fs::remove_file(a);
        }
        let actor = EventActor::system("template-build");
        let ms = started.elapsed().as_millis() as u64;
        match outcome {
            Ok(()) => {
                info!(build_id = id, ms, "build succeeded");
                self.live.publish(
                    id,
                    LiveEvent::Status {
                        status: BuildStatus::Success,
                        error: None,
                    },
                );
                self.events.build_finished(id, &actor, Ok(())).await;
            }
            Err(Stop::Cancelled) if self.shutdown.is_cancelled() => {
                info!(
                    build_id = id,
                    ms, "build interrupted by shutdown (failed on the next start)"
                )
            }
            Err(Stop::Cancelled) => info!(build_id = id, ms, "build stopped: cancelled"),
            Err(Stop::Failed(reason)) => {
                warn!(build_id = id, ms, %reason, "build failed");
                let ended = self
                    .store
                    .finish_build(
                        id,
                        &[BuildStatus::Running],
                        BuildStatus::Failed,
                        Some(&reason),
                    )
                    .await
                    .unwrap_or(false);
                if ended {
                    self.live.publish(
                        id,
                        LiveEvent::Status {
                            status: BuildStatus::Failed,
                            error: Some(reason.clone()),
                        },
                    );
                    self.events.build_finished(id, &actor, Err(&reason)).await;
                }
            }
        }
    }
}

impl BuildService {
    /// A build on a template that is itself being built waits for it; `Err` when the base
    /// does not exist and nothing is making it.
    async fn wait_for_base(&self, id: &str) -> Result<(), String> {
        loop {
            let row = match self.store.build(id).await {
                Ok(Some(r)) => r,
                Ok(None) => return Err(format!("build {id} vanished")),
                Err(e) => return Err(format!("database: {e}")),
            };
            let Some(base) = &row.build.base_template else {
                return Ok(()); // an OCI image: pulled when the build runs
            };
            let names = self
                .platform_template_names()
                .await
                .map_err(|e| e.message)?;
            if names.contains(base) {
                return Ok(());
            }
            match self.store.active_build_named(base).await {
                Ok(Some(_)) => tokio::time::sleep(Duration::from_secs(2)).await,
                Ok(None) => {
                    return Err(format!(
                        "base template {base:?} does not exist (and no build is making it)"
                    ))
                }
                Err(e) => return Err(format!("database: {e}")),
            }
        }
    }

    async fn fail_pending(&self, id: &str, reason: &str) {
        let ended = self
            .store
            .finish_build(
                id,
                &[BuildStatus::Pending],
                BuildStatus::Failed,
                Some(reason),
            )
            .await
            .unwrap_or(false);
        if ended {
            warn!(build_id = id, reason, "build failed before it started");
            self.live.publish(
                id,
                LiveEvent::Status {
                    status: BuildStatus::Failed,
                    error: Some(reason.to_string()),
                },
            );
            let actor = EventActor::system("template-build");
            self.events.build_finished(id, &actor, Err(reason)).await;
        }
    }
}

impl Run<'_> {
    fn id(&self) -> String {
        self.row.build.id.clone()
    }

    async fn execute(&mut self) -> Result<(), Stop> {
        let b = self.row.build.clone();
        let steps = recipe::parse(&b.recipe).map_err(|e| Stop::Failed(e.to_string()))?;
        let health = b
            .healthcheck
            .as_deref()
            .map(recipe::parse_healthcheck)
            .transpose()
            .map_err(Stop::Failed)?;
        let (capsule_id, envd) = self.start_capsule().await?;
        let _busy = self.svc.capsules.hold(&capsule_id);
        let mut session = self.session(&envd).await;
        self.install_ca(&envd, &mut session).await?;
        if let Some(archive) = self.row.archive.clone() {
            self.upload_archive(&envd, &session, &archive).await?;
        }
        if !b.skip_pre_post {
            let cmd = "if command -v apt-get >/dev/null; then apt-get update -q; fi";
            let n = self.next_step(BuildPhase::PreBuild);
            self.command_step(
                &envd,
                BuildPhase::PreBuild,
                n,
                cmd,
                session.as_root(cmd),
                HOUSEKEEPING_TIMEOUT,
            )
            .await?;
        }
        for (i, step) in steps.iter().enumerate() {
            let n = i as u32 + 1;
            self.svc.store.set_build_step(&self.id(), n).await.ok();
            self.recipe_step(&envd, &mut session, n, step).await?;
        }
        self.post_build(&envd, &session, b.skip_pre_post).await?;
        if let Some(h) = &health {
            self.healthcheck(&envd, &session, h).await?;
        }
        let defaults = template_defaults(&session);
        self.svc
            .store
            .set_build_defaults(
                &self.id(),
                &defaults.user.clone().unwrap_or_default(),
                &defaults.env,
            )
            .await?;
        let origin = TemplateOrigin {
            kind: if health.is_some() { "snapshot" } else { "base" },
            default_user: defaults.user,
            default_env: defaults.env,
            build_id: Some(self.id()),
            protected: b.builtin,
            cache_key: b.builtin.then(|| self.row.recipe_hash.clone()),
        };
        self.svc
            .capsules
            .publish_template(&capsule_id, &b.name, origin, b.builtin)
            .await?;
        if b.builtin {
            self.cache(&b.name).await;
        }
        let ended = self
            .svc
            .store
            .finish_build(
                &self.id(),
                &[BuildStatus::Running],
                BuildStatus::Success,
                None,
            )
            .await?;
        if !ended {
            // Cancelled while the snapshot was taken: the template goes with the build.
            let actor = EventActor::system("template-build");
            let _ = self
                .svc
                .capsules
                .delete_template(PLATFORM_TEAM_ID, &b.name, &actor)
                .await;
            return Err(Stop::Cancelled);
        }
        Ok(())
    }

    /// Keeps a built-in template in its host's cache, so other control planes using that
    /// host (and this one with a fresh database) adopt it instead of building it again.
    async fn cache(&self, name: &str) {
        let Ok(Some(t)) = self.svc.store.template(PLATFORM_TEAM_ID, name).await else {
            return;
        };
        let Some(host) = self.svc.pool.get(&t.host_id) else {
            return;
        };
        if let Err(e) = host
            .cache_template(t.snapshot_id.clone(), self.row.recipe_hash.clone())
            .await
        {
            warn!(build_id = %self.row.build.id, error = %e, "cannot cache a built-in template");
        }
    }

    /// Pulls the build's OCI image onto a platform host as a disk (a pre-build step), and
    /// boots the build's capsule from it.
    async fn capsule_from_image(
        &mut self,
        image: &str,
        req: CreateCapsuleRequest,
        actor: &EventActor,
    ) -> Result<wrenn_api::Capsule, Stop> {
        let mut spec = req.validate().map_err(Stop::Failed)?;
        spec.template = format!("oci:{image}");
        let host = self.svc.pool.place(PLATFORM_TEAM_ID, &spec).await?;
        let snapshot_id = new_id(prefix::SNAPSHOT);
        let phase = BuildPhase::PreBuild;
        let n = self.next_step(phase);
        let label = format!("pull {image}");
        self.begin(phase, n, &label);
        let started = Instant::now();
        let credentials = self.svc.credentials().get(&self.row.build.id).cloned();
        let imported = host
            .import_image(
                image.to_string(),
                credentials,
                snapshot_id.clone(),
                u64::from(self.row.build.disk_size_mb),
            )
            .await;
        let imported = match imported {
            Ok(i) => i,
            Err(e) => {
                let why = e.to_string();
                self.end(
                    phase,
                    n,
                    &label,
                    String::new(),
                    why.clone(),
                    None,
                    false,
                    started,
                )
                .await;
                return Err(step_failed(phase, n, &why));
            }
        };
        // The image's disk goes once the build's capsule (which sits on it) is gone.
        *self.image.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((host.host_id().to_string(), snapshot_id.clone()));
        let notes = imported.notes.join("\n") + "\n";
        self.end(
            phase,
            n,
            &label,
            notes,
            String::new(),
            Some(0),
            true,
            started,
        )
        .await;
        let from = wrenn_host::UserSnapshot {
            id: snapshot_id,
            disk_only: true,
        };
        Ok(self
            .svc
            .capsules
            .create_from_disk(PLATFORM_TEAM_ID, spec, from, host, actor)
            .await?)
    }

    /// Starts the build's capsule and waits until it runs.
    async fn start_capsule(&mut self) -> Result<(String, EnvdClient), Stop> {
        let b = self.row.build.clone();
        let req = CreateCapsuleRequest {
            template: b.base_template.clone(),
            vcpus: Some(b.vcpus.into()),
            memory_mb: Some(b.memory_mb.into()),
            disk_size_mb: Some(b.disk_size_mb.into()),
            timeout_sec: Some(0),
        };
        let actor = EventActor::system("template-build");
        let capsule = match &b.base_image {
            Some(image) => self.capsule_from_image(image, req, &actor).await?,
            None => {
                self.svc
                    .capsules
                    .create(PLATFORM_TEAM_ID, req, &actor)
                    .await?
            }
        };
        // No await between the create and this line: a cancel cannot lose the capsule.
        *self.capsule.lock().unwrap_or_else(|p| p.into_inner()) = Some(capsule.id.clone());
        let row = self.svc.store.capsule(&capsule.id).await?;
        let host_id = row.as_ref().and_then(|r| r.host_id.clone());
        self.svc
            .store
            .set_build_capsule(&self.id(), Some(&capsule.id), host_id.as_deref())
            .await?;
        let deadline = Instant::now() + BOOT_DEADLINE;
        loop {
            let Some(c) = self.svc.store.capsule(&capsule.id).await? else {
                return Err(Stop::Failed("the build's capsule vanished".into()));
            };
            match c.capsule.status {
                CapsuleStatus::Running => break,
                CapsuleStatus::Starting => {}
                other => {
                    return Err(Stop::Failed(format!(
                        "the build's capsule did not start ({}): {}",
                        other.as_str(),
                        c.error.unwrap_or_default()
                    )))
                }
            }
            if Instant::now() > deadline {
                return Err(Stop::Failed(format!(
                    "the build's capsule did not start within {}s",
                    BOOT_DEADLINE.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let envd = self
            .svc
            .capsules
            .files(PLATFORM_TEAM_ID, &capsule.id)
            .await?;
        Ok((capsule.id, envd))
    }

    /// The session the recipe starts in: root, or the base template's own defaults.
    async fn session(&self, envd: &EnvdClient) -> Session {
        let mut s = Session {
            user: "root".into(),
            home: "/root".into(),
            workdir: None,
            env: BTreeMap::new(),
            build_env: [("DEBIAN_FRONTEND", "noninteractive")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        if let Ok(d) = read_defaults(envd).await {
            if let Some(u) = d.user {
                s.home = if u == "root" {
                    "/root".into()
                } else {
                    format!("/home/{u}")
                };
                s.user = u;
            }
            s.env = d.env;
            s.workdir = d.cwd;
        }
        s
    }

    /// With a guest CA bundle configured: installs it and points the usual variables at the
    /// system bundle for the build's commands (the template keeps the CA, not the variables).
    async fn install_ca(&mut self, envd: &EnvdClient, session: &mut Session) -> Result<(), Stop> {
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

    async fn upload_archive(
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

    async fn recipe_step(
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
    async fn post_build(
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

    async fn healthcheck(
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
    async fn command_step(
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
    fn next_step(&self, phase: BuildPhase) -> u32 {
        self.logs.iter().filter(|l| l.phase == phase).count() as u32 + 1
    }

    fn begin(&self, phase: BuildPhase, step: u32, cmd: &str) {
        self.svc.live.publish(
            &self.row.build.id,
            LiveEvent::Step {
                phase,
                step,
                cmd: cmd.to_string(),
            },
        );
    }

    fn output(&self, phase: BuildPhase, step: u32, stream: &'static str, bytes: &[u8]) {
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
    async fn end(
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

fn step_failed(phase: BuildPhase, n: u32, why: &str) -> Stop {
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
fn template_defaults(session: &Session) -> TemplateDefaults {
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

async fn read_defaults(envd: &EnvdClient) -> Result<TemplateDefaults, Stop> {
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
