//! Keeping the database truthful: reconciling it with what hosts hold (at start-up, when a
//! host comes back, periodically), the dead-VM pass and the TTL reaper.

use std::collections::HashMap;

use futures_util::future::join_all;
use tracing::{info, warn};
use wrenn_api::{CapsuleStatus, EventActor, EventKind};

use wrenn_host::{HostError, Phase};

use super::{CapsuleService, OrLog, PauseReason, Result};
use crate::error::from_host;
use crate::hosts::pool::HostHandle;
use crate::store::CapsuleRow;

/// A capsule the TTL reaper found idle.
pub(super) struct IdleCapsule {
    pub(super) id: String,
    host_id: String,
    /// Its last activity (or start).
    since: chrono::DateTime<chrono::Utc>,
}

impl CapsuleService {
    /// Makes the DB agree with what every connected host actually holds (at start-up): hosts
    /// are the source of truth for running and paused capsules. A host that does not answer is
    /// left to the liveness monitor.
    /// Hosts are handled concurrently: a slow one delays no other. It runs while the API
    /// already serves: a capsule changed at or after `started` (this run's own work, a create
    /// accepted meanwhile) is not the previous run's to judge and is left alone.
    pub async fn reconcile(&self, started: chrono::DateTime<chrono::Utc>) -> Result<()> {
        join_all(self.pool.all().into_iter().map(|host| async move {
            if let Err(e) = self.reconcile_on(&host, started).await {
                warn!(host_id = host.host_id(), error = %e.message, "cannot reconcile with host");
            }
        }))
        .await;
        Ok(())
    }

    /// The periodic reconciler: for every online host, capsules the database says run but the
    /// host does not hold turn `error`, and VMs the host holds for capsules that no longer
    /// exist (or are recorded as ended) are destroyed. Capsules that changed in the last
    /// minute are left alone (an operation may be in flight); every fix is logged. Copies of
    /// deleted templates whose host was away at the time are deleted now.
    pub async fn reconcile_pass(&self) -> Result<()> {
        if let Err(e) = self.copies.collect_orphans().await {
            warn!(error = %e, "cannot collect copies of deleted templates");
        }
        let settle = chrono::Utc::now() - chrono::Duration::seconds(60);
        // Hosts concurrently: a slow one delays no other.
        let passes = join_all(
            self.pool
                .all()
                .into_iter()
                .map(|host| async move { self.reconcile_host_pass(&host, settle).await }),
        )
        .await;
        passes.into_iter().collect()
    }

