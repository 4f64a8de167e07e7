//! Create, destroy, pause and resume: the database row moves first, the host works in the
//! background, and the outcome is recorded, published and audited.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix, PLATFORM_TEAM_ID};
use wrenn_api::{
    ApiError, Capsule, CapsuleSpec, CapsuleStatus, CreateCapsuleRequest, ErrorCode, EventActor,
    EventKind, ProxyAccess,
};
use wrenn_host::{Host, HostCapacity, Phase, UserSnapshot};

use super::quotas::Ask;
use super::{CapsuleService, Emitter, OrLog, PauseReason, Result};
use crate::error::from_host;
use crate::hosts::copies::{CopyPlan, TemplateCopies};
use crate::hosts::pool::HostHandle;
use crate::store::Store;

/// What a capsule may start with besides its spec.
#[derive(Default)]
struct StartExtras {
    /// Template files to copy to the host before the boot.
    copy: Option<(Arc<TemplateCopies>, CopyPlan)>,
    /// Who may reach its ports besides its team, when not only the team.
    access: Option<ProxyAccess>,
}

/// How long DELETE waits for the host to finish before answering 202 anyway.
const DESTROY_WAIT: Duration = Duration::from_secs(5);

impl CapsuleService {
    /// Records the capsule as `starting` and boots it in the background.
    pub async fn create(
        &self,
        team_id: &str,
        req: CreateCapsuleRequest,
        actor: &EventActor,
    ) -> Result<Capsule> {
        let mut spec = req.validate().map_err(ApiError::invalid)?;
        let access = req
            .proxy
            .as_ref()
            .map(|a| a.validate().map_err(ApiError::invalid))
            .transpose()?
            .filter(|a| *a != ProxyAccess::default());
        let t = self.resolve_template(team_id, &mut spec).await?;
        let host = match &t.pinned {
            Some(h) => self.pool.online(h).await?,
            None => {
                let holders = t.copy.as_ref().map(|c| c.holders.as_slice());
                self.pool
                    .place(team_id, &spec, holders.unwrap_or_default())
                    .await?
            }
        };
        // Its files are copied there before the boot unless the host holds them already.
        let extras = StartExtras {
            copy: t.copy.map(|c| (self.copies.clone(), c)),
            access,
        };
        self.start(team_id, spec, t.from, host, actor, extras).await
    }

    /// Boots a capsule from a disk already on `host` (an imported OCI image: `from` with
    /// `disk_only`), recorded under `template` as its template's name.
    pub async fn create_from_disk(
        &self,
        team_id: &str,
        spec: CapsuleSpec,
        from: UserSnapshot,
        host: HostHandle,
        actor: &EventActor,
    ) -> Result<Capsule> {
        self.start(
            team_id,
            spec,
            Some(from),
            host,
            actor,
            StartExtras::default(),
        )
        .await
    }

    /// Records the capsule as `starting` on `host` and boots it in the background.
    async fn start(
        &self,
        team_id: &str,
        spec: CapsuleSpec,
        from: Option<UserSnapshot>,
        host: HostHandle,
        actor: &EventActor,
        StartExtras { copy, access }: StartExtras,
    ) -> Result<Capsule> {
        fits(&spec, &host.capacity().await.map_err(from_host)?)?;
        let admitted = self
            .admit(
                team_id,
                Ask {
                    capsules: 1,
                    vcpus: spec.vcpus.into(),
                    memory_mb: spec.memory_mb.into(),
                    disk_mb: spec.disk_size_mb.into(),
                    snapshots: 0,
                },
            )
            .await?;
        let id = new_id(prefix::CAPSULE);
        let row = self
            .store
            .insert_capsule(&id, team_id, host.host_id(), &spec)
            .await?;
        drop(admitted);
        if let Some(access) = &access {
            // Before the boot: the capsule is never reachable other than as asked.
            if let Err(e) = self.store.set_proxy_access(&id, access).await {
                self.store
                    .mark_error(&id, "its proxy access could not be recorded")
                    .await
                    .or_log("marking the capsule", &id, host.host_id());
                return Err(e.into());
            }
        }
        info!(capsule_id = %id, team_id, host_id = host.host_id(), template = %spec.template, "capsule create accepted");
        let boot = Boot {
            store: self.store.clone(),
            events: self.events.clone(),
            actor: actor.clone(),
            host,
            id,
            copy,
        };
        tokio::spawn(boot.run(spec, from));
        Ok(row.capsule)
    }

