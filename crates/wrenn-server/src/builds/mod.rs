//! Template builds: an admin's recipe run step by step in an ordinary capsule of the platform
//! team, ending in a platform template every team can boot.
//!
//! Split by concern: `recipe` (the language: parsing, health checks, `$VAR` expansion),
//! `archive` (the uploaded files `COPY` takes, checked and kept as one tar), `runner` (one
//! build from capsule to template, cancellable at any await), `live` (what followers of a
//! running build see), `builtin` (the templates the platform builds itself on first start).
//!
//! Invariants: a build's status only moves forward, by conditional updates (`store/builds.rs`),
//! so a cancel racing the runner's end leaves exactly one outcome; whatever the outcome, the
//! build's capsule is destroyed and its archive removed; a build interrupted by a control-plane
//! stop is marked failed on the next start (its capsule destroyed), a pending one runs then.

pub mod archive;
pub mod builtin;
pub mod live;
pub mod recipe;
mod runner;
mod steps;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix, PLATFORM_TEAM_ID};
use wrenn_api::{
    validate_template_name, ApiError, Build, BuildStatus, CreateBuildRequest, ErrorCode,
    EventActor, EventKind, Template, DEFAULT_DISK_SIZE_MB, DEFAULT_MEMORY_MB, MAX_DISK_SIZE_MB,
    MAX_MEMORY_MB, MAX_VCPUS,
};

use crate::capsules::{CapsuleService, Emitter};
use crate::hosts::pool::HostPool;
use crate::store::{BuildRow, NewBuild, Store};
pub use live::{Follower, LiveEvent, LiveLogs};

type Result<T> = std::result::Result<T, ApiError>;

/// Builds listed by `GET /v1/admin/builds` (newest first).
const LIST_LIMIT: u32 = 200;
/// Smallest memory a build may ask for (package managers need room).
const MIN_BUILD_MEMORY_MB: u32 = 256;

/// What the operator decides about builds.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Where uploaded archives wait for their build.
    pub dir: PathBuf,
    /// This control-plane replica (its builds are its own to fail after a restart).
    pub replica: String,
    /// Builds that run at once; later ones wait `pending`.
    pub concurrency: usize,
    /// A CA bundle (PEM) guests of builds trust besides their own: installed into the system
    /// store and pointed to by `SSL_CERT_FILE`, `REQUESTS_CA_BUNDLE`, `PIP_CERT` and
    /// `NODE_EXTRA_CA_CERTS` while the recipe runs (for networks that inspect TLS).
    pub guest_ca_bundle: Option<PathBuf>,
}

pub struct BuildService {
    store: Store,
    capsules: Arc<CapsuleService>,
    pool: Arc<HostPool>,
    events: Emitter,
    live: LiveLogs,
    cfg: BuildConfig,
    /// Cancellation of each build this process runs or queues.
    running: Mutex<HashMap<String, CancellationToken>>,
    /// Registry credentials of queued and running builds (memory only: never stored).
    credentials: Mutex<HashMap<String, wrenn_host::RegistryCredentials>>,
    slots: Arc<Semaphore>,
    /// Stops every build when the control plane stops (they end `failed` on the next start).
    shutdown: CancellationToken,
}

/// A build as submitted, checked.
pub struct BuildPlan {
    pub name: String,
    /// `""` when the build starts from `base_image`.
    pub base_template: String,
    pub base_image: Option<String>,
    pub registry_auth: Option<wrenn_api::RegistryAuth>,
    pub recipe: Vec<String>,
    pub steps: Vec<recipe::Step>,
    pub healthcheck: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub skip_pre_post: bool,
}

