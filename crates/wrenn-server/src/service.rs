//! What the capsule API means: validation, state transitions and calls to the host.
//!
//! State machine (this slice): `starting` → `running` → `stopping` → `stopped`, and any
//! non-terminal state → `error` when the host fails. Rows are never deleted: `GET` answers any
//! state, the list hides `stopped` and `error`.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix};
use wrenn_api::{
    validate_template_name, ApiError, BackgroundExecResponse, Capsule, CapsuleStatus,
    CreateCapsuleRequest, CreateSnapshotRequest, ErrorCode, ExecRequest, ExecResponse,
    OutputEncoding, ProcessEntry, ProcessListResponse, Template, DEFAULT_EXEC_TIMEOUT_SEC,
    MAX_EXEC_TIMEOUT_SEC, MAX_TAG_LEN,
};

use crate::activity::{Activity, Busy};
use crate::audit::{self, AuditLog};
use crate::error::from_agent;
use crate::events::EventBus;
use crate::host::HostClient;
use crate::pool::HostPool;
use crate::store::{CapsuleRow, NewTemplate, Store};
use wrenn_api::{Event, EventActor, EventResource};

/// How long DELETE waits for the host to finish before answering 202 anyway.
const DESTROY_WAIT: Duration = Duration::from_secs(5);

pub struct CapsuleService {
    store: Store,
    pool: Arc<HostPool>,
    activity: Activity,
    events: Emitter,
}

/// Publishes capsule events with the capsule as it is now (cheap to clone into tasks).
#[derive(Clone)]
pub struct Emitter {
    store: Store,
    bus: Arc<EventBus>,
    audit: AuditLog,
}

impl Emitter {
    /// Writes the event's audit entry (if it stands for one), then publishes it.
    async fn emit(&self, ev: Event) {
        if let Some(r) = audit::from_event(&ev) {
            self.audit.record(r).await;
        }
        self.bus.publish(ev);
    }

    /// A capsule event, carrying the capsule as it is now and its team.
    async fn about_capsule(
        &self,
        event: String,
        id: &str,
        actor: EventActor,
        outcome: Option<std::result::Result<(), String>>,
        metadata: std::collections::BTreeMap<String, String>,
    ) {
        let row = self.store.capsule(id).await.ok().flatten();
        self.emit(Event {
            event,
            outcome: outcome
                .as_ref()
                .map(|o| if o.is_ok() { "success" } else { "error" }.into()),
            resource: EventResource {
                id: id.to_string(),
                kind: "capsule".into(),
            },
            actor,
            metadata,
            error: outcome.and_then(|o| o.err()),
            team_id: row.as_ref().map(|r| r.team_id.clone()),
            sandbox: row.map(|r| r.capsule),
            timestamp: chrono::Utc::now(),
        })
        .await;
    }

    /// `capsule.<action>` with its outcome (`Err` carries the error).
    pub async fn action(
        &self,
        action: &str,
        id: &str,
        actor: &EventActor,
        outcome: std::result::Result<(), String>,
        metadata: &[(&str, &str)],
    ) {
        let metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.about_capsule(
            format!("capsule.{action}"),
            id,
            actor.clone(),
            Some(outcome),
            metadata,
        )
        .await;
    }

    /// `capsule.destroy` by the system: what a failed create had made was torn down.
    pub async fn cleaned_up_after_failed_create(
        &self,
        id: &str,
        outcome: std::result::Result<(), String>,
    ) {
        let actor = EventActor::system("create-cleanup");
        let reason = [("reason", "cleanup_after_create_error")];
        self.action("destroy", id, &actor, outcome, &reason).await;
    }

    /// `capsule.state.changed` from `from` to `to`.
    pub async fn changed(
        &self,
        id: &str,
        from: CapsuleStatus,
        to: CapsuleStatus,
        reason: Option<&str>,
    ) {
        let mut metadata: std::collections::BTreeMap<String, String> =
            [("from", from.as_str()), ("to", to.as_str())]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        if let Some(r) = reason {
            metadata.insert("reason".into(), r.into());
        }
        self.about_capsule(
            "capsule.state.changed".into(),
            id,
            EventActor::system("wrenn"),
            None,
            metadata,
        )
        .await;
    }

    /// An event about something other than a capsule (templates, hosts).
    pub async fn other(
        &self,
        event: &str,
        kind: &str,
        id: &str,
        team_id: Option<&str>,
        actor: &EventActor,
        outcome: Option<bool>,
    ) {
        self.emit(Event {
            event: event.into(),
            outcome: outcome.map(|ok| if ok { "success" } else { "error" }.into()),
            resource: EventResource {
                id: id.to_string(),
                kind: kind.into(),
            },
            actor: actor.clone(),
            metadata: Default::default(),
            error: None,
            sandbox: None,
            team_id: team_id.map(Into::into),
            timestamp: chrono::Utc::now(),
        })
        .await;
    }
}

/// Why a capsule is paused (kept in its row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// `POST /pause`.
    User,
    /// The inactivity timeout passed.
    TtlExpired,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::User => "user",
            PauseReason::TtlExpired => "ttl_expired",
        }
    }
}

type Result<T> = std::result::Result<T, ApiError>;

impl CapsuleService {
    pub fn new(store: Store, pool: Arc<HostPool>, bus: Arc<EventBus>) -> Self {
        Self {
            activity: Activity::new(store.clone()),
            events: Emitter {
                store: store.clone(),
                bus,
                audit: AuditLog::new(store.clone()),
            },
            store,
            pool,
        }
    }

    pub fn pool(&self) -> &Arc<HostPool> {
        &self.pool
    }