    /// Which template a create boots: a hosts' base image (`minimal`: every host has it), one
    /// of the team's snapshots (restored with its machine, on the host that holds it), or a
    /// platform template built from a recipe (on any host: copied where it is placed).
    pub(super) async fn resolve_template(
        &self,
        team_id: &str,
        spec: &mut CapsuleSpec,
    ) -> Result<ResolvedTemplate> {
        let templates = self.pool.base_image_names().await?;
        if templates.contains(&spec.template) {
            return Ok(ResolvedTemplate::default());
        }
        if let Some(t) = self.store.template(team_id, &spec.template).await? {
            // A team snapshot is restored as saved, on its host.
            spec.vcpus = t.template.vcpus.unwrap_or(spec.vcpus);
            spec.memory_mb = t.template.memory_mb.unwrap_or(spec.memory_mb);
            spec.disk_size_mb = t.disk_size_mb;
            return Ok(ResolvedTemplate {
                from: Some(UserSnapshot {
                    id: t.snapshot_id,
                    disk_only: t.template.kind == "base",
                }),
                pinned: Some(t.host_id),
                copy: None,
            });
        }
        let Some(t) = self
            .store
            .template(PLATFORM_TEAM_ID, &spec.template)
            .await?
        else {
            if let Some(b) = self.store.active_build_named(&spec.template).await? {
                let b = b.build;
                return Err(ApiError::new(
                    ErrorCode::TemplateBuilding,
                    format!(
                        "template {:?} is being built (build {}: {}, step {} of {}); try again when it is ready",
                        spec.template,
                        b.id,
                        b.status.as_str(),
                        b.current_step,
                        b.total_steps
                    ),
                ));
            }
            return Err(ApiError::invalid(format!(
                "unknown template {:?} (platform templates: {}; see GET /v1/snapshots for the team's)",
                spec.template,
                templates.join(", ")
            )));
        };
        let disk_only = t.template.kind == "base";
        if disk_only {
            // A built disk, booted afresh in the requested shape (at least the disk's size).
            spec.disk_size_mb = spec.disk_size_mb.max(t.disk_size_mb);
        } else {
            spec.vcpus = t.template.vcpus.unwrap_or(spec.vcpus);
            spec.memory_mb = t.template.memory_mb.unwrap_or(spec.memory_mb);
            spec.disk_size_mb = t.disk_size_mb;
        }
        let mut holders = vec![t.host_id];
        holders.extend(self.store.template_copies(&t.snapshot_id).await?);
        Ok(ResolvedTemplate {
            from: Some(UserSnapshot {
                id: t.snapshot_id.clone(),
                disk_only,
            }),
            pinned: None,
            copy: Some(CopyPlan {
                snapshot_id: t.snapshot_id,
                holders,
                with_memory: !disk_only,
            }),
        })
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
            .transition(id, &CapsuleStatus::LIVE, Stopping)
            .await?;
        let (store, id_owned) = (self.store.clone(), id.to_string());
        let (events, actor, was) = (self.events.clone(), actor.clone(), row.capsule.status);
        let task = tokio::spawn(async move {
            match host.destroy(id_owned.clone()).await {
                Ok(_) => {
                    store
                        .transition(&id_owned, &[Stopping], Stopped)
                        .await
                        .or_log("recording a destroy", &id_owned, host.host_id());
                    info!(capsule_id = %id_owned, "capsule destroyed");
                    events
                        .action(EventKind::CapsuleDestroy, &id_owned, &actor, Ok(()), &[])
                        .await;
                    events.changed(&id_owned, was, Stopped, None).await;
                }
                Err(e) => {
                    warn!(capsule_id = %id_owned, error = %e, "destroy failed");
                    store
                        .mark_error(&id_owned, &format!("destroy failed: {e}"))
                        .await
                        .or_log("recording a failed destroy", &id_owned, host.host_id());
                    events
                        .action(
                            EventKind::CapsuleDestroy,
                            &id_owned,
                            &actor,
                            Err(e.to_string()),
                            &[],
                        )
                        .await;
                }
            }
        });
        let _ = tokio::time::timeout(DESTROY_WAIT, task).await;
        Ok(self.owned(team_id, id).await?.capsule)
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
    pub(super) async fn begin_pause(
        &self,
        id: &str,
        status: CapsuleStatus,
        reason: PauseReason,
        host: HostHandle,
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
        self.pause_on_host(id, reason, host, actor);
        Ok(())
    }

    /// The host's pause of a capsule already `pausing`, in the background → `paused`. A failed
    /// pause goes back to `running` if the host still runs it, `error` otherwise.
    pub(super) fn pause_on_host(
        &self,
        id: &str,
        reason: PauseReason,
        host: HostHandle,
        actor: EventActor,
    ) {
        use CapsuleStatus::*;
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
            match host.pause(id.clone()).await {
                Ok(()) => {
                    store.transition(&id, &[Pausing], Paused).await.or_log(
                        "recording a pause",
                        &id,
                        host.host_id(),
                    );
                    events
                        .action(EventKind::CapsulePause, &id, &actor, Ok(()), meta)
                        .await;
                    events
                        .changed(&id, Running, Paused, meta.first().map(|m| m.1))
                        .await;
                }
                Err(e) => {
                    let runs_on = host_phase(&*host, &id).await == Some(Phase::Running);
                    warn!(capsule_id = %id, error = %e, runs_on, "pause failed");
                    events
                        .action(
                            EventKind::CapsulePause,
                            &id,
                            &actor,
                            Err(e.to_string()),
                            meta,
                        )
                        .await;
                    if runs_on {
                        // It runs on, untouched; an auto-pause tries again after another
                        // full timeout rather than at once.
                        store.transition(&id, &[Pausing], Running).await.or_log(
                            "recording a failed pause",
                            &id,
                            host.host_id(),
                        );
                        activity.touch(&id);
                    } else {
                        store
                            .mark_error(&id, &format!("pause failed: {e}"))
                            .await
                            .or_log("recording a failed pause", &id, host.host_id());
                    }
                }
            }
        });
    }

    /// `paused` → `resuming`, and the host restores it in the background → `running`. A failed
    /// resume leaves it `paused` (its files intact) if the host still holds it, `error` otherwise.
    pub async fn resume(&self, team_id: &str, id: &str, actor: &EventActor) -> Result<Capsule> {
        use CapsuleStatus::*;
        let row = self.owned(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        if row.capsule.status == Paused {
            room_on_disk(&host.capacity().await.map_err(from_host)?)?;
        }
        let admitted = self
            .admit(
                team_id,
                Ask {
                    vcpus: row.capsule.vcpus.into(),
                    memory_mb: row.capsule.memory_mb.into(),
                    ..Ask::default()
                },
            )
            .await?;
        let resuming = self.store.transition(id, &[Paused], Resuming).await?;
        drop(admitted);
        if !resuming {
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
            match host.resume(id.clone()).await {
                Ok(info) => {
                    match store
                        .mark_resumed(&id, &info.guest_ip, &info.host_ip, &info.metadata)
                        .await
                    {
                        Ok(true) => {
                            events
                                .action(EventKind::CapsuleResume, &id, &actor, Ok(()), &[])
                                .await;
                            events.changed(&id, Paused, Running, None).await;
                        }
                        // Destroyed while resuming: nobody wants the VM any more.
                        Ok(false) => {
                            host.destroy(id.clone()).await.or_log(
                                "destroying the VM of a capsule destroyed while it resumed",
                                &id,
                                host.host_id(),
                            );
                        }
                        Err(e) => warn!(capsule_id = %id, error = %e, "cannot record the resume"),
                    }
                }
                Err(e) => {
                    let still_paused = host_phase(&*host, &id).await == Some(Phase::Paused);
                    warn!(capsule_id = %id, error = %e, still_paused, "resume failed");
                    events
                        .action(
                            EventKind::CapsuleResume,
                            &id,
                            &actor,
                            Err(e.to_string()),
                            &[],
                        )
                        .await;
                    if still_paused {
                        store.transition(&id, &[Resuming], Paused).await.or_log(
                            "recording a failed resume",
                            &id,
                            host.host_id(),
                        );
                    } else {
                        store
                            .mark_error(&id, &format!("resume failed: {e}"))
                            .await
                            .or_log("recording a failed resume", &id, host.host_id());
                    }
                }
            }
        });
        Ok(self.owned(team_id, id).await?.capsule)
    }
}

