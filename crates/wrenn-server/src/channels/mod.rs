//! Notification channels: a team's subscriptions of platform events to a chat room or a
//! webhook, and their delivery.
//!
//! - Config values are sealed at rest with the platform's [`Sealer`] (AES-256-GCM).
//! - [`provider`]: the seven providers' config fields and message formats, and one attempt.
//! - [`ChannelService`]: CRUD (`/v1/channels*`), the test send, and [`ChannelService::run`],
//!   the delivery loop fed by the event bus's `channels` work queue: each event is handled by
//!   one replica, delivered to every subscribed channel with retries, its outcome recorded in
//!   `channel_deliveries`, and acknowledged only then (a replica that dies mid-way leaves the
//!   event to another). Delivery never blocks or fails the action that caused the event.

pub mod provider;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use wrenn_api::id::new_id;
use wrenn_api::{
    ApiError, ChannelDelivery, ChannelResponse, CreateChannelRequest, ErrorCode, Event, EventActor,
    EventKind, Role, RotateConfigRequest, TestChannelRequest, UpdateChannelRequest,
};

use crate::accounts::SessionUser;
use crate::audit::{AuditLog, Record};
use crate::events::{Work, WorkQueue};
pub use crate::sealing::Sealer;
use crate::store::{ChannelRow, Store};
use provider::{Notification, Provider, Sender};

pub const ID_PREFIX: &str = "ch-";
/// The work-queue group every replica's delivery loop joins.
pub const QUEUE_GROUP: &str = "wrenn:channels";
pub const MAX_CHANNELS_PER_TEAM: i64 = 50;
/// Events handled at once by one replica (each may wait on retries).
const CONCURRENT_EVENTS: usize = 64;
/// Delivery records are kept this long.
pub const DELIVERY_RETENTION_DAYS: i64 = 30;

type Result<T> = std::result::Result<T, ApiError>;

#[derive(Debug, Clone)]
pub struct ChannelConfig {
    /// Telegram's bot API base URL (`https://api.telegram.org`).
    pub telegram_api_url: String,
    /// Waits before each retry after a failed attempt (by default 10 s, then 30 s, as the reference platform).
    pub retry_delays: Vec<Duration>,
    /// Let users' URLs reach loopback and private addresses (off: public addresses only).
    pub allow_private_targets: bool,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            telegram_api_url: "https://api.telegram.org".into(),
            retry_delays: vec![Duration::from_secs(10), Duration::from_secs(30)],
            allow_private_targets: false,
        }
    }
}

pub struct ChannelService {
    store: Store,
    cipher: Arc<Sealer>,
    sender: Sender,
    audit: AuditLog,
    retry_delays: Vec<Duration>,
}

/// Names: trimmed, lower-cased, spaces to `-`, then `^[a-z0-9][a-z0-9._-]{0,63}$`.
pub fn normalize_name(n: &str) -> Result<String> {
    let n = n.trim().to_lowercase().replace(' ', "-");
    let ok = n.len() <= 64
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(n)
    } else {
        Err(ApiError::invalid(
            "channel name must be 1 to 64 of letters, digits, '.', '_' and '-', starting with a letter or digit",
        ))
    }
}

fn check_events(events: &[String]) -> Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for e in events {
        if !EventKind::for_channels().any(|k| k.as_str() == e) {
            let names: Vec<&str> = EventKind::for_channels().map(EventKind::as_str).collect();
            return Err(ApiError::invalid(format!(
                "unknown event {e:?}: choose from {}",
                names.join(", ")
            )));
        }
        if !out.contains(e) {
            out.push(e.clone());
        }
    }
    if out.is_empty() {
        return Err(ApiError::invalid("choose at least one event"));
    }
    Ok(out)
}

fn response(c: &ChannelRow, secret: Option<String>) -> ChannelResponse {
    ChannelResponse {
        id: c.id.clone(),
        team_id: c.team_id.clone(),
        name: c.name.clone(),
        provider: c.provider.clone(),
        events: c.events.clone(),
        secret,
        created_at: c.created_at,
        updated_at: c.updated_at,
    }
}

