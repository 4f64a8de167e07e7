//! The control plane's background tasks: the [`Tasks`] set every periodic pass runs in, and
//! the passes themselves (the capsule reaper, the reconciler, host liveness, team statistics,
//! housekeeping). Passes that must run on one replica only hold a lease first.

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::accounts::AccountService;
use crate::capsules::CapsuleService;
use crate::hosts::HostService;
use crate::stats::StatsService;
use crate::store::Store;

/// How often capsules whose VM died are marked and idle ones auto-paused.
const REAPER_INTERVAL: Duration = Duration::from_secs(2);

/// How often expired sessions are removed (deleted accounts and old delivery records daily).
const HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(600);

/// The background tasks of one control plane.
pub(super) struct Tasks {
    pub(super) set: JoinSet<()>,
    pub(super) cancel: CancellationToken,
}

impl Tasks {
    /// Runs `f` every `period` (first at once) until the control plane stops; a failed pass is
    /// logged with the task's name and the next one runs on time.
    pub(super) fn every<F, Fut, E>(&mut self, period: Duration, name: &'static str, mut f: F)
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send,
        E: std::fmt::Display,
    {
        let cancel = self.cancel.clone();
        self.set.spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => {}
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = f() => if let Err(e) = r {
                        warn!(task = name, error = %e, "periodic task failed");
                    },
                }
            }
        });
    }

    /// Runs `fut` until it ends or the control plane stops.
    pub(super) fn spawn(&mut self, fut: impl Future<Output = ()> + Send + 'static) {
        let cancel = self.cancel.clone();
        self.set.spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }
}

/// Every 2 s capsules whose VM died turn `error` and idle ones are auto-paused, by the one
/// replica holding the `capsule-reaper` lease (two reapers would pause what the other's
/// replica holds busy); every replica writes its activity and busy marks as often.
/// Periodically the database is reconciled with every online host.
pub(super) fn keep_capsules_truthful(
    tasks: &mut Tasks,
    capsules: &Arc<CapsuleService>,
    every: Duration,
    store: &Store,
    replica: String,
    reconciled: Arc<AtomicBool>,
) {
    let flusher = capsules.clone();
    tasks.every(REAPER_INTERVAL, "activity-flush", move || {
        let c = flusher.clone();
        async move { c.flush_activity().await.map_err(|e| e.message) }
    });
    let reaper = capsules.clone();
    let (store, replica) = (store.clone(), Arc::new(replica));
    let leading = Arc::new(AtomicBool::new(false));
    let ttl =
        chrono::Duration::from_std(REAPER_INTERVAL * 5).unwrap_or(chrono::Duration::seconds(10));
    let ready = reconciled.clone();
    tasks.every(REAPER_INTERVAL, "capsule-reaper", move || {
        let (c, store, replica, leading, ready) = (
            reaper.clone(),
            store.clone(),
            replica.clone(),
            leading.clone(),
            ready.clone(),
        );
        async move {
            let held = store
                .hold_lease("capsule-reaper", &replica, chrono::Utc::now(), ttl)
                .await
                .map_err(|e| format!("lease unavailable: {e}"))?;
            if held != leading.swap(held, Ordering::SeqCst) {
                info!(replica = %replica, reaping = held, "capsule reaper lease changed");
            }
            // Until the start-up reconcile is done, rows may still say what the last run left.
            if !held || !ready.load(Ordering::SeqCst) {
                return Ok(());
            }
            if let Err(e) = c.record_dead_vms().await {
                warn!(error = %e.message, "dead-VM pass failed");
            }
            c.pause_idle().await.map_err(|e| e.message)
        }
    });
    let reconciler = capsules.clone();
    tasks.every(every, "reconciler", move || {
        let (c, ready) = (reconciler.clone(), reconciled.clone());
        async move {
            if !ready.load(Ordering::SeqCst) {
                return Ok(());
            }
            c.reconcile_pass().await.map_err(|e| e.message)
        }
    });
}

/// Liveness: the embedded agent beats from here; the monitor runs twice per interval.
/// The liveness monitor judges hosts only once the start-up reconcile is done (`reconciled`).
pub(super) fn watch_hosts(
    tasks: &mut Tasks,
    hosts: &Arc<HostService>,
    heartbeat: Duration,
    reconciled: Arc<AtomicBool>,
) {
    let monitor = hosts.clone();
    tasks.every(heartbeat / 2, "host-monitor", move || {
        let (h, ready) = (monitor.clone(), reconciled.clone());
        async move {
            if let Err(e) = h.embedded_heartbeat().await {
                warn!(error = %e.message, "embedded heartbeat failed");
            }
            if !ready.load(Ordering::SeqCst) {
                return Ok(());
            }
            h.monitor().await.map_err(|e| e.message)
        }
    });
}

