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

use envd_client::EnvdClient;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix, PLATFORM_TEAM_ID};
use wrenn_api::{
    ApiError, BuildLog, BuildPhase, BuildStatus, CapsuleStatus, CreateCapsuleRequest, EventActor,
};

use super::live::LiveEvent;
use super::recipe;
use super::steps::{read_defaults, step_failed, template_defaults, Session, HOUSEKEEPING_TIMEOUT};
use super::BuildService;
use crate::error::from_envd;
use crate::store::BuildRow;
use crate::store::TemplateOrigin;

/// Changes whenever what the runner does around a recipe changes (pre/post steps, defaults),
/// so templates built by an older runner are rebuilt.
pub(super) const RUNNER_VERSION: &str = "runner-1";

/// How long a build's capsule may take to start.
const BOOT_DEADLINE: Duration = Duration::from_secs(300);
/// Why a build stopped short.
pub(super) enum Stop {
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

/// A running build: its record's logs, live channel and capsule.
pub(super) struct Run<'a> {
    pub(super) svc: &'a BuildService,
    pub(super) row: BuildRow,
    pub(super) logs: Vec<BuildLog>,
    /// The build's capsule, set as soon as it exists so clean-up finds it after a cancel.
    pub(super) capsule: Arc<Mutex<Option<String>>>,
    /// The disk an OCI image was made into (host, snapshot id), removed after the build.
    pub(super) image: Arc<Mutex<Option<(String, String)>>>,
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
        let host = self.svc.pool.place(PLATFORM_TEAM_ID, &spec, &[]).await?;
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
            proxy: None,
            network: None,
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
}
