//! Which capsules are in use right now, for the inactivity timer (TTL auto-pause).
//!
//! Every request that works inside a capsule records activity when it starts; one that stays
//! attached (a foreground exec, an exec or process stream, a terminal, a file transfer) also
//! holds a [`Busy`] guard for as long as it lasts. A capsule with a guard out is never
//! auto-paused, and dropping the last guard records activity again, so the timer counts from
//! the end of the work, not its start.
//!
//! Activity is recorded in memory and written to the database in one batch by [`Activity::flush`]
//! (every replica flushes every 2 s, and the reaper before its pass), so a request costs no
//! database write; reads of a capsule overlay the newer in-memory time
//! ([`Activity::last_active`]).
//!
//! Busy is shared between replicas through the row's `busy_until`: a capsule held here is
//! marked busy for [`BUSY_MARK`] when the hold begins (unless marked moments ago) and again at
//! every flush while it lasts, so the one replica running the TTL reaper never pauses a capsule
//! with a terminal open on another. A replica that dies lets its marks lapse.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::store::{Result, Store};

/// How long a busy mark in the database lasts; flushes renew it well before it lapses.
pub const BUSY_MARK: Duration = Duration::from_secs(10);
/// A hold that begins within this long of the capsule's last mark writes no new one.
const MARK_AGAIN_AFTER: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Activity {
    store: Store,
    busy: Arc<Mutex<HashMap<String, usize>>>,
    /// When each busy capsule was last marked in the database.
    marked: Arc<Mutex<HashMap<String, Instant>>>,
    /// Activity not yet written to the database.
    pending: Arc<Mutex<HashMap<String, DateTime<Utc>>>>,
}

impl Activity {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            busy: Arc::default(),
            marked: Arc::default(),
            pending: Arc::default(),
        }
    }

    /// Records activity now (written by the next [`Activity::flush`]).
    pub fn touch(&self, id: &str) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_string(), Utc::now());
    }

    /// The activity recorded for `id` and not written yet.
    pub fn last_active(&self, id: &str) -> Option<DateTime<Utc>> {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .copied()
    }

    /// Writes the recorded activity to the database in one transaction, and renews the busy
    /// marks of the capsules held here. On failure the entries are kept for the next flush.
    pub async fn flush(&self) -> Result<()> {
        let held: Vec<String> = self.lock().keys().cloned().collect();
        {
            let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
            marked.retain(|id, _| held.contains(id));
        }
        if !held.is_empty() {
            self.mark(&held).await?;
        }
        let batch: Vec<(String, DateTime<Utc>)> = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        if batch.is_empty() {
            return Ok(());
        }
        self.store.record_activity(&batch).await?;
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        for (id, at) in batch {
            // Keep what was touched again while the batch was being written.
            if pending.get(&id) == Some(&at) {
                pending.remove(&id);
            }
        }
        Ok(())
    }

    /// Marks `ids` busy in the database for [`BUSY_MARK`] from now.
    async fn mark(&self, ids: &[String]) -> Result<()> {
        let until = Utc::now() + chrono::Duration::from_std(BUSY_MARK).unwrap_or_default();
        self.store.record_busy(ids, until).await?;
        let now = Instant::now();
        let mut marked = self.marked.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            marked.insert(id.clone(), now);
        }
        Ok(())
    }

    /// Marks the capsule in use until the guard is dropped.
    pub fn hold(&self, id: &str) -> Busy {
        *self.lock().entry(id.to_string()).or_default() += 1;
        self.touch(id);
        let fresh = self
            .marked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|t| t.elapsed() < MARK_AGAIN_AFTER);
        if !fresh {
            // In the background: a hold never waits for the database. Until it lands (a
            // moment), only this replica knows; the next flush retries a failed mark.
            let (activity, ids) = (self.clone(), vec![id.to_string()]);
            tokio::spawn(async move {
                if let Err(e) = activity.mark(&ids).await {
                    tracing::warn!(capsule_id = %ids[0], error = %e, "cannot mark the capsule busy");
                }
            });
        }
        Busy {
            activity: self.clone(),
            id: id.to_string(),
        }
    }

    pub fn is_busy(&self, id: &str) -> bool {
        self.lock().get(id).is_some_and(|n| *n > 0)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.busy.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A capsule in use; see [`Activity::hold`].
pub struct Busy {
    activity: Activity,
    id: String,
}

impl Drop for Busy {
    fn drop(&mut self) {
        {
            let mut map = self.activity.lock();
            if let Some(n) = map.get_mut(&self.id) {
                *n -= 1;
                if *n == 0 {
                    map.remove(&self.id);
                }
            }
        }
        self.activity.touch(&self.id);
    }
}