/// Where the host says a capsule stands after a failed transition (`None`: gone, or the host
/// cannot say).
async fn host_phase(host: &dyn Host, id: &str) -> Option<Phase> {
    host.list()
        .await
        .ok()?
        .into_iter()
        .find(|c| c.id == id)
        .map(|c| c.phase)
}

/// Whether one capsule of `spec` fits on a host with `cap` (400 saying which limit it passes).
fn fits(spec: &CapsuleSpec, cap: &HostCapacity) -> Result<()> {
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
    room_on_disk(cap)?;
    if u64::from(spec.disk_size_mb) > cap.disk_free_mb {
        return Err(ApiError::invalid(format!(
            "disk_size_mb {} is more than the free space on this host ({} MiB)",
            spec.disk_size_mb, cap.disk_free_mb
        )));
    }
    Ok(())
}

/// Refuses a capsule (create, resume) on a host whose disk is down to its reserve.
fn room_on_disk(cap: &HostCapacity) -> Result<()> {
    if cap.disk_free_mb < cap.disk_reserve_mb + MIN_DISK_ROOM_MB {
        return Err(ApiError::new(
            ErrorCode::InsufficientStorage,
            format!(
                "the host's disk is full: {} MiB free, and it keeps {} MiB for itself; free some space (delete capsules or snapshots) or try later",
                cap.disk_free_mb, cap.disk_reserve_mb
            ),
        ));
    }
    Ok(())
}