impl BuildService {
    pub fn new(
        store: Store,
        capsules: Arc<CapsuleService>,
        pool: Arc<HostPool>,
        events: Emitter,
        cfg: BuildConfig,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self {
            slots: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            store,
            capsules,
            pool,
            events,
            live: LiveLogs::default(),
            cfg,
            running: Mutex::new(HashMap::new()),
            credentials: Mutex::new(HashMap::new()),
            shutdown,
        })
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, CancellationToken>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn credentials(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, wrenn_host::RegistryCredentials>> {
        self.credentials.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks a request: name, base, recipe, health check and shape (400 naming what is wrong;
    /// 409 for a name that is taken or reserved for a built-in template).
    pub async fn plan(&self, req: CreateBuildRequest) -> Result<BuildPlan> {
        let plan = self.plan_unchecked(req)?;
        let name = &plan.name;
        if builtin::is_builtin(name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("{name:?} is reserved for a built-in template"),
            ));
        }
        let platform = self.platform_template_names().await?;
        if platform.contains(name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("template {name:?} exists (delete it first to rebuild it)"),
            ));
        }
        if let Some(b) = self.store.active_build_named(name).await? {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("build {} is already making template {name:?}", b.build.id),
            ));
        }
        if plan.base_image.is_none() && !platform.contains(&plan.base_template) {
            return Err(ApiError::invalid(format!(
                "unknown base_template {:?} (platform templates: {})",
                plan.base_template,
                platform.join(", ")
            )));
        }
        Ok(plan)
    }

    /// The request's own checks (fields, recipe, health check, shape), nothing about what
    /// exists.
    pub fn plan_unchecked(&self, req: CreateBuildRequest) -> Result<BuildPlan> {
        plan_fields(req)
    }

    /// Names of every template a build may start from or collide with: the hosts' base
    /// images and the platform team's built templates.
    async fn platform_template_names(&self) -> Result<Vec<String>> {
        let mut names = self.pool.base_image_names().await?;
        for t in self.store.list_templates(PLATFORM_TEAM_ID).await? {
            names.push(t.template.name);
        }
        Ok(names)
    }

    /// Queues a checked build. `archive` is the uploaded file (any of tar, tar.gz, zip),
    /// checked and kept as a tar until the build ends.
    pub async fn submit(
        self: &Arc<Self>,
        plan: BuildPlan,
        archive: Option<&Path>,
        builtin_key: Option<String>,
        actor: &EventActor,
    ) -> Result<Build> {
        let builtin = builtin_key.is_some();
        let id = new_id(prefix::BUILD);
        let copies = plan.steps.iter().find(|s| s.copies());
        let kept = match (archive, copies) {
            (None, Some(step)) => {
                return Err(ApiError::invalid(format!(
                    "recipe line {} copies files but no archive was uploaded",
                    step.line
                )))
            }
            (None, None) => None,
            (Some(upload), _) => Some(self.keep_archive(&id, upload).await?),
        };
        let hash = match builtin_key {
            Some(k) => k,
            None => recipe_hash(&plan, kept.as_deref())?,
        };
        let new = NewBuild {
            id: &id,
            name: &plan.name,
            base_template: &plan.base_template,
            base_image: plan.base_image.as_deref(),
            recipe: &plan.recipe,
            healthcheck: plan.healthcheck.as_deref(),
            vcpus: plan.vcpus,
            memory_mb: plan.memory_mb,
            disk_size_mb: plan.disk_size_mb,
            skip_pre_post: plan.skip_pre_post,
            total_steps: plan.steps.len() as u32,
            recipe_hash: &hash,
            archive: kept.as_deref().and_then(|p| p.to_str()),
            builtin,
            created_by: &actor.id,
        };
        let row = match self.store.insert_build(&new).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(p) = &kept {
                    let _ = std::fs::remove_file(p);
                }
                return Err(e.into());
            }
        };
        if let Some(a) = &plan.registry_auth {
            self.credentials().insert(
                id.clone(),
                wrenn_host::RegistryCredentials {
                    username: a.username.clone(),
                    password: a.password.clone(),
                },
            );
        }
        info!(build_id = %id, template = %plan.name, base = %plan.base_template, image = ?plan.base_image, steps = plan.steps.len(), "build queued");
        self.events
            .other(
                EventKind::BuildCreate,
                "build",
                &id,
                None,
                actor,
                Some(true),
            )
            .await;
        self.spawn(id);
        Ok(row.build)
    }

    /// Checks an upload and keeps it (as a plain tar) under the builds directory.
    async fn keep_archive(&self, id: &str, upload: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(&self.cfg.dir)
            .map_err(|e| ApiError::internal(format!("builds directory: {e}")))?;
        let out = self.cfg.dir.join(format!("{id}.tar"));
        let (i, o) = (upload.to_path_buf(), out.clone());
        let checked = tokio::task::spawn_blocking(move || archive::normalize(&i, &o))
            .await
            .map_err(|e| ApiError::internal(format!("archive check: {e}")))?;
        match checked {
            Ok(()) => Ok(out),
            Err(e) => {
                let _ = std::fs::remove_file(&out);
                Err(match e {
                    archive::ArchiveError::TooLarge => {
                        ApiError::new(ErrorCode::TooLarge, e.to_string())
                    }
                    other => ApiError::invalid(other.to_string()),
                })
            }
        }
    }

    /// Runs a queued build in the background (when a slot is free).
    fn spawn(self: &Arc<Self>, id: String) {
        let token = self.shutdown.child_token();
        self.running().insert(id.clone(), token.clone());
        let me = self.clone();
        tokio::spawn(async move {
            me.run(&id, token).await;
            me.running().remove(&id);
            me.credentials().remove(&id);
            me.live.close(&id);
        });
    }

    pub async fn list(&self) -> Result<Vec<Build>> {
        Ok(self
            .store
            .list_builds(LIST_LIMIT)
            .await?
            .into_iter()
            .map(|b| b.build)
            .collect())
    }

    pub async fn get(&self, id: &str) -> Result<Build> {
        Ok(self.row(id).await?.build)
    }

    async fn row(&self, id: &str) -> Result<BuildRow> {
        self.store
            .build(id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("build {id} not found")))
    }

    /// Cancels a pending or running build (409 once it has ended). A running one stops at
    /// its current step; its capsule is destroyed before the runner lets go.
    pub async fn cancel(&self, id: &str, actor: &EventActor) -> Result<()> {
        let row = self.row(id).await?;
        use BuildStatus::*;
        if !self
            .store
            .finish_build(id, &[Pending, Running], Cancelled, None)
            .await?
        {
            let now = self.row(id).await?.build.status;
            return Err(ApiError::invalid_state(format!(
                "build {id} has already ended ({})",
                now.as_str()
            )));
        }
        info!(
            build_id = id,
            was = row.build.status.as_str(),
            "build cancelled"
        );
        if let Some(t) = self.running().get(id) {
            t.cancel();
        }
        if let Some(archive) = &row.archive {
            let _ = std::fs::remove_file(archive);
        }
        self.live.publish(
            id,
            LiveEvent::Status {
                status: Cancelled,
                error: None,
            },
        );
        self.events
            .other(EventKind::BuildCancel, "build", id, None, actor, Some(true))
            .await;
        Ok(())
    }

    /// A follower of build `id`: the record as it is now, and what comes next.
    pub async fn follow(&self, id: &str) -> Result<(Build, Follower)> {
        // Follow first, read second: nothing falls between the two (see `live`).
        let follower = self.live.follow(id);
        let build = match self.get(id).await {
            Ok(b) => b,
            Err(e) => {
                self.live.prune(|b| self.running().contains_key(b));
                return Err(e);
            }
        };
        Ok((build, follower))
    }

    /// Drops live channels of builds that are not running here and have no followers.
    pub fn prune_followers(&self) {
        let running: Vec<String> = self.running().keys().cloned().collect();
        self.live.prune(|b| running.iter().any(|r| r == b));
    }

    /// After a start: builds this replica was running when it stopped are failed (their
    /// capsules destroyed); pending ones are queued again (whichever replica starts one first
    /// runs it).
    pub async fn recover(self: &Arc<Self>) -> Result<()> {
        use BuildStatus::*;
        for row in self
            .store
            .builds_in(&[Running], Some(&self.cfg.replica))
            .await?
        {
            let id = row.build.id.clone();
            let reason = "interrupted: the control plane stopped during the build";
            if self
                .store
                .finish_build(&id, &[Running], Failed, Some(reason))
                .await?
            {
                warn!(build_id = %id, "build interrupted by a restart; failed");
                self.events
                    .build_finished(&id, &EventActor::system("build-recovery"), Err(reason))
                    .await;
            }
            if let Some(capsule) = &row.build.sandbox_id {
                self.destroy_capsule(capsule).await;
            }
            if let Some(a) = &row.archive {
                let _ = std::fs::remove_file(a);
            }
        }
        for row in self.store.builds_in(&[Pending], None).await? {
            info!(build_id = %row.build.id, "queued build resumes after a restart");
            self.spawn(row.build.id);
        }
        Ok(())
    }

    async fn destroy_capsule(&self, capsule_id: &str) {
        let actor = EventActor::system("template-build");
        if let Err(e) = self
            .capsules
            .destroy(PLATFORM_TEAM_ID, capsule_id, &actor)
            .await
        {
            if e.code != ErrorCode::NotFound {
                warn!(capsule_id, error = %e.message, "cannot destroy a build's capsule");
            }
        }
    }

    /// `GET /v1/admin/templates`: every team's templates and the platform's (with `team_id`).
    pub async fn list_all_templates(&self) -> Result<Vec<Template>> {
        let usage = self.capsules.template_disk_usage().await?;
        let rows = self.store.list_all_templates().await?;
        let platform_snapshots: std::collections::HashMap<&str, &str> = rows
            .iter()
            .filter(|t| t.team_id == PLATFORM_TEAM_ID)
            .map(|t| (t.template.name.as_str(), t.snapshot_id.as_str()))
            .collect();
        let mut out = self.capsules.list_templates(PLATFORM_TEAM_ID, None).await?;
        for t in &mut out {
            t.disk_usage_bytes = Some(match platform_snapshots.get(t.name.as_str()) {
                Some(id) => usage.snapshots.get(*id).copied().unwrap_or(t.size_bytes),
                None => usage.images.get(&t.name).copied().unwrap_or(0),
            });
        }
        for t in &rows {
            if t.team_id != PLATFORM_TEAM_ID {
                let mut tpl = t.template.clone();
                tpl.team_id = Some(t.team_id.clone());
                tpl.disk_usage_bytes = usage.snapshots.get(&t.snapshot_id).copied();
                out.push(tpl);
            }
        }
        Ok(out)
    }

    /// `DELETE /v1/admin/templates/{name}`: a built platform template (404 unknown; 403 for
    /// the hosts' base images and the built-in templates). Capsules already created from it
    /// keep running: its files stay on the host until the last of them is gone.
    pub async fn delete_template(&self, name: &str, actor: &EventActor) -> Result<()> {
        let host_templates = self.pool.base_image_names().await?;
        if host_templates.iter().any(|t| t == name) {
            return Err(ApiError::forbidden(format!(
                "{name:?} is a host base image and cannot be deleted"
            )));
        }
        match self.store.template(PLATFORM_TEAM_ID, name).await? {
            Some(t) if t.template.protected => {
                return Err(ApiError::forbidden(format!(
                    "{name:?} is a built-in template and cannot be deleted"
                )))
            }
            Some(_) => {}
            None => return Err(ApiError::not_found(format!("template {name:?} not found"))),
        }
        self.capsules
            .delete_template(PLATFORM_TEAM_ID, name, actor)
            .await
    }
}