/// Team statistics: one replica samples (usage would be counted once per replica otherwise),
/// the one holding the `stats-sampler` lease, renewed every tick and taken over when it lapses.
pub(super) fn sample_stats(
    tasks: &mut Tasks,
    stats: &Arc<StatsService>,
    store: &Store,
    replica: String,
) {
    let leading = Arc::new(AtomicBool::new(false));
    let ttl =
        chrono::Duration::from_std(stats.interval() * 3).unwrap_or(chrono::Duration::seconds(30));
    let (stats, store, replica) = (stats.clone(), store.clone(), Arc::new(replica));
    tasks.every(stats.interval(), "stats-sampler", move || {
        let (stats, store, replica, leading) = (
            stats.clone(),
            store.clone(),
            replica.clone(),
            leading.clone(),
        );
        async move {
            let now = chrono::Utc::now();
            let held = store
                .hold_lease("stats-sampler", &replica, now, ttl)
                .await
                .map_err(|e| format!("lease unavailable: {e}"))?;
            if held != leading.swap(held, Ordering::SeqCst) {
                info!(replica = %replica, sampling = held, "team stats sampler lease changed");
                if !held {
                    stats.stop_sampling().await;
                }
            }
            if !held {
                return Ok(());
            }
            stats.sample(now).await.map_err(|e| e.message)
        }
    });
}

/// Expired sessions every [`HOUSEKEEPING_INTERVAL`]; deleted accounts purged and old delivery
/// records forgotten daily.
pub(super) fn housekeeping(tasks: &mut Tasks, accounts: &Arc<AccountService>, store: &Store) {
    let runs = Arc::new(AtomicU64::new(0));
    let (accounts, store) = (accounts.clone(), store.clone());
    tasks.every(HOUSEKEEPING_INTERVAL, "housekeeping", move || {
        let (accounts, store, runs) = (accounts.clone(), store.clone(), runs.clone());
        async move {
            if let Err(e) = accounts.prune().await {
                warn!(error = %e.message, "session cleanup failed");
            }
            let daily = (24 * 3600 / HOUSEKEEPING_INTERVAL.as_secs()).max(1);
            if runs.fetch_add(1, Ordering::SeqCst).is_multiple_of(daily) {
                match accounts.purge_deleted().await {
                    Ok(0) => {}
                    Ok(k) => info!(users = k, "deleted accounts purged"),
                    Err(e) => warn!(error = %e.message, "account purge failed"),
                }
                let before = chrono::Utc::now()
                    - chrono::Duration::days(crate::channels::DELIVERY_RETENTION_DAYS);
                store
                    .prune_deliveries(before)
                    .await
                    .map_err(|e| format!("delivery records cleanup: {e}"))?;
            }
            Ok::<_, String>(())
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn periodic_tasks_run_on_time_survive_failures_and_stop_when_cancelled() {
        let mut tasks = Tasks {
            set: JoinSet::new(),
            cancel: CancellationToken::new(),
        };
        let runs = Arc::new(AtomicU64::new(0));
        let r = runs.clone();
        tasks.every(Duration::from_secs(10), "test", move || {
            let r = r.clone();
            async move {
                // Every other pass fails: the next still runs.
                if r.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                    Err("boom")
                } else {
                    Ok(())
                }
            }
        });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "at 0, 10, 20 and 30 s");
        tasks.cancel.cancel();
        assert!(tasks.set.join_next().await.is_some());
        assert!(tasks.set.join_next().await.is_none());
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "no pass after the stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pass_in_progress_is_abandoned_when_the_control_plane_stops() {
        let mut tasks = Tasks {
            set: JoinSet::new(),
            cancel: CancellationToken::new(),
        };
        tasks.every(Duration::from_secs(1), "stuck", || async {
            // A host that never answers.
            std::future::pending::<()>().await;
            Ok::<_, String>(())
        });
        tokio::time::sleep(Duration::from_secs(5)).await;
        tasks.cancel.cancel();
        let joined = tokio::time::timeout(Duration::from_secs(1), tasks.set.join_next()).await;
        assert!(matches!(joined, Ok(Some(Ok(())))));
    }
}
