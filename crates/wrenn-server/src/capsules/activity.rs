//! Which capsules are in use right now, for the inactivity timer (TTL auto-pause).
//!
//! Every request that works inside a capsule records activity when it starts; one that stays
//! attached (a foreground exec, an exec or process stream, a terminal, a file transfer) also
//! holds a [`Busy`] guard for as long as it lasts. A capsule with a guard out is never
//! auto-paused, and dropping the last guard records activity again, so the timer counts from
//! the end of the work, not its start.
//!
//! Activity is recorded in memory and written to the database in one batch by [`Activity::flush`]
//! (the reaper calls it before every pass), so a request costs no database write; reads of a
//! capsule overlay the newer in-memory time ([`Activity::last_active`]).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

use crate::store::{Result, Store};

#[derive(Clone)]
pub struct Activity {
    store: Store,
    busy: Arc<Mutex<HashMap<String, usize>>>,
    /// Activity not yet written to the database.
    pending: Arc<Mutex<HashMap<String, DateTime<Utc>>>>,
}

impl Activity {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            busy: Arc::default(),
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

    /// Writes the recorded activity to the database in one transaction. On failure the
    /// entries are kept for the next flush.
    pub async fn flush(&self) -> Result<()> {
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

    /// Marks the capsule in use until the guard is dropped.
    pub fn hold(&self, id: &str) -> Busy {
        *self.lock().entry(id.to_string()).or_default() += 1;
        self.touch(id);
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