/// The request's own checks (fields, recipe, health check, shape).
fn plan_fields(req: CreateBuildRequest) -> Result<BuildPlan> {
    let name = req
        .name
        .ok_or_else(|| ApiError::invalid("name is required"))?;
    validate_template_name(&name).map_err(ApiError::invalid)?;
    let (base_template, base_image) = match (req.base_template, req.base_image) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give base_template or base_image, not both",
            ))
        }
        (None, Some(image)) => {
            validate_image_reference(&image)?;
            (String::new(), Some(image))
        }
        (template, None) => {
            let t = template.unwrap_or_else(|| "minimal".into());
            validate_template_name(&t)
                .map_err(|e| ApiError::invalid(format!("base_template: {e}")))?;
            (t, None)
        }
    };
    if req.registry_auth.is_some() && base_image.is_none() {
        return Err(ApiError::invalid("registry_auth goes with base_image"));
    }
    if req.recipe.is_empty() {
        return Err(ApiError::invalid(
            "recipe must hold at least one instruction",
        ));
    }
    let steps = recipe::parse(&req.recipe).map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(h) = &req.healthcheck {
        recipe::parse_healthcheck(h).map_err(ApiError::invalid)?;
    }
    let vcpus = req.vcpus.unwrap_or(1);
    if !(1..=MAX_VCPUS).contains(&vcpus) {
        return Err(ApiError::invalid(format!(
            "vcpus must be 1-{MAX_VCPUS}, got {vcpus}"
        )));
    }
    let memory_mb = req.memory_mb.unwrap_or(DEFAULT_MEMORY_MB);
    if !(MIN_BUILD_MEMORY_MB..=MAX_MEMORY_MB).contains(&memory_mb) {
        return Err(ApiError::invalid(format!(
            "memory_mb must be {MIN_BUILD_MEMORY_MB}-{MAX_MEMORY_MB}, got {memory_mb}"
        )));
    }
    let disk_size_mb = req.disk_size_mb.unwrap_or(DEFAULT_DISK_SIZE_MB);
    if !(1024..=MAX_DISK_SIZE_MB).contains(&disk_size_mb) {
        return Err(ApiError::invalid(format!(
            "disk_size_mb must be 1024-{MAX_DISK_SIZE_MB}, got {disk_size_mb}"
        )));
    }
    Ok(BuildPlan {
        name,
        base_template,
        base_image,
        registry_auth: req.registry_auth,
        recipe: req.recipe,
        steps,
        healthcheck: req.healthcheck,
        vcpus,
        memory_mb,
        disk_size_mb,
        skip_pre_post: req.skip_pre_post,
    })
}