    /// Records the capsule as `starting` and boots it in the background.
    pub async fn create(
        &self,
        team_id: &str,
        req: CreateCapsuleRequest,
        actor: &EventActor,
    ) -> Result<Capsule> {
        let mut spec = req.validate().map_err(ApiError::invalid)?;
        let templates = self
            .pool
            .any()
            .await?
            .templates()
            .await
            .map_err(from_agent)?;
        // A platform template, or one of the team's snapshots (whose machine it restores, on
        // the host that holds it).
        let (from, pinned) = if templates.contains(&spec.template) {
            (None, None)
        } else if let Some(t) = self.store.template(team_id, &spec.template).await? {
            spec.vcpus = t.template.vcpus.unwrap_or(spec.vcpus);
            spec.memory_mb = t.template.memory_mb.unwrap_or(spec.memory_mb);
            spec.disk_size_mb = t.disk_size_mb;
            (
                Some(wrenn_agent::UserSnapshot { id: t.snapshot_id }),
                Some(t.host_id),
            )
        } else {
            return Err(ApiError::invalid(format!(
                "unknown template {:?} (platform templates: {}; see GET /v1/snapshots for the team's)",
                spec.template,
                templates.join(", ")
            )));
        };
        let host = match &pinned {
            Some(h) => self.pool.online(h).await?,
            None => self.pool.place(team_id, &spec).await?,
        };
        let cap = host.capacity().await.map_err(from_agent)?;
        if spec.vcpus > cap.cpus {
            return Err(ApiError::invalid(format!(
                "vcpus {} is more than this host has ({} CPUs)",
                spec.vcpus, cap.cpus
            )));
        }
        if u64::from(spec.memory_mb) > cap.memory_mb {
            return Err(ApiError::invalid(format!(
                "memory_mb {} is more than this host can give one capsule ({} MiB)",
                spec.memory_mb, cap.memory_mb
            )));
        }
        if u64::from(spec.disk_size_mb) > cap.disk_free_mb {
            return Err(ApiError::invalid(format!(
                "disk_size_mb {} is more than the free space on this host ({} MiB)",
                spec.disk_size_mb, cap.disk_free_mb
            )));
        }
        let id = new_id(prefix::CAPSULE);
        let row = self
            .store
            .insert_capsule(&id, team_id, host.host_id(), &spec)
            .await?;
        info!(capsule_id = %id, team_id, host_id = host.host_id(), template = %spec.template, "capsule create accepted");
        let store = self.store.clone();
        let (events, actor) = (self.events.clone(), actor.clone());
        tokio::spawn(async move {
            match host.create(&id, &spec, from.as_ref()).await {
                Ok(info) => match store
                    .mark_running(&id, &info.guest_ip, &info.host_ip, &info.metadata)
                    .await
                {
                    Ok(true) => {
                        events.action("create", &id, &actor, Ok(()), &[]).await;
                        events
                            .changed(&id, CapsuleStatus::Starting, CapsuleStatus::Running, None)
                            .await;
                    }
                    // Destroyed while booting: the VM nobody wants goes away again.
                    Ok(false) => {
                        let _ = host.destroy(&id).await;
                    }
                    Err(e) => {
                        warn!(capsule_id = %id, error = %e, "cannot record the running capsule; destroying it");
                        let outcome = host
                            .destroy(&id)
                            .await
                            .map(|_| ())
                            .map_err(|e| e.to_string());
                        let _ = store
                            .mark_error(&id, "control plane could not record the capsule")
                            .await;
                        events.cleaned_up_after_failed_create(&id, outcome).await;
                    }
                },
                Err(e) => {
                    warn!(capsule_id = %id, error = %e, "capsule failed to start");
                    let _ = store.mark_error(&id, &e.to_string()).await;
                    events
                        .action("create", &id, &actor, Err(e.to_string()), &[])
                        .await;
                    events
                        .changed(
                            &id,
                            CapsuleStatus::Starting,
                            CapsuleStatus::Error,
                            Some("create_failed"),
                        )
                        .await;
                    // The host tore down whatever the failed create had made.
                    events.cleaned_up_after_failed_create(&id, Ok(())).await;
                }
            }
        });
        Ok(row.capsule)
    }

    /// The capsule if it belongs to the team; another team's capsule is "not found".
    pub async fn get(&self, team_id: &str, id: &str) -> Result<Capsule> {
        Ok(self.with_activity(self.owned(team_id, id).await?.capsule))
    }

    pub async fn list(&self, team_id: &str) -> Result<Vec<Capsule>> {
        Ok(self
            .store
            .list_live_capsules(team_id)
            .await?
            .into_iter()
            .map(|r| self.with_activity(r.capsule))
            .collect())
    }

    /// Every team's live capsules (platform admins).
    pub async fn list_all(&self) -> Result<Vec<Capsule>> {
        Ok(self
            .store
            .list_all_live_capsules()
            .await?
            .into_iter()
            .map(|r| self.with_activity(r.capsule))
            .collect())
    }

    /// The capsule with its activity recorded since the last flush.
    fn with_activity(&self, mut c: Capsule) -> Capsule {
        if let Some(t) = self.activity.last_active(&c.id) {
            if c.last_active_at.is_none_or(|db| db < t) {
                c.last_active_at = Some(t);
            }
        }
        c
    }