/// Disk a capsule needs at once beyond the host's reserve (its overlay and logs start small).
pub(super) const MIN_DISK_ROOM_MB: u64 = 64;

/// A create the host works on in the background.
/// What a create boots from (see [`CapsuleService::resolve_template`]).
#[derive(Debug, Default)]
pub(super) struct ResolvedTemplate {
    /// The snapshot restored or booted (`None`: a base image).
    from: Option<UserSnapshot>,
    /// The only host that can run it.
    pinned: Option<String>,
    /// Where its files are, to copy them to the host it is placed on.
    copy: Option<CopyPlan>,
}

struct Boot {
    store: Store,
    events: Emitter,
    actor: EventActor,
    host: HostHandle,
    id: String,
    /// The template's files to bring to `host` first.
    copy: Option<(Arc<TemplateCopies>, CopyPlan)>,
}

impl Boot {
    async fn run(self, spec: CapsuleSpec, from: Option<UserSnapshot>) {
        let Boot {
            store,
            events,
            actor,
            host,
            id,
            copy,
        } = self;
        let created = async {
            if let Some((copies, plan)) = &copy {
                copies.ensure(&host, plan).await?;
                // A copy can take minutes: a capsule destroyed meanwhile is not booted.
                let wanted = store.capsule(&id).await.ok().flatten();
                if wanted.is_none_or(|r| r.capsule.status != CapsuleStatus::Starting) {
                    return Ok(None);
                }
            }
            host.create(id.clone(), spec, from).await.map(Some)
        };
        let info = match created.await {
            Ok(Some(info)) => info,
            Ok(None) => {
                info!(capsule_id = %id, "destroyed while its template was copied; not booted");
                return;
            }
            Err(e) => {
                warn!(capsule_id = %id, error = %e, "capsule failed to start");
                store.mark_error(&id, &e.to_string()).await.or_log(
                    "recording a failed create",
                    &id,
                    host.host_id(),
                );
                let failed = Err(e.to_string());
                events
                    .action(EventKind::CapsuleCreate, &id, &actor, failed, &[])
                    .await;
                let (from, to) = (CapsuleStatus::Starting, CapsuleStatus::Error);
                events.changed(&id, from, to, Some("create_failed")).await;
                // The host tore down whatever the failed create had made.
                events.cleaned_up_after_failed_create(&id, Ok(())).await;
                return;
            }
        };
        match store
            .mark_running(&id, &info.guest_ip, &info.host_ip, &info.metadata)
            .await
        {
            Ok(true) => {
                events
                    .action(EventKind::CapsuleCreate, &id, &actor, Ok(()), &[])
                    .await;
                let (from, to) = (CapsuleStatus::Starting, CapsuleStatus::Running);
                events.changed(&id, from, to, None).await;
            }
            // Destroyed while booting: the VM nobody wants goes away again.
            Ok(false) => host.destroy(id.clone()).await.or_log(
                "destroying the VM of a capsule destroyed while it booted",
                &id,
                host.host_id(),
            ),
            Err(e) => {
                warn!(capsule_id = %id, error = %e, "cannot record the running capsule; destroying it");
                let outcome = host
                    .destroy(id.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                store
                    .mark_error(&id, "control plane could not record the capsule")
                    .await
                    .or_log("recording a failed create", &id, host.host_id());
                events.cleaned_up_after_failed_create(&id, outcome).await;
            }
        }
    }
}