/// An OCI image reference, roughly: `[registry/]repository[:tag][@digest]` without spaces
/// (the host parses it fully when it pulls).
fn validate_image_reference(r: &str) -> Result<()> {
    let ok = !r.is_empty()
        && r.len() <= wrenn_api::MAX_IMAGE_REFERENCE
        && r.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/:@".contains(c))
        && !r.starts_with(['/', ':', '@', '-', '.']);
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "base_image {r:?} is not an image reference (registry/repository:tag)"
        )))
    }
}

/// What a build makes, as a digest: equal digests make equal templates (the built-in
/// templates are rebuilt when their recipe changes, and only then).
fn recipe_hash(plan: &BuildPlan, archive: Option<&Path>) -> Result<String> {
    let mut h = Sha256::new();
    for part in [
        plan.base_template.as_str(),
        plan.base_image.as_deref().unwrap_or(""),
        plan.healthcheck.as_deref().unwrap_or(""),
        &format!(
            "{}/{}/{}/{}",
            plan.vcpus, plan.memory_mb, plan.disk_size_mb, plan.skip_pre_post
        ),
        runner::RUNNER_VERSION,
    ] {
        h.update(part.as_bytes());
        h.update([0]);
    }
    for line in &plan.recipe {
        h.update(line.as_bytes());
        h.update([0]);
    }
    if let Some(p) = archive {
        let mut f = std::fs::File::open(p)
            .map_err(|e| ApiError::internal(format!("reading the archive: {e}")))?;
        std::io::copy(&mut f, &mut h)
            .map_err(|e| ApiError::internal(format!("reading the archive: {e}")))?;
    }
    Ok(hex::encode(&h.finalize()[..16]))
}