    /// Starts destruction and waits briefly for it; repeating it is harmless.
    pub async fn destroy(&self, team_id: &str, id: &str, actor: &EventActor) -> Result<Capsule> {
        let row = self.owned(team_id, id).await?;
        if row.capsule.status.is_terminal() {
            return Ok(row.capsule);
        }
        let host = self.pool.client_for(&row).await?;
        use CapsuleStatus::*;
        self.store
            .transition(
                id,
                &[
                    Pending,
                    Starting,
                    Running,
                    Pausing,
                    Paused,
                    Resuming,
                    Snapshotting,
                    Missing,
                    Stopping,
                ],
                Stopping,
            )
            .await?;
        let (store, id_owned) = (self.store.clone(), id.to_string());
        let (events, actor, was) = (self.events.clone(), actor.clone(), row.capsule.status);
        let task = tokio::spawn(async move {
            match host.destroy(&id_owned).await {
                Ok(_) => {
                    let _ = store.transition(&id_owned, &[Stopping], Stopped).await;
                    info!(capsule_id = %id_owned, "capsule destroyed");
                    events
                        .action("destroy", &id_owned, &actor, Ok(()), &[])
                        .await;
                    events.changed(&id_owned, was, Stopped, None).await;
                }
                Err(e) => {
                    warn!(capsule_id = %id_owned, error = %e, "destroy failed");
                    let _ = store
                        .mark_error(&id_owned, &format!("destroy failed: {e}"))
                        .await;
                    events
                        .action("destroy", &id_owned, &actor, Err(e.to_string()), &[])
                        .await;
                }
            }
        });
        let _ = tokio::time::timeout(DESTROY_WAIT, task).await;
        Ok(self.owned(team_id, id).await?.capsule)
    }