fn actor(u: &SessionUser) -> EventActor {
    EventActor {
        kind: "user".into(),
        id: u.user_id.clone(),
        name: u.email.clone(),
    }
}

fn taken(name: &str) -> ApiError {
    ApiError::new(
        ErrorCode::Conflict,
        format!("the team already has a channel named {name:?}"),
    )
}

fn member(u: &SessionUser) -> Result<Role> {
    u.role.ok_or_else(|| {
        ApiError::forbidden("you are no longer a member of this session's team: switch team")
    })
}

/// Changing channels is for the team's owner and admins.
fn manager(u: &SessionUser) -> Result<()> {
    if member(u)? < Role::Admin {
        return Err(ApiError::forbidden(
            "only the team's owner or admins can change notification channels",
        ));
    }
    Ok(())
}

impl ChannelService {
    pub fn new(store: Store, cipher: Arc<Sealer>, config: ChannelConfig) -> Self {
        Self {
            audit: AuditLog::new(store.clone()),
            store,
            cipher,
            sender: Sender::new(&config.telegram_api_url, config.allow_private_targets),
            retry_delays: config.retry_delays,
        }
    }

    pub async fn create(
        &self,
        u: &SessionUser,
        req: CreateChannelRequest,
    ) -> Result<ChannelResponse> {
        manager(u)?;
        let name = normalize_name(&req.name)?;
        let provider = Provider::parse(&req.provider)?;
        let events = check_events(&req.events)?;
        let mut config = req.config;
        let secret = provider.check_config(&mut config)?;
        if self.store.count_channels(&u.team_id).await? >= MAX_CHANNELS_PER_TEAM {
            return Err(ApiError::invalid(format!(
                "a team can have at most {MAX_CHANNELS_PER_TEAM} channels"
            )));
        }
        let now = Utc::now();
        let row = ChannelRow {
            id: new_id(ID_PREFIX),
            team_id: u.team_id.clone(),
            name,
            provider: provider.as_str().into(),
            events,
            sealed_config: self.cipher.seal_all(&config),
            created_at: now,
            updated_at: now,
        };
        if !self.store.insert_channel(&row).await? {
            return Err(taken(&row.name));
        }
        tracing::info!(channel_id = %row.id, team_id = %row.team_id, provider = %row.provider, "channel created");
        self.audit
            .record(
                Record::new(&actor(u), "channel", &row.id, "create")
                    .team(Some(&row.team_id))
                    .meta("name", row.name.as_str())
                    .meta("provider", row.provider.as_str()),
            )
            .await;
        Ok(response(&row, secret))
    }

    pub async fn list(&self, u: &SessionUser) -> Result<Vec<ChannelResponse>> {
        member(u)?;
        Ok(self
            .store
            .channels(&u.team_id)
            .await?
            .iter()
            .map(|c| response(c, None))
            .collect())
    }

