//! Live build logs: what running builds publish while they run, for `/stream` followers.
//!
//! Finished steps are in the build's record; this only carries what the record cannot yet:
//! the running step's start and output, step ends as they happen, and the final status. A
//! follower subscribes (getting the running step's events so far, bounded) before it reads
//! the record, and skips step ends the record already holds, so it misses nothing and sees
//! nothing twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::broadcast;
use wrenn_api::{BuildLog, BuildPhase, BuildStatus};

/// Events of the running step kept for late followers (beyond it the oldest output goes).
const BACKLOG_EVENTS: usize = 512;
/// Live events buffered per follower; a follower that falls this far behind is told so and
/// ends (it can reconnect and read the record).
const CHANNEL_EVENTS: usize = 1024;

/// One live event of a build.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LiveEvent {
    /// A step began.
    Step {
        phase: BuildPhase,
        step: u32,
        cmd: String,
    },
    /// Output of the running step (UTF-8, invalid bytes replaced).
    Output {
        phase: BuildPhase,
        step: u32,
        stream: &'static str,
        data: String,
    },
    /// A step ended (also in the record from now on).
    Log(BuildLog),
    /// The build moved to `status` (the stream ends after a final one).
    Status {
        status: BuildStatus,
        error: Option<String>,
    },
    /// The follower fell behind by `missed` events and is cut off (it can reconnect: the
    /// record holds every finished step). Never published: a follower's own.
    Lagged { missed: u64 },
}

struct Channel {
    tx: broadcast::Sender<LiveEvent>,
    backlog: Vec<LiveEvent>,
}

/// The live channels of builds running in this process.
#[derive(Clone, Default)]
pub struct LiveLogs {
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// A follower's view: the running step's events so far, then everything live.
pub struct Follower {
    pub backlog: Vec<LiveEvent>,
    pub rx: broadcast::Receiver<LiveEvent>,
}

impl LiveLogs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Channel>> {
        self.channels.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Publishes an event of build `id` (opening its channel on first use).
    pub fn publish(&self, id: &str, ev: LiveEvent) {
        let mut map = self.lock();
        let ch = map.entry(id.to_string()).or_insert_with(|| Channel {
            tx: broadcast::channel(CHANNEL_EVENTS).0,
            backlog: Vec::new(),
        });
        match &ev {
            // A new step (or the end of one) starts a new backlog.
            LiveEvent::Step { .. } => ch.backlog = vec![ev.clone()],
            LiveEvent::Log(_) | LiveEvent::Status { .. } => ch.backlog.clear(),
            LiveEvent::Lagged { .. } => return,
            LiveEvent::Output { .. } => {
                if ch.backlog.len() >= BACKLOG_EVENTS {
                    // Keep the step's start; drop its oldest output.
                    ch.backlog.remove(1.min(ch.backlog.len() - 1));
                }
                ch.backlog.push(ev.clone());
            }
        }
        let _ = ch.tx.send(ev);
    }

    /// Follows build `id` from now on.
    pub fn follow(&self, id: &str) -> Follower {
        let mut map = self.lock();
        let ch = map.entry(id.to_string()).or_insert_with(|| Channel {
            tx: broadcast::channel(CHANNEL_EVENTS).0,
            backlog: Vec::new(),
        });
        Follower {
            backlog: ch.backlog.clone(),
            rx: ch.tx.subscribe(),
        }
    }

    /// Forgets a finished build's channel (followers still drain what was sent).
    pub fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Forgets channels nobody publishes to or follows (followers of a build that never ran
    /// in this process, e.g. a finished one).
    pub fn prune(&self, keep: impl Fn(&str) -> bool) {
        self.lock()
            .retain(|id, ch| keep(id) || ch.tx.receiver_count() > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn out(step: u32, s: &str) -> LiveEvent {
        LiveEvent::Output {
            phase: BuildPhase::Recipe,
            step,
            stream: "stdout",
            data: s.into(),
        }
    }

    #[tokio::test]
    async fn late_followers_get_the_running_step_then_live_events() {
        let live = LiveLogs::default();
        live.publish(
            "b",
            LiveEvent::Step {
                phase: BuildPhase::Recipe,
                step: 1,
                cmd: "RUN x".into(),
            },
        );
        live.publish("b", out(1, "one"));
        let mut f = live.follow("b");
        assert_eq!(f.backlog.len(), 2);
        live.publish("b", out(1, "two"));
        match f.rx.recv().await.unwrap() {
            LiveEvent::Output { data, .. } => assert_eq!(data, "two"),
            other => panic!("{other:?}"),
        }
        live.publish(
            "b",
            LiveEvent::Status {
                status: BuildStatus::Success,
                error: None,
            },
        );
        assert!(live.follow("b").backlog.is_empty());
    }

    #[test]
    fn the_backlog_is_bounded_and_keeps_the_step() {
        let live = LiveLogs::default();
        live.publish(
            "b",
            LiveEvent::Step {
                phase: BuildPhase::Recipe,
                step: 1,
                cmd: "RUN yes".into(),
            },
        );
        for i in 0..(BACKLOG_EVENTS * 3) {
            live.publish("b", out(1, &i.to_string()));
        }
        let f = live.follow("b");
        assert_eq!(f.backlog.len(), BACKLOG_EVENTS);
        assert!(matches!(f.backlog[0], LiveEvent::Step { .. }));
        match f.backlog.last().unwrap() {
            LiveEvent::Output { data, .. } => {
                assert_eq!(data, &(BACKLOG_EVENTS * 3 - 1).to_string())
            }
            other => panic!("{other:?}"),
        }
    }
}
