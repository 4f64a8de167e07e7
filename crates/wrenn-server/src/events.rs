//! The event bus: every capsule, template and host event is published here once; the SSE
//! streams (and, later, the audit log and notification channels) subscribe.
//!
//! In-process by default (a broadcast channel). With `REDIS_URL`, events go through one Redis
//! Stream (`wrenn:events`, capped near 10,000 entries, field `payload`): each replica appends
//! what it publishes and a reader task per replica feeds every entry — its own included — to
//! its local subscribers, so all replicas see one ordered stream. A subscriber that falls more
//! than [`BACKLOG`] events behind loses its place (SSE drops such a client) instead of slowing
//! anyone else.

use std::sync::Arc;

use tokio::sync::broadcast;
use wrenn_api::Event;

/// Events buffered per subscriber before a slow one is cut off.
pub const BACKLOG: usize = 4096;
pub const STREAM: &str = "wrenn:events";
const STREAM_CAP: usize = 10_000;

pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    redis: Option<redis::aio::MultiplexedConnection>,
    /// Cancelled at shutdown: every open stream ends, so a graceful shutdown does not wait
    /// for clients that would listen forever.
    closing: tokio_util::sync::CancellationToken,
}

impl EventBus {
    /// A bus within this process.
    pub fn local() -> Self {
        Self {
            tx: broadcast::channel(BACKLOG).0,
            redis: None,
            closing: Default::default(),
        }
    }

    /// A bus shared by every replica through a Redis Stream.
    pub async fn redis(url: &str) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(url)?;
        let writer = client.get_multiplexed_async_connection().await?;
        // Blocking reads get a connection of their own.
        let mut reader = client.get_multiplexed_async_connection().await?;
        let (tx, _) = broadcast::channel(BACKLOG);
        let feed = tx.clone();
        tokio::spawn(async move {
            // Start at the end: events published before this replica started are not replayed.
            let mut last = "$".to_string();
            loop {
                let reply: Result<redis::streams::StreamReadReply, _> = redis::cmd("XREAD")
                    .arg("BLOCK")
                    .arg(5000)
                    .arg("COUNT")
                    .arg(256)
                    .arg("STREAMS")
                    .arg(STREAM)
                    .arg(&last)
                    .query_async(&mut reader)
                    .await;
                match reply {
                    Ok(r) => {
                        for key in r.keys {
                            for entry in key.ids {
                                last = entry.id.clone();
                                let payload: Option<String> = entry.get("payload");
                                match payload.as_deref().map(serde_json::from_str::<Event>) {
                                    Some(Ok(ev)) => {
                                        let _ = feed.send(Arc::new(ev));
                                    }
                                    _ => {
                                        tracing::warn!(id = %entry.id, "unreadable event on the stream")
                                    }
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream read failed; retrying");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Self {
            tx,
            redis: Some(writer),
            closing: Default::default(),
        })
    }

    /// Publishes an event (never blocks or fails the caller).
    pub fn publish(&self, ev: Event) {
        tracing::debug!(event = %ev.event, resource = %ev.resource.id, "event");
        match &self.redis {
            None => {
                let _ = self.tx.send(Arc::new(ev));
            }
            Some(conn) => {
                let mut conn = conn.clone();
                tokio::spawn(async move {
                    let Ok(payload) = serde_json::to_string(&ev) else {
                        return;
                    };
                    let r: Result<String, _> = redis::cmd("XADD")
                        .arg(STREAM)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(STREAM_CAP)
                        .arg("*")
                        .arg("payload")
                        .arg(payload)
                        .query_async(&mut conn)
                        .await;
                    if let Err(e) = r {
                        tracing::warn!(error = %e, event = %ev.event, "event not published to Redis");
                    }
                });
            }
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Event>> {
        self.tx.subscribe()
    }

    /// Ends every stream (shutdown).
    pub fn close(&self) {
        self.closing.cancel();
    }

    /// Completes when the bus is closing.
    pub fn closed(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.closing.clone().cancelled_owned()
    }
}