    async fn row(&self, u: &SessionUser, id: &str) -> Result<ChannelRow> {
        member(u)?;
        self.store
            .channel(&u.team_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("channel {id} not found")))
    }

    pub async fn get(&self, u: &SessionUser, id: &str) -> Result<ChannelResponse> {
        Ok(response(&self.row(u, id).await?, None))
    }

    pub async fn update(
        &self,
        u: &SessionUser,
        id: &str,
        req: UpdateChannelRequest,
    ) -> Result<ChannelResponse> {
        self.row(u, id).await?;
        manager(u)?;
        let name = normalize_name(&req.name)?;
        let events = check_events(&req.events)?;
        match self
            .store
            .update_channel(&u.team_id, id, &name, &events, Utc::now())
            .await?
        {
            None => return Err(ApiError::not_found(format!("channel {id} not found"))),
            Some(false) => return Err(taken(&name)),
            Some(true) => {}
        }
        self.audit
            .record(
                Record::new(&actor(u), "channel", id, "update")
                    .team(Some(&u.team_id))
                    .meta("name", name.as_str())
                    .meta("events", events.join(",")),
            )
            .await;
        self.get(u, id).await
    }

    /// Replaces the whole config (a webhook without a secret gets a new one, shown once).
    pub async fn rotate(
        &self,
        u: &SessionUser,
        id: &str,
        req: RotateConfigRequest,
    ) -> Result<ChannelResponse> {
        let row = self.row(u, id).await?;
        manager(u)?;
        let provider = Provider::parse(&row.provider)?;
        let mut config = req.config;
        let secret = provider.check_config(&mut config)?;
        if !self
            .store
            .set_channel_config(&u.team_id, id, &self.cipher.seal_all(&config), Utc::now())
            .await?
        {
            return Err(ApiError::not_found(format!("channel {id} not found")));
        }
        self.audit
            .record(Record::new(&actor(u), "channel", id, "rotate_config").team(Some(&u.team_id)))
            .await;
        Ok(response(&self.row(u, id).await?, secret))
    }

    pub async fn delete(&self, u: &SessionUser, id: &str) -> Result<()> {
        let row = self.row(u, id).await?;
        manager(u)?;
        if !self.store.delete_channel(&u.team_id, id).await? {
            return Err(ApiError::not_found(format!("channel {id} not found")));
        }
        self.audit
            .record(
                Record::new(&actor(u), "channel", id, "delete")
                    .team(Some(&u.team_id))
                    .meta("name", row.name.as_str()),
            )
            .await;
        Ok(())
    }

    /// Sends a `channel.test` notification with a config that is not saved (one attempt).
    pub async fn test(&self, u: &SessionUser, req: TestChannelRequest) -> Result<()> {
        manager(u)?;
        let provider = Provider::parse(&req.provider)?;
        let mut config = req.config;
        provider.check_config(&mut config)?;
        let n = Notification::test(&u.team_id, actor(u));
        self.sender
            .send(provider, &config, &n, &uuid::Uuid::new_v4().to_string())
            .await
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::DeliveryFailed,
                    format!("the test notification was not delivered: {e}"),
                )
            })
    }

    /// The channel's latest deliveries, newest first.
    pub async fn deliveries(
        &self,
        u: &SessionUser,
        id: &str,
        limit: u32,
    ) -> Result<Vec<ChannelDelivery>> {
        self.row(u, id).await?;
        Ok(self.store.deliveries(id, limit).await?)
    }

    /// The longest one event's handling may take: every attempt timing out, every wait, and
    /// a margin. An event unacknowledged for longer is presumed abandoned (its replica died)
    /// and handed to another.
    pub fn max_handling(&self) -> Duration {
        let waits: Duration = self.retry_delays.iter().sum();
        let attempts = self.retry_delays.len() as u32 + 1;
        waits + provider::ATTEMPT_TIMEOUT * attempts + Duration::from_secs(120)
    }

    /// The delivery loop: one task per event (at most [`CONCURRENT_EVENTS`] at once, a slot
    /// taken before the event is read, so none waits unhandled), each acknowledged when all
    /// its deliveries have ended. Ends when `closing` completes; unfinished events stay
    /// unacknowledged for another replica to take over.
    pub async fn run(
        self: Arc<Self>,
        mut queue: WorkQueue,
        closing: impl std::future::Future<Output = ()>,
    ) {
        let slots = Arc::new(tokio::sync::Semaphore::new(CONCURRENT_EVENTS));
        tokio::pin!(closing);
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let work: Work = tokio::select! {
                _ = &mut closing => return,
                w = queue.next() => match w {
                    Some(w) => w,
                    None => return,
                },
            };
            let me = self.clone();
            tokio::spawn(async move {
                match me.dispatch(&work.event, work.key.as_deref()).await {
                    Ok(()) => work.ack().await,
                    // Left unacknowledged: handed out again later (with Redis).
                    Err(e) => {
                        tracing::warn!(error = %e, event = %work.event.event, "notifications not sent: the event will be tried again")
                    }
                }
                drop(permit);
            });
        }
    }

    /// Delivers one event to every channel subscribed to it. `Err` only when the channels
    /// could not be read (nothing was sent); a delivery's own failure is recorded with it.
    pub async fn dispatch(&self, ev: &Event, key: Option<&str>) -> crate::store::Result<()> {
        if ev.event == EventKind::CapsuleStateChanged {
            return Ok(());
        }
        let teams = self.audience(ev).await?;
        let channels = self
            .store
            .subscribed_channels(&teams, ev.event.as_str())
            .await?;
        let jobs = channels.iter().map(|ch| {
            // A redelivered stream entry gets the same delivery ids: what was delivered is
            // not sent again.
            let id = match key {
                Some(k) => uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_OID,
                    format!("wrenn:{k}:{}", ch.id).as_bytes(),
                ),
                None => uuid::Uuid::new_v4(),
            }
            .to_string();
            let n = Notification::of(ev, Some(&ch.team_id));
            async move { self.deliver(ch, &n, &id).await }
        });
        futures_util::future::join_all(jobs).await;
        Ok(())
    }

    /// Teams whose channels hear about `ev`: its team; for a platform host, the teams with
    /// capsules on it and the teams platform admins own.
    async fn audience(&self, ev: &Event) -> crate::store::Result<Vec<String>> {
        if let Some(t) = &ev.team_id {
            return Ok(vec![t.clone()]);
        }
        if ev.resource.kind != "host" {
            return Ok(vec![]);
        }
        let mut teams = self.store.teams_on_host(&ev.resource.id).await?;
        for t in self.store.admin_owned_teams().await? {
            if !teams.contains(&t) {
                teams.push(t);
            }
        }
        Ok(teams)
    }

    async fn deliver(&self, ch: &ChannelRow, n: &Notification, id: &str) {
        let log = |status: &str, attempts: u32, err: Option<&str>| {
            let store = self.store.clone();
            let (id, status, err) = (id.to_string(), status.to_string(), err.map(String::from));
            async move {
                if let Err(e) = store
                    .update_delivery(&id, &status, attempts, err.as_deref(), Utc::now())
                    .await
                {
                    tracing::warn!(error = %e, delivery_id = %id, "delivery outcome not recorded");
                }
            }
        };
        match self
            .store
            .insert_delivery(id, &ch.id, &n.event, Utc::now())
            .await
        {
            Ok(true) => {}
            Ok(false) => {
                if let Ok(Some(d)) = self.store.delivery(id).await {
                    if d.status != "pending" {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, channel_id = %ch.id, "delivery not recorded"),
        }
        let provider = match Provider::parse(&ch.provider) {
            Ok(p) => p,
            Err(e) => return log("failed", 0, Some(&e.message)).await,
        };
        let config: BTreeMap<String, String> = match self.cipher.open_all(&ch.sealed_config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(channel_id = %ch.id, error = %e, "channel config cannot be opened");
                return log("failed", 0, Some(&e.to_string())).await;
            }
        };
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            match self.sender.send(provider, &config, n, id).await {
                Ok(()) => {
                    tracing::info!(channel_id = %ch.id, event = %n.event, delivery_id = %id, attempts, "notification delivered");
                    return log("delivered", attempts, None).await;
                }
                Err(err) => match self.retry_delays.get(attempts as usize - 1) {
                    Some(wait) => {
                        tracing::info!(channel_id = %ch.id, event = %n.event, attempts, error = %err, "notification not delivered; will retry");
                        log("pending", attempts, Some(&err)).await;
                        tokio::time::sleep(*wait).await;
                    }
                    None => {
                        tracing::warn!(channel_id = %ch.id, event = %n.event, attempts, error = %err, "notification not delivered; giving up");
                        return log("failed", attempts, Some(&err)).await;
                    }
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_normalised_then_checked() {
        assert_eq!(normalize_name("  Ops Alerts ").unwrap(), "ops-alerts");
        assert_eq!(normalize_name("a.b_c-1").unwrap(), "a.b_c-1");
        for bad in ["", "-x", "a/b", "é", &"a".repeat(65)] {
            assert!(normalize_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn events_come_from_the_spec_list() {
        assert!(check_events(&[]).is_err());
        assert!(check_events(&["capsule.state.changed".into()]).is_err());
        assert_eq!(
            check_events(&["host.down".into(), "host.down".into()]).unwrap(),
            ["host.down"]
        );
    }
}
