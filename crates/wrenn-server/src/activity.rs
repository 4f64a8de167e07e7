//! Which capsules are in use right now, for the inactivity timer (TTL auto-pause).
//!
//! Every request that works inside a capsule records activity when it starts; one that stays
//! attached (a foreground exec, an exec or process stream, a terminal, a file transfer) also
//! holds a [`Busy`] guard for as long as it lasts. A capsule with a guard out is never
//! auto-paused, and dropping the last guard records activity again, so the timer counts from
//! the end of the work, not its start.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::store::Store;

#[derive(Clone)]
pub struct Activity {
    store: Store,
    busy: Arc<Mutex<HashMap<String, usize>>>,
}

impl Activity {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            busy: Arc::default(),
        }
    }

    /// Records activity without making the request wait for the write.
    pub fn touch(&self, id: &str) {
        let (store, id) = (self.store.clone(), id.to_string());
        tokio::spawn(async move {
            if let Err(e) = store.touch_capsule(&id).await {
                warn!(capsule_id = %id, error = %e, "cannot record activity");
            }
        });
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
        if tokio::runtime::Handle::try_current().is_ok() {
            self.activity.touch(&self.id);
        }
    }
}