    /// `POST /v1/snapshots`: a live snapshot of a running capsule (shown `snapshotting` for
    /// the moment it is frozen and copied; it runs on). Names are the team's and immutable:
    /// an existing one is 409 unless `overwrite`, which replaces it.
    pub async fn create_snapshot(
        &self,
        team_id: &str,
        req: CreateSnapshotRequest,
        overwrite: bool,
        actor: &EventActor,
    ) -> Result<Template> {
        use CapsuleStatus::*;
        let name = match req.name {
            Some(n) => n,
            None => format!("template-{:08x}", rand::random::<u32>()),
        };
        validate_template_name(&name).map_err(ApiError::invalid)?;
        let platform = self
            .pool
            .any()
            .await?
            .templates()
            .await
            .map_err(from_agent)?;
        if platform.contains(&name) {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("{name:?} is a platform template"),
            ));
        }
        let row = self.owned(team_id, &req.sandbox_id).await?;
        let id = req.sandbox_id.as_str();
        let host = self.pool.client_for(&row).await?;
        if !overwrite && self.store.template(team_id, &name).await?.is_some() {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("template {name:?} exists (use ?overwrite=true to replace it)"),
            ));
        }
        if !self.store.transition(id, &[Running], Snapshotting).await? {
            return Err(ApiError::invalid_state(format!(
                "capsule {id} is {}, not running",
                row.capsule.status.as_str()
            )));
        }
        let _busy = self.hold(id);
        let snapshot_id = new_id(prefix::SNAPSHOT);
        let taken = host.snapshot(id, &snapshot_id).await;
        let _ = self.store.transition(id, &[Snapshotting], Running).await;
        let meta = taken.map_err(from_agent)?;
        let new = NewTemplate {
            team_id,
            name: &name,
            snapshot_id: &snapshot_id,
            host_id: host.host_id(),
            source_capsule: id,
            vcpus: meta.vcpus,
            memory_mb: meta.memory_mb,
            disk_size_mb: meta.disk_mb as u32,
            size_bytes: meta.size_bytes,
        };
        let replaced = if overwrite {
            self.store.delete_template(team_id, &name).await?
        } else {
            None
        };
        if !self.store.insert_template(&new).await? {
            // Someone took the name meanwhile: this snapshot is nobody's.
            let _ = host.delete_snapshot(&snapshot_id).await;
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("template {name:?} exists"),
            ));
        }
        if let Some(old) = replaced {
            self.delete_snapshot_files(&old.host_id, &old.snapshot_id)
                .await;
        }
        info!(capsule_id = %id, template = %name, snapshot_id, size_bytes = meta.size_bytes, "snapshot template created");
        self.events
            .other(
                "template.snapshot.create",
                "template",
                &name,
                Some(team_id),
                actor,
                Some(true),
            )
            .await;
        Ok(self
            .store
            .template(team_id, &name)
            .await?
            .ok_or_else(|| ApiError::internal("snapshot template vanished"))?
            .template)
    }

    /// `GET /metrics`: running and paused capsules (and those between the two); others 404.
    pub async fn metrics(
        &self,
        team_id: &str,
        id: &str,
        range: Option<&str>,
    ) -> Result<serde_json::Value> {
        use CapsuleStatus::*;
        let range = range.unwrap_or("10m");
        if wrenn_agent::metrics::Tier::for_range(range).is_none() {
            return Err(ApiError::invalid(format!(
                "range must be one of 5m, 10m, 1h, 2h, 6h, 12h, 24h; got {range:?}"
            )));
        }
        let row = self.owned(team_id, id).await?;
        if !matches!(
            row.capsule.status,
            Running | Pausing | Paused | Resuming | Snapshotting
        ) {
            return Err(ApiError::not_found(format!(
                "no metrics for capsule {id}: it is {}",
                row.capsule.status.as_str()
            )));
        }
        let points = self
            .pool
            .client_for(&row)
            .await?
            .metrics(id, range)
            .await
            .map_err(from_agent)?;
        Ok(serde_json::json!({ "sandbox_id": id, "range": range, "points": points }))
    }

    /// `GET /v1/snapshots`: the team's snapshots and the platform's base templates.
    pub async fn list_templates(&self, team_id: &str, kind: Option<&str>) -> Result<Vec<Template>> {
        if let Some(k) = kind {
            if k != "base" && k != "snapshot" {
                return Err(ApiError::invalid(format!(
                    "type must be base or snapshot, not {k:?}"
                )));
            }
        }
        let mut out = Vec::new();
        if kind != Some("snapshot") {
            let host = self.pool.any().await?;
            for (name, size_bytes, built) in host.base_templates().await.map_err(from_agent)? {
                out.push(Template {
                    name,
                    kind: "base".into(),
                    vcpus: None,
                    memory_mb: None,
                    size_bytes: size_bytes as i64,
                    created_at: chrono::DateTime::<chrono::Utc>::from(built),
                    platform: true,
                    metadata: None,
                });
            }
        }
        if kind != Some("base") {
            out.extend(
                self.store
                    .list_templates(team_id)
                    .await?
                    .into_iter()
                    .map(|t| t.template),
            );
        }
        Ok(out)
    }

    /// `DELETE /v1/snapshots/{name}`: the name goes at once; the files once no capsule uses them.
    pub async fn delete_template(
        &self,
        team_id: &str,
        name: &str,
        actor: &EventActor,
    ) -> Result<()> {
        if self
            .pool
            .any()
            .await?
            .templates()
            .await
            .map_err(from_agent)?
            .iter()
            .any(|t| t == name)
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("{name:?} is a platform template and cannot be deleted"),
            ));
        }
        let row = self
            .store
            .delete_template(team_id, name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("template {name:?} not found")))?;
        self.delete_snapshot_files(&row.host_id, &row.snapshot_id)
            .await;
        self.events
            .other(
                "template.snapshot.delete",
                "template",
                name,
                Some(team_id),
                actor,
                Some(true),
            )
            .await;
        Ok(())
    }

    /// Deletes a snapshot's files on its host (logged, not failed, when that is not possible
    /// now: the name is gone either way).
    async fn delete_snapshot_files(&self, host_id: &str, snapshot_id: &str) {
        match self.pool.get(host_id) {
            Some(h) => {
                if let Err(e) = h.delete_snapshot(snapshot_id).await {
                    warn!(snapshot_id, host_id, error = %e, "cannot delete snapshot files");
                }
            }
            None => warn!(
                snapshot_id,
                host_id, "snapshot files stay: their host is not connected"
            ),
        }
    }

    /// `running` → `pausing`, and the host saves the capsule in the background → `paused`.
    /// A failed pause goes back to `running` if the host still runs it, `error` otherwise.
    pub async fn pause(&self, team_id: &str, id: &str, actor: &EventActor) -> Result<Capsule> {
        let row = self.owned(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.begin_pause(
            id,
            row.capsule.status,
            PauseReason::User,
            host,
            actor.clone(),
        )
        .await?;
        Ok(self.owned(team_id, id).await?.capsule)
    }

    /// `running` → `pausing`, then the host's pause in the background.
    async fn begin_pause(
        &self,
        id: &str,
        status: CapsuleStatus,
        reason: PauseReason,
        host: Arc<dyn HostClient>,
        actor: EventActor,
    ) -> Result<()> {
        use CapsuleStatus::*;
        if !self.store.transition(id, &[Running], Pausing).await? {
            return Err(ApiError::invalid_state(format!(
                "capsule {id} is {}, not running",
                status.as_str()
            )));
        }
        self.store.set_pause_reason(id, reason.as_str()).await?;
        info!(capsule_id = %id, reason = reason.as_str(), "capsule pause accepted");
        let (store, id_owned) = (self.store.clone(), id.to_string());
        let activity = self.activity.clone();
        let events = self.events.clone();
        tokio::spawn(async move {
            let id = id_owned;
            let meta: &[(&str, &str)] = match reason {
                PauseReason::TtlExpired => &[("reason", "ttl_expired")],
                PauseReason::User => &[],
            };
            match host.pause(&id).await {
                Ok(()) => {
                    let _ = store.transition(&id, &[Pausing], Paused).await;
                    events.action("pause", &id, &actor, Ok(()), meta).await;
                    events
                        .changed(&id, Running, Paused, meta.first().map(|m| m.1))
                        .await;
                }
                Err(e) => {
                    let runs_on =
                        host_phase(&*host, &id).await == Some(wrenn_agent::Phase::Running);
                    warn!(capsule_id = %id, error = %e, runs_on, "pause failed");
                    events
                        .action("pause", &id, &actor, Err(e.to_string()), meta)
                        .await;
                    if runs_on {
                        // It runs on, untouched; an auto-pause tries again after another
                        // full timeout rather than at once.
                        let _ = store.transition(&id, &[Pausing], Running).await;
                        activity.touch(&id);
                    } else {
                        let _ = store.mark_error(&id, &format!("pause failed: {e}")).await;
                    }
                }
            }
        });
        Ok(())
    }

    /// `paused` → `resuming`, and the host restores it in the background → `running`. A failed
    /// resume leaves it `paused` (its files intact) if the host still holds it, `error` otherwise.
    pub async fn resume(&self, team_id: &str, id: &str, actor: &EventActor) -> Result<Capsule> {
        use CapsuleStatus::*;
        let row = self.owned(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        if !self.store.transition(id, &[Paused], Resuming).await? {
            return Err(ApiError::invalid_state(format!(
                "capsule {id} is {}, not paused",
                row.capsule.status.as_str()
            )));
        }
        info!(capsule_id = %id, "capsule resume accepted");
        let (store, id_owned) = (self.store.clone(), id.to_string());
        let (events, actor) = (self.events.clone(), actor.clone());
        tokio::spawn(async move {
            let id = id_owned;
            match host.resume(&id).await {
                Ok(info) => {
                    match store
                        .mark_resumed(&id, &info.guest_ip, &info.host_ip, &info.metadata)
                        .await
                    {
                        Ok(true) => {
                            events.action("resume", &id, &actor, Ok(()), &[]).await;
                            events.changed(&id, Paused, Running, None).await;
                        }
                        // Destroyed while resuming: nobody wants the VM any more.
                        Ok(false) => {
                            let _ = host.destroy(&id).await;
                        }
                        Err(e) => warn!(capsule_id = %id, error = %e, "cannot record the resume"),
                    }
                }
                Err(e) => {
                    let still_paused =
                        host_phase(&*host, &id).await == Some(wrenn_agent::Phase::Paused);
                    warn!(capsule_id = %id, error = %e, still_paused, "resume failed");
                    events
                        .action("resume", &id, &actor, Err(e.to_string()), &[])
                        .await;
                    if still_paused {
                        let _ = store.transition(&id, &[Resuming], Paused).await;
                    } else {
                        let _ = store.mark_error(&id, &format!("resume failed: {e}")).await;
                    }
                }
            }
        });
        Ok(self.owned(team_id, id).await?.capsule)
    }

    /// Runs a command: to completion (foreground) or started in the background.
    pub async fn exec(&self, team_id: &str, id: &str, req: ExecRequest) -> Result<ExecOutcome> {
        let row = self.require_running(team_id, id).await?;
        validate_command(&req)?;
        let host = self.pool.client_for(&row).await?;
        if req.background {
            return self
                .start_background(id, req, host)
                .await
                .map(ExecOutcome::Background);
        }
        self.run_foreground(id, req, host)
            .await
            .map(ExecOutcome::Foreground)
    }

    async fn start_background(
        &self,
        id: &str,
        req: ExecRequest,
        host: Arc<dyn HostClient>,
    ) -> Result<BackgroundExecResponse> {
        if let Some(tag) = &req.tag {
            if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.chars().any(|c| c.is_control()) {
                return Err(ApiError::invalid(format!(
                    "tag must be 1-{MAX_TAG_LEN} characters without control characters"
                )));
            }
        }
        self.touch(id);
        let spec = envd_proto::StartSpec {
            command: command_spec(&req),
            tag: req.tag,
        };
        let started = host.start_process(id, spec).await.map_err(from_agent)?;
        Ok(BackgroundExecResponse {
            sandbox_id: id.to_string(),
            cmd: req.cmd,
            pid: started.pid,
            tag: started.tag,
        })
    }

    async fn run_foreground(
        &self,
        id: &str,
        req: ExecRequest,
        host: Arc<dyn HostClient>,
    ) -> Result<ExecResponse> {
        let timeout_sec = match req.timeout_sec {
            None => DEFAULT_EXEC_TIMEOUT_SEC,
            Some(t) if t < 0 => {
                return Err(ApiError::invalid(format!(
                    "timeout_sec must be >= 0, got {t}"
                )))
            }
            // 0 means "no limit": the platform's maximum applies.
            Some(0) => MAX_EXEC_TIMEOUT_SEC,
            Some(t) if t > MAX_EXEC_TIMEOUT_SEC as i64 => {
                return Err(ApiError::invalid(format!(
                    "timeout_sec must be at most {MAX_EXEC_TIMEOUT_SEC}"
                )))
            }
            Some(t) => t as u32,
        };
        let busy = self.hold(id);
        let spec = envd_proto::ExecSpec {
            command: command_spec(&req),
            timeout_ms: timeout_sec as u64 * 1000,
        };
        let out = host.exec(id, spec).await.map_err(from_agent);
        drop(busy);
        let mut out = out?;
        let mut exit_code = out.exit_code;
        if out.timed_out {
            // 124 is what coreutils' `timeout` reports; the note makes the kill visible to
            // clients that only look at stderr.
            exit_code = 124;
            out.stderr.extend_from_slice(
                format!("\n[wrenn] command timed out after {timeout_sec}s and was killed\n")
                    .as_bytes(),
            );
        }
        let (stdout, stderr, encoding) =
            match (String::from_utf8(out.stdout), String::from_utf8(out.stderr)) {
                (Ok(o), Ok(e)) => (o, e, OutputEncoding::Utf8),
                (o, e) => {
                    let b64 = base64::engine::general_purpose::STANDARD;
                    let bytes = |r: std::result::Result<String, std::string::FromUtf8Error>| match r
                    {
                        Ok(s) => s.into_bytes(),
                        Err(e) => e.into_bytes(),
                    };
                    (
                        b64.encode(bytes(o)),
                        b64.encode(bytes(e)),
                        OutputEncoding::Base64,
                    )
                }
            };
        Ok(ExecResponse {
            sandbox_id: id.to_string(),
            cmd: req.cmd,
            stdout,
            stderr,
            exit_code,
            duration_ms: out.duration_ms,
            encoding,
            timed_out: out.timed_out,
        })
    }

    /// Starts a command whose output is streamed (no time limit; the caller may stop it).
    pub async fn exec_stream(
        &self,
        team_id: &str,
        id: &str,
        req: ExecRequest,
    ) -> Result<wrenn_agent::ExecStream> {
        validate_command(&req)?;
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        let spec = envd_proto::ExecSpec {
            command: command_spec(&req),
            timeout_ms: 0,
        };
        host.exec_stream(id, spec).await.map_err(from_agent)
    }

    /// The guest agent of a running capsule, for direct operations (files, attach); using it
    /// counts as activity.
    pub async fn files(&self, team_id: &str, id: &str) -> Result<wrenn_agent::EnvdClient> {
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        host.envd(id).await.map_err(from_agent)
    }

    /// Follows a background process of a running capsule (by pid or tag).
    pub async fn attach(
        &self,
        team_id: &str,
        id: &str,
        selector: &str,
    ) -> Result<wrenn_agent::ExecStream> {
        let envd = self.files(team_id, id).await?;
        envd.attach(selector).await.map_err(from_agent)
    }

    /// Every user process in a running capsule.
    pub async fn processes(&self, team_id: &str, id: &str) -> Result<ProcessListResponse> {
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        let processes = host
            .list_processes(id)
            .await
            .map_err(from_agent)?
            .into_iter()
            .map(|p| ProcessEntry {
                pid: p.pid,
                tag: p.tag,
                cmd: p.cmd,
                args: p.args,
            })
            .collect();
        Ok(ProcessListResponse { processes })
    }

    /// Signals a process chosen by pid or tag; `signal` is `SIGKILL` (default) or `SIGTERM`.
    pub async fn kill_process(
        &self,
        team_id: &str,
        id: &str,
        selector: &str,
        signal: Option<&str>,
    ) -> Result<()> {
        let signal = match signal.unwrap_or("SIGKILL") {
            "SIGKILL" => envd_proto::Signal::Kill,
            "SIGTERM" => envd_proto::Signal::Term,
            other => {
                return Err(ApiError::invalid(format!(
                    "signal must be SIGKILL or SIGTERM, not {other:?}"
                )))
            }
        };
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        host.signal_process(id, selector, signal)
            .await
            .map_err(from_agent)
    }

    /// The capsule if it belongs to the team and is running (404 / 409 otherwise).
    pub async fn require_running(&self, team_id: &str, id: &str) -> Result<CapsuleRow> {
        let row = self.owned(team_id, id).await?;
        if row.capsule.status == CapsuleStatus::Missing {
            return Err(ApiError::new(
                ErrorCode::HostUnavailable,
                format!("capsule {id} is missing: its host is not reachable right now"),
            ));
        }
        if row.capsule.status != CapsuleStatus::Running {
            return Err(ApiError::invalid_state(format!(
                "capsule {id} is {}, not running",
                row.capsule.status.as_str()
            )));
        }
        Ok(row)
    }

    /// Makes the DB agree with what every connected host actually holds (at start-up): hosts
    /// are the source of truth for running and paused capsules. A host that does not answer is
    /// left to the liveness monitor.
    pub async fn reconcile(&self) -> Result<()> {
        for host in self.pool.all() {
            if let Err(e) = self.reconcile_on(host.as_ref()).await {
                warn!(host_id = host.host_id(), error = %e.message, "cannot reconcile with host");
            }
        }
        Ok(())
    }

    /// The periodic reconciler: for every online host, capsules the database says run but the
    /// host does not hold turn `error`, and VMs the host holds for capsules that no longer
    /// exist (or are recorded as ended) are destroyed. Capsules that changed in the last
    /// minute are left alone (an operation may be in flight); every fix is logged.
    pub async fn reconcile_pass(&self) -> Result<()> {
        use CapsuleStatus::*;
        let settle = chrono::Utc::now() - chrono::Duration::seconds(60);
        for host in self.pool.all() {
            let Ok(client) = self.pool.online(host.host_id()).await else {
                continue;
            };
            let Ok(live) = client.list().await else {
                continue;
            };
            let live: std::collections::HashMap<String, wrenn_agent::Phase> =
                live.into_iter().map(|c| (c.id, c.phase)).collect();
            for row in self
                .store
                .capsules_on_host(host.host_id(), &[Running, Paused])
                .await?
            {
                let c = &row.capsule;
                if c.last_updated > settle || live.contains_key(&c.id) {
                    continue;
                }
                warn!(capsule_id = %c.id, host_id = host.host_id(), status = c.status.as_str(), "reconciler: capsule no longer on its host");
                self.store
                    .mark_error(&c.id, "the capsule vanished from its host")
                    .await?;
                self.events
                    .changed(&c.id, c.status, Error, Some("vanished_from_host"))
                    .await;
            }
            for id in live.keys() {
                let orphan = match self.store.capsule(id).await? {
                    None => true,
                    Some(r) => {
                        r.capsule.status.is_terminal() && r.capsule.last_updated < settle
                            || r.host_id.as_deref() != Some(host.host_id())
                    }
                };
                if orphan {
                    warn!(capsule_id = %id, host_id = host.host_id(), "reconciler: destroying a VM no live capsule owns");
                    let outcome = client
                        .destroy(id)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string());
                    self.events
                        .action(
                            "destroy",
                            id,
                            &EventActor::system("reconciler"),
                            outcome,
                            &[("reason", "orphaned")],
                        )
                        .await;
                }
            }
        }
        Ok(())
    }

    async fn reconcile_on(&self, host: &dyn HostClient) -> Result<()> {
        use wrenn_agent::Phase;
        use CapsuleStatus::*;
        let live: std::collections::HashMap<String, Phase> = host
            .list()
            .await
            .map_err(from_agent)?
            .into_iter()
            .map(|c| (c.id, c.phase))
            .collect();
        let rows = self
            .store
            .capsules_on_host(
                host.host_id(),
                &[
                    Pending,
                    Starting,
                    Running,
                    Pausing,
                    Paused,
                    Resuming,
                    Snapshotting,
                    Stopping,
                    Stopped,
                    Error,
                ],
            )
            .await?;
        let mut known = std::collections::HashSet::new();
        for CapsuleRow { capsule: c, .. } in rows {
            known.insert(c.id.clone());
            let on_host = live.get(&c.id).copied();
            match (c.status, on_host) {
                (Stopping | Stopped | Error, _) => {
                    if on_host.is_some() {
                        let _ = host.destroy(&c.id).await;
                    }
                    let _ = self.store.transition(&c.id, &[Stopping], Stopped).await;
                }
                (Pending | Starting, _) => {
                    warn!(capsule_id = %c.id, "capsule lost while starting");
                    let _ = self
                        .store
                        .mark_error(&c.id, "capsule lost while the platform was down")
                        .await;
                    if on_host.is_some() {
                        let _ = host.destroy(&c.id).await;
                    }
                }
                (status, Some(Phase::Running)) if status != Running => {
                    let _ = self.store.transition(&c.id, &[status], Running).await;
                }
                (status, Some(Phase::Paused)) if status != Paused => {
                    let _ = self.store.transition(&c.id, &[status], Paused).await;
                }
                (_, Some(_)) => {}
                (status, None) => {
                    warn!(capsule_id = %c.id, status = status.as_str(), "capsule lost while the platform was down");
                    let _ = self
                        .store
                        .mark_error(&c.id, "capsule lost while the platform was down")
                        .await;
                }
            }
        }
        for id in live.keys().filter(|id| !known.contains(*id)) {
            warn!(capsule_id = %id, "host holds a capsule the control plane does not know; destroying");
            let _ = host.destroy(id).await;
        }
        Ok(())
    }

    /// Records activity on a capsule without making the request wait for the write.
    fn touch(&self, id: &str) {
        self.activity.touch(id);
    }

    /// Marks a capsule in use (never auto-paused) until the guard is dropped.
    pub fn hold(&self, id: &str) -> Busy {
        self.activity.hold(id)
    }

    /// `POST /ping`: resets the inactivity timer of a running capsule (recorded before the
    /// answer, so a client that reads the capsule next sees it).
    pub async fn ping(&self, team_id: &str, id: &str) -> Result<()> {
        self.require_running(team_id, id).await?;
        self.store.touch_capsule(id).await?;
        Ok(())
    }

    /// Marks `error`, with the reason, every capsule whose VM died under it.
    pub async fn record_dead_vms(&self) -> Result<()> {
        for host in self.pool.all() {
            match host.reap_dead().await {
                Ok(dead) => {
                    for (id, reason) in dead {
                        let was = self.store.capsule(&id).await?.map(|r| r.capsule.status);
                        self.store.mark_error(&id, &reason).await?;
                        if let Some(was) = was {
                            self.events
                                .changed(&id, was, CapsuleStatus::Error, Some("vm_died"))
                                .await;
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(host_id = host.host_id(), error = %e, "dead-VM check skipped")
                }
            }
        }
        Ok(())
    }

    /// One pass of the TTL reaper: auto-pauses every running capsule whose inactivity timeout
    /// has passed and that nothing is attached to.
    pub async fn pause_idle(&self) -> Result<()> {
        self.activity.flush().await?;
        let now = chrono::Utc::now();
        for row in self.store.running_with_timeout().await? {
            let host_id = row.host_id.clone().unwrap_or_default();
            // Activity recorded after the flush above counts too.
            let c = &self.with_activity(row.capsule);
            let last = c.last_active_at.or(c.started_at).unwrap_or(c.created_at);
            let idle = now.signed_duration_since(last);
            if idle < chrono::Duration::seconds(i64::from(c.timeout_sec))
                || self.activity.is_busy(&c.id)
            {
                continue;
            }
            info!(capsule_id = %c.id, idle_sec = idle.num_seconds(), timeout_sec = c.timeout_sec, "inactivity timeout: auto-pausing");
            let Ok(host) = self.pool.online(&host_id).await else {
                continue;
            };
            self.begin_pause(
                &c.id,
                c.status,
                PauseReason::TtlExpired,
                host,
                EventActor::system("ttl-reaper"),
            )
            .await?;
        }
        Ok(())
    }

    async fn owned(&self, team_id: &str, id: &str) -> Result<CapsuleRow> {
        match self.store.capsule(id).await? {
            Some(row) if row.team_id == team_id => Ok(row),
            _ => Err(ApiError::not_found(format!("capsule {id} not found"))),
        }
    }
}

impl CapsuleService {
    /// The client of host `host_id`, if this control plane can reach it. Today that is the
    /// embedded agent only; remote agents join with the gRPC transport.
    fn client(&self, host_id: &str) -> Option<Arc<dyn HostClient>> {
        self.pool.get(host_id)
    }

    /// Capsules on `host_id` that held or were getting a VM become `missing`.
    async fn mark_missing(&self, host_id: &str) -> Result<usize> {
        use CapsuleStatus::*;
        let from = [Pending, Starting, Running, Pausing, Resuming, Snapshotting];
        let mut n = 0;
        for row in self.store.capsules_on_host(host_id, &from).await? {
            if self
                .store
                .transition(&row.capsule.id, &from, Missing)
                .await?
            {
                self.events
                    .changed(
                        &row.capsule.id,
                        row.capsule.status,
                        Missing,
                        Some("host_failure"),
                    )
                    .await;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Reconciles one host's capsules with what it reports running (after it came back):
    /// missing ones still alive run on, gone ones are stopped, paused ones stay paused.
    async fn reconcile_host(&self, host_id: &str, client: &dyn HostClient) -> Result<()> {
        use CapsuleStatus::*;
        let live: std::collections::HashMap<String, wrenn_agent::Phase> = client
            .list()
            .await
            .map_err(from_agent)?
            .into_iter()
            .map(|c| (c.id, c.phase))
            .collect();
        for row in self.store.capsules_on_host(host_id, &[Missing]).await? {
            let id = &row.capsule.id;
            let to = match live.get(id) {
                Some(wrenn_agent::Phase::Running) => Running,
                Some(wrenn_agent::Phase::Paused) => Paused,
                Some(_) => continue,
                None => Stopped,
            };
            if self.store.transition(id, &[Missing], to).await? {
                info!(capsule_id = %id, host_id, to = to.as_str(), "reconciled after the host came back");
                self.events
                    .changed(id, Missing, to, Some("host_recovered"))
                    .await;
            }
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl crate::hosts::HostEvents for CapsuleService {
    async fn host_online(&self, host: &wrenn_api::Host) {
        self.pool.status_changed(&host.id);
        self.pool.connect(host);
    }

    async fn host_down(&self, host: &wrenn_api::Host) {
        self.pool.status_changed(&host.id);
        self.events
            .other(
                "host.down",
                "host",
                &host.id,
                host.team_id.as_deref(),
                &EventActor::system("host-monitor"),
                None,
            )
            .await;
        match self.mark_missing(&host.id).await {
            Ok(n) => warn!(host_id = %host.id, capsules = n, "host down: its capsules are missing"),
            Err(e) => {
                warn!(host_id = %host.id, error = %e.message, "cannot mark the capsules of a lost host")
            }
        }
    }

    async fn host_back(&self, host: &wrenn_api::Host) {
        self.pool.status_changed(&host.id);
        self.events
            .other(
                "host.up",
                "host",
                &host.id,
                host.team_id.as_deref(),
                &EventActor::system("host-monitor"),
                None,
            )
            .await;
        if let Some(client) = self.client(&host.id) {
            if let Err(e) = self.reconcile_host(&host.id, client.as_ref()).await {
                warn!(host_id = %host.id, error = %e.message, "reconcile after the host came back failed");
            }
        }
    }

    async fn host_deleted(&self, host: &wrenn_api::Host, capsule_ids: &[String]) {
        use CapsuleStatus::*;
        let client = self.client(&host.id);
        for id in capsule_ids {
            if let Some(c) = &client {
                if let Err(e) = c.destroy(id).await {
                    warn!(capsule_id = %id, host_id = %host.id, error = %e, "destroy with its host failed");
                }
            }
            let from = [
                Pending,
                Starting,
                Running,
                Pausing,
                Paused,
                Resuming,
                Snapshotting,
                Missing,
                Stopping,
            ];
            let _ = self.store.transition(id, &from, Stopped).await;
        }
    }

    async fn capsule_event(&self, host_id: &str, ev: &wrenn_api::SandboxEvent) {
        use CapsuleStatus::*;
        let row = match self.store.capsule(&ev.sandbox_id).await {
            Ok(Some(r)) if r.host_id.as_deref() == Some(host_id) => r,
            Ok(_) => {
                warn!(capsule_id = %ev.sandbox_id, host_id, event = %ev.event, "event for a capsule not on this host: ignored");
                return;
            }
            Err(e) => {
                warn!(error = %e, "capsule event: store error");
                return;
            }
        };
        let id = &row.capsule.id;
        let moved = match ev.event.as_str() {
            "sandbox.auto_paused" => self
                .store
                .transition(id, &[Running, Missing], Paused)
                .await
                .map(|ok| ok.then_some(Paused)),
            "sandbox.stopped" => self
                .store
                .transition(
                    id,
                    &[
                        Pending, Starting, Running, Pausing, Paused, Resuming, Missing, Stopping,
                    ],
                    Stopped,
                )
                .await
                .map(|ok| ok.then_some(Stopped)),
            "sandbox.error" => self
                .store
                .mark_error(
                    id,
                    ev.reason.as_deref().unwrap_or("the host reported an error"),
                )
                .await
                .map(|_| (!row.capsule.status.is_terminal()).then_some(Error)),
            other => {
                info!(capsule_id = %id, host_id, event = other, "unknown capsule event accepted");
                Ok(None)
            }
        };
        // What the host reported goes on the event bus like any other change; a pause the
        // host made on its own is also an action (by the host) for the audit log.
        if let Ok(Some(to)) = &moved {
            if *to == Paused {
                let host = EventActor {
                    kind: "host".into(),
                    id: host_id.to_string(),
                    name: host_id.to_string(),
                };
                let reason = ev.reason.as_deref().unwrap_or("host_auto_paused");
                self.events
                    .action("pause", id, &host, Ok(()), &[("reason", reason)])
                    .await;
            }
            self.events
                .changed(id, row.capsule.status, *to, Some(&ev.event))
                .await;
        }
        let done = moved.map(|_| ());
        if let Err(e) = done {
            warn!(capsule_id = %id, error = %e, "capsule event not applied");
        }
    }
}

/// Where the host says a capsule stands after a failed transition (`None`: gone, or the host
/// cannot say).
async fn host_phase(host: &dyn HostClient, id: &str) -> Option<wrenn_agent::Phase> {
    host.list()
        .await
        .ok()?
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.phase)
}

/// What an exec request produced: the finished command, or the started background process.
pub enum ExecOutcome {
    Foreground(ExecResponse),
    Background(BackgroundExecResponse),
}

/// Checks what every exec needs, before the capsule's state is looked at.
fn validate_command(req: &ExecRequest) -> Result<()> {
    if req.cmd.trim().is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    let nul = |s: &str| s.contains('\0');
    if nul(&req.cmd) || req.args.iter().any(|a| nul(a)) || req.envs.values().any(|v| nul(v)) {
        return Err(ApiError::invalid(
            "cmd, args and envs must not contain NUL bytes",
        ));
    }
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') || nul(cwd) {
            return Err(ApiError::invalid("cwd must be an absolute path"));
        }
    }
    if let Some(bad) = req
        .envs
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || nul(k))
    {
        return Err(ApiError::invalid(format!(
            "invalid environment variable name {bad:?}"
        )));
    }
    Ok(())
}

fn command_spec(req: &ExecRequest) -> envd_proto::CommandSpec {
    envd_proto::CommandSpec {
        cmd: req.cmd.clone(),
        args: req.args.clone(),
        envs: req.envs.clone(),
        cwd: req.cwd.clone(),
    }
}
