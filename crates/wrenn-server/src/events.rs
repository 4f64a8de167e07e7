//! The event bus: every capsule, template and host event is published here once. Two kinds of
//! consumers read it:
//! - listeners ([`EventBus::subscribe`], the SSE streams): every replica's listeners see every
//!   event, and a listener that falls behind loses events rather than slowing anyone;
//! - work queues ([`EventBus::work_queue`], notification delivery): each event is handed to
//!   one consumer of the queue's group across all replicas, and (with Redis) is handed again
//!   to another if its consumer died before acknowledging it.
//!
//! In-process by default (a broadcast channel). With `REDIS_URL`, events go through one Redis
//! Stream (`wrenn:events`, capped near 10,000 entries, field `payload`): each replica appends
//! what it publishes and a reader task per replica feeds every entry — its own included — to
//! its local subscribers, so all replicas see one ordered stream. A subscriber that falls more
//! than [`BACKLOG`] events behind loses its place (SSE drops such a client) instead of slowing
//! anyone else.

use std::sync::Arc;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc};
use wrenn_api::Event;

/// Events buffered per subscriber before a slow one is cut off.
pub const BACKLOG: usize = 4096;
pub const STREAM: &str = "wrenn:events";
const STREAM_CAP: usize = 10_000;

pub struct EventBus {
    tx: broadcast::Sender<Arc<Event>>,
    redis: Option<redis::aio::MultiplexedConnection>,
    client: Option<redis::Client>,
    /// In-process work queues (without Redis): each gets every published event.
    work: std::sync::Mutex<Vec<mpsc::Sender<Arc<Event>>>>,
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
            client: None,
            work: Default::default(),
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
            client: Some(client),
            work: Default::default(),
            closing: Default::default(),
        })
    }

    /// Publishes an event (never blocks or fails the caller).
    pub fn publish(&self, ev: Event) {
        tracing::debug!(event = %ev.event, resource = %ev.resource.id, "event");
        match &self.redis {
            None => {
                let ev = Arc::new(ev);
                let mut queues = self.work.lock().unwrap_or_else(|e| e.into_inner());
                // A queue whose consumer stopped (shutdown) is forgotten.
                queues.retain(|q| !q.is_closed());
                for q in queues.iter() {
                    if let Err(mpsc::error::TrySendError::Full(_)) = q.try_send(ev.clone()) {
                        tracing::warn!(event = %ev.event, "work queue full: event not queued");
                    }
                }
                drop(queues);
                let _ = self.tx.send(ev);
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

    /// A queue of every event published from now on, shared with the other consumers of
    /// `group` (in every replica, with Redis): each event goes to one of them. An event a
    /// consumer has not acknowledged within `claim_idle` is handed to another (its consumer is
    /// presumed dead): longer than the handling of one event can take.
    pub async fn work_queue(
        &self,
        group: &str,
        claim_idle: Duration,
    ) -> Result<WorkQueue, redis::RedisError> {
        let Some(client) = &self.client else {
            let (tx, rx) = mpsc::channel(WORK_BACKLOG);
            self.work.lock().unwrap_or_else(|e| e.into_inner()).push(tx);
            return Ok(WorkQueue::Local(rx));
        };
        let conn = client.get_multiplexed_async_connection().await?;
        let mut q = RedisQueue {
            reader: client.get_multiplexed_async_connection().await?,
            conn,
            group: group.to_string(),
            consumer: wrenn_api::id::new_id("cp-"),
            ready: VecDeque::new(),
            last_claim: None,
            claim_idle,
        };
        q.create_group().await?;
        q.forget_dead_consumers().await;
        Ok(WorkQueue::Redis(Box::new(q)))
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

/// Events queued for an in-process work queue before new ones are dropped (and logged).
const WORK_BACKLOG: usize = 65_536;
const CLAIM_EVERY: Duration = Duration::from_secs(30);
/// Consumers (replicas that stopped) idle this long with nothing pending are removed.
const DEAD_CONSUMER: Duration = Duration::from_secs(24 * 3600);

/// A source of events for one consumer group (see [`EventBus::work_queue`]).
pub enum WorkQueue {
    Local(mpsc::Receiver<Arc<Event>>),
    Redis(Box<RedisQueue>),
}

/// One event to handle; [`Work::ack`] when done, so it is not handed out again.
pub struct Work {
    pub event: Arc<Event>,
    /// The stream entry's id (Redis): stable across redeliveries.
    pub key: Option<String>,
    ack: Option<(redis::aio::MultiplexedConnection, String)>,
}

impl Work {
    pub async fn ack(self) {
        if let (Some((mut conn, group)), Some(key)) = (self.ack, self.key) {
            let r: Result<i64, _> = redis::cmd("XACK")
                .arg(STREAM)
                .arg(&group)
                .arg(&key)
                .query_async(&mut conn)
                .await;
            if let Err(e) = r {
                tracing::warn!(error = %e, entry = %key, "event not acknowledged");
            }
        }
    }
}

impl WorkQueue {
    /// The next event (`None`: the bus is gone).
    pub async fn next(&mut self) -> Option<Work> {
        match self {
            WorkQueue::Local(rx) => rx.recv().await.map(|event| Work {
                event,
                key: None,
                ack: None,
            }),
            WorkQueue::Redis(q) => Some(q.next().await),
        }
    }
}

pub struct RedisQueue {
    /// Blocking reads.
    reader: redis::aio::MultiplexedConnection,
    /// Claims and acknowledgements.
    conn: redis::aio::MultiplexedConnection,
    group: String,
    consumer: String,
    ready: VecDeque<Work>,
    last_claim: Option<Instant>,
    claim_idle: Duration,
}

impl RedisQueue {
    /// Creates the group at the stream's end (events from before it existed are not work).
    async fn create_group(&mut self) -> Result<(), redis::RedisError> {
        let r: Result<String, redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(STREAM)
            .arg(&self.group)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut self.conn)
            .await;
        match r {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes consumers of stopped replicas: idle for a day with nothing pending (a consumer
    /// with pending entries stays until another claims them). Each replica is a new consumer.
    async fn forget_dead_consumers(&mut self) {
        let info: Result<Vec<std::collections::HashMap<String, redis::Value>>, _> =
            redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(STREAM)
                .arg(&self.group)
                .query_async(&mut self.conn)
                .await;
        let Ok(consumers) = info else { return };
        for c in consumers {
            let int = |k: &str| match c.get(k) {
                Some(redis::Value::Int(n)) => *n,
                _ => -1,
            };
            let name = match c.get("name") {
                Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
                _ => continue,
            };
            if int("pending") == 0 && int("idle") >= DEAD_CONSUMER.as_millis() as i64 {
                let _: Result<i64, _> = redis::cmd("XGROUP")
                    .arg("DELCONSUMER")
                    .arg(STREAM)
                    .arg(&self.group)
                    .arg(&name)
                    .query_async(&mut self.conn)
                    .await;
            }
        }
    }

    fn take(&mut self, entries: Vec<redis::streams::StreamId>) {
        for entry in entries {
            let payload: Option<String> = entry.get("payload");
            match payload.as_deref().map(serde_json::from_str::<Event>) {
                Some(Ok(ev)) => self.ready.push_back(Work {
                    event: Arc::new(ev),
                    key: Some(entry.id),
                    ack: Some((self.conn.clone(), self.group.clone())),
                }),
                _ => {
                    tracing::warn!(id = %entry.id, "unreadable event on the stream: acknowledged");
                    let mut conn = self.conn.clone();
                    let group = self.group.clone();
                    tokio::spawn(async move {
                        let _: Result<i64, _> = redis::cmd("XACK")
                            .arg(STREAM)
                            .arg(group)
                            .arg(entry.id)
                            .query_async(&mut conn)
                            .await;
                    });
                }
            }
        }
    }

    async fn next(&mut self) -> Work {
        loop {
            if let Some(w) = self.ready.pop_front() {
                return w;
            }
            // Entries another consumer took and never acknowledged (it died) are ours now.
            if self.last_claim.is_none_or(|t| t.elapsed() >= CLAIM_EVERY) {
                self.last_claim = Some(Instant::now());
                let r: Result<redis::streams::StreamAutoClaimReply, _> = redis::cmd("XAUTOCLAIM")
                    .arg(STREAM)
                    .arg(&self.group)
                    .arg(&self.consumer)
                    .arg(self.claim_idle.as_millis() as u64)
                    .arg("0-0")
                    .arg("COUNT")
                    .arg(64)
                    .query_async(&mut self.conn)
                    .await;
                match r {
                    Ok(reply) if !reply.claimed.is_empty() => {
                        tracing::info!(entries = reply.claimed.len(), group = %self.group, "claimed events another replica left unfinished");
                        self.take(reply.claimed);
                        continue;
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "event claim failed"),
                }
            }
            let r: Result<redis::streams::StreamReadReply, _> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(&self.group)
                .arg(&self.consumer)
                .arg("COUNT")
                .arg(64)
                .arg("BLOCK")
                .arg(5000)
                .arg("STREAMS")
                .arg(STREAM)
                .arg(">")
                .query_async(&mut self.reader)
                .await;
            match r {
                Ok(reply) => {
                    for key in reply.keys {
                        self.take(key.ids);
                    }
                }
                Err(e) => {
                    if e.code() == Some("NOGROUP") {
                        // The stream was deleted under us: start again at its end.
                        let _ = self.create_group().await;
                    } else {
                        tracing::warn!(error = %e, "event queue read failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}