    /// One host's share of [`CapsuleService::reconcile_pass`].
    async fn reconcile_host_pass(
        &self,
        host: &HostHandle,
        settle: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        use CapsuleStatus::*;
        let Ok(client) = self.pool.online(host.host_id()).await else {
            return Ok(());
        };
        let Ok(live) = live_phases(&client).await else {
            return Ok(());
        };
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
                    .destroy(id.clone())
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string());
                self.events
                    .action(
                        EventKind::CapsuleDestroy,
                        id,
                        &EventActor::system("reconciler"),
                        outcome,
                        &[("reason", "orphaned")],
                    )
                    .await;
            }
        }
        Ok(())
    }

    pub(super) async fn reconcile_on(
        &self,
        host: &HostHandle,
        started: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        use CapsuleStatus::*;
        let live = live_phases(host).await.map_err(from_host)?;
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
                    Missing,
                ],
            )
            .await?;
        let mut known = std::collections::HashSet::new();
        for CapsuleRow { capsule: c, .. } in rows {
            known.insert(c.id.clone());
            if c.last_updated >= started {
                continue;
            }
            let on_host = live.get(&c.id).copied();
            match (c.status, on_host) {
                (Stopping | Stopped | Error, _) => {
                    if on_host.is_some() {
                        host.destroy(c.id.clone()).await.or_log(
                            "destroying an ended capsule's VM",
                            &c.id,
                            host.host_id(),
                        );
                    }
                    self.store
                        .transition(&c.id, &[Stopping], Stopped)
                        .await
                        .or_log("recording a destroy", &c.id, host.host_id());
                }
                (Pending | Starting, _) => {
                    warn!(capsule_id = %c.id, "capsule lost while starting");
                    self.store
                        .mark_error(&c.id, "capsule lost while the platform was down")
                        .await
                        .or_log("recording a lost capsule", &c.id, host.host_id());
                    if on_host.is_some() {
                        host.destroy(c.id.clone()).await.or_log(
                            "destroying a VM lost while starting",
                            &c.id,
                            host.host_id(),
                        );
                    }
                }
                (status, Some(Phase::Running)) if status != Running => {
                    self.store
                        .transition(&c.id, &[status], Running)
                        .await
                        .or_log("recording a capsule found running", &c.id, host.host_id());
                }
                (status, Some(Phase::Paused)) if status != Paused => {
                    self.store
                        .transition(&c.id, &[status], Paused)
                        .await
                        .or_log("recording a capsule found paused", &c.id, host.host_id());
                }
                (_, Some(_)) => {}
                (status, None) => {
                    warn!(capsule_id = %c.id, status = status.as_str(), "capsule lost while the platform was down");
                    self.store
                        .mark_error(&c.id, "capsule lost while the platform was down")
                        .await
                        .or_log("recording a lost capsule", &c.id, host.host_id());
                }
            }
        }
        for id in live.keys().filter(|id| !known.contains(*id)) {
            // Only a VM that no capsule row claims at all is the host's to lose.
            if self.store.capsule(id).await?.is_some() {
                warn!(capsule_id = %id, host_id = host.host_id(), "host holds a capsule recorded elsewhere; left alone");
                continue;
            }
            warn!(capsule_id = %id, "host holds a capsule the control plane does not know; destroying");
            host.destroy(id.clone()).await.or_log(
                "destroying an unknown capsule's VM",
                id,
                host.host_id(),
            );
        }
        Ok(())
    }

    /// Marks `error`, with the reason, every capsule whose VM died under it.
    /// Hosts are asked concurrently: a slow one delays no other.
    pub async fn record_dead_vms(&self) -> Result<()> {
        let passes = join_all(self.pool.all().into_iter().map(|host| async move {
            match host.reap_dead().await {
                Ok(dead) => {
                    for wrenn_host::DeadCapsule { id, reason } in dead {
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
            Ok(())
        }))
        .await;
        passes.into_iter().collect()
    }

    /// Writes this replica's recorded activity and renews its busy marks (every replica, every
    /// few seconds, whether or not it runs the reaper).
    pub async fn flush_activity(&self) -> Result<()> {
        Ok(self.activity.flush().await?)
    }

    /// One pass of the TTL reaper: auto-pauses every running capsule whose inactivity timeout
    /// has passed and that nothing is attached to.
    pub async fn pause_idle(&self) -> Result<()> {
        for idle in self.idle_capsules().await? {
            if let Err(e) = self.auto_pause(&idle).await {
                warn!(capsule_id = %idle.id, error = %e.message, "auto-pause failed");
            }
        }
        Ok(())
    }

    /// Running capsules whose inactivity timeout has passed and that nothing is attached to.
    pub(super) async fn idle_capsules(&self) -> Result<Vec<IdleCapsule>> {
        self.activity.flush().await?;
        let now = chrono::Utc::now();
        let mut idle = Vec::new();
        for row in self.store.running_with_timeout(now).await? {
            // Activity recorded after the flush above counts too.
            let c = &self.with_activity(row.capsule);
            let last = c.last_active_at.or(c.started_at).unwrap_or(c.created_at);
            let for_how_long = now.signed_duration_since(last);
            if for_how_long < chrono::Duration::seconds(i64::from(c.timeout_sec))
                || self.activity.is_busy(&c.id)
            {
                continue;
            }
            info!(capsule_id = %c.id, idle_sec = for_how_long.num_seconds(), timeout_sec = c.timeout_sec, "inactivity timeout: auto-pausing");
            idle.push(IdleCapsule {
                id: c.id.clone(),
                host_id: row.host_id.unwrap_or_default(),
                since: last,
            });
        }
        Ok(idle)
    }

    /// Pauses an idle capsule unless it was used since [`CapsuleService::idle_capsules`] saw it
    /// (activity then wins); returns whether the pause began.
    pub(super) async fn auto_pause(&self, c: &IdleCapsule) -> Result<bool> {
        let Ok(host) = self.pool.online(&c.host_id).await else {
            return Ok(false);
        };
        if self.activity.is_busy(&c.id) || self.activity.last_active(&c.id) > Some(c.since) {
            return Ok(false);
        }
        if !self.store.begin_auto_pause(&c.id, c.since).await? {
            info!(capsule_id = %c.id, "used meanwhile: not auto-paused");
            return Ok(false);
        }
        let actor = EventActor::system("ttl-reaper");
        self.pause_on_host(&c.id, PauseReason::TtlExpired, host, actor);
        Ok(true)
    }

    /// The connection to host `host_id`, if this control plane has one.
    pub(super) fn client(&self, host_id: &str) -> Option<HostHandle> {
        self.pool.get(host_id)
    }

    /// Capsules on `host_id` that held or were getting a VM become `missing`.
    pub(super) async fn mark_missing(&self, host_id: &str) -> Result<usize> {
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
    pub(super) async fn reconcile_host(&self, host_id: &str, client: &HostHandle) -> Result<()> {
        use CapsuleStatus::*;
        let live = live_phases(client).await.map_err(from_host)?;
        for row in self.store.capsules_on_host(host_id, &[Missing]).await? {
            let id = &row.capsule.id;
            let to = match live.get(id) {
                Some(Phase::Running) => Running,
                Some(Phase::Paused) => Paused,
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

/// Where each capsule a host holds stands, by id.
async fn live_phases(host: &HostHandle) -> std::result::Result<HashMap<String, Phase>, HostError> {
    Ok(host
        .list()
        .await?
        .into_iter()
        .map(|c| (c.id, c.phase))
        .collect())
}
