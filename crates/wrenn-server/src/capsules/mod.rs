//! What the capsule API means: validation, state transitions and calls to the host.
//!
//! State machine: `starting` → `running` ⇄ `pausing` → `paused` ⇄ `resuming` → `running`,
//! `running` → `snapshotting` → `running`, any of them → `stopping` → `stopped`, and any
//! non-terminal state → `error` when the host fails (or `missing` while it is unreachable).
//! Rows are never deleted: `GET` answers any state, the list hides `stopped` and `error`.
//!
//! Split by concern: `lifecycle` (create, destroy, pause, resume), `exec` (commands,
//! processes, the guest agent for files and terminals), `snapshots` (snapshot templates,
//! metrics), `reconcile` (the database against what hosts hold; the TTL reaper and the
//! dead-VM pass), `host_events` (hosts coming and going), `events` (what is published and
//! audited), `activity` (what is in use, for the inactivity timer), `proxy` and `access` (the
//! port proxy's way into a capsule, and who besides the team may take it), `network` (where
//! its guest may connect to), `quotas` (what a team may hold, checked where it takes more).

mod access;
mod activity;
mod events;
mod exec;
mod host_events;
mod lifecycle;
mod network;
mod proxy;
mod quotas;
mod reconcile;
mod snapshots;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use wrenn_api::{ApiError, Capsule, CapsuleStatus, ErrorCode};

use crate::events::EventBus;
use crate::hosts::copies::TemplateCopies;
use crate::hosts::pool::HostPool;
use crate::store::{CapsuleRow, Store};
pub use access::Admission;
pub use activity::{Activity, Busy};
pub use events::Emitter;
pub use exec::{pty_spec, ExecOutcome};

/// For what a state-changing path cannot fix right now but must not hide (a store write after
/// the host acted, a clean-up call to the host): the error is logged with the capsule and its
/// host, and the path goes on.
trait OrLog {
    fn or_log(self, what: &str, capsule_id: &str, host_id: &str);
}

impl<T, E: std::fmt::Display> OrLog for std::result::Result<T, E> {
    fn or_log(self, what: &str, capsule_id: &str, host_id: &str) {
        if let Err(e) = self {
            tracing::warn!(capsule_id, host_id, error = %e, "{what} failed");
        }
    }
}

pub struct CapsuleService {
    store: Store,
    pool: Arc<HostPool>,
    activity: Activity,
    events: Emitter,
    copies: Arc<TemplateCopies>,
    /// Signs proxy access tokens; read from the store on first use.
    token_key: tokio::sync::OnceCell<access::TokenKey>,
    quotas: quotas::Quotas,
}

/// Why a capsule is paused (kept in its row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseReason {
    /// `POST /pause`.
    User,
    /// The inactivity timeout passed.
    TtlExpired,
}

impl PauseReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PauseReason::User => "user",
            PauseReason::TtlExpired => "ttl_expired",
        }
    }
}

type Result<T> = std::result::Result<T, ApiError>;

impl CapsuleService {
    pub fn new(store: Store, pool: Arc<HostPool>, bus: Arc<EventBus>) -> Self {
        Self {
            activity: Activity::new(store.clone()),
            events: Emitter::new(store.clone(), bus),
            copies: Arc::new(TemplateCopies::new(store.clone(), pool.clone())),
            store,
            pool,
            token_key: Default::default(),
            quotas: quotas::Quotas::new(wrenn_api::quota::QuotaFigures::DEFAULT),
        }
    }

    /// Team quotas default to `defaults` (unless a platform admin set a team's own).
    pub fn with_quota_defaults(mut self, defaults: wrenn_api::quota::QuotaFigures) -> Self {
        self.quotas = quotas::Quotas::new(defaults);
        self
    }

    /// The capsule if it belongs to the team; another team's capsule is "not found".
    pub async fn get(&self, team_id: &str, id: &str) -> Result<Capsule> {
        Ok(self.with_activity(self.owned(team_id, id).await?.capsule))
    }

    pub async fn list(&self, team_id: &str) -> Result<Vec<Capsule>> {
        Ok(self
            .store
            .list_live_capsules(team_id)
            .await?
            .into_iter()
            .map(|r| self.with_activity(r.capsule))
            .collect())
    }

    /// Every team's live capsules (platform admins).
    pub async fn list_all(&self) -> Result<Vec<Capsule>> {
        Ok(self
            .store
            .list_all_live_capsules()
            .await?
            .into_iter()
            .map(|r| self.with_activity(r.capsule))
            .collect())
    }

    /// The capsule with its activity recorded since the last flush.
    fn with_activity(&self, mut c: Capsule) -> Capsule {
        if let Some(t) = self.activity.last_active(&c.id) {
            if c.last_active_at.is_none_or(|db| db < t) {
                c.last_active_at = Some(t);
            }
        }
        c
    }

    /// Records activity on a capsule without making the request wait for the write.
    fn touch(&self, id: &str) {
        self.activity.touch(id);
    }

    /// Marks a capsule in use (never auto-paused) until the guard is dropped.
    pub fn hold(&self, id: &str) -> Busy {
        self.activity.hold(id)
    }

    /// `POST /ping`: resets the inactivity timer of a running capsule (recorded before the
    /// answer, so a client that reads the capsule next sees it).
    pub async fn ping(&self, team_id: &str, id: &str) -> Result<()> {
        self.require_running(team_id, id).await?;
        self.store.touch_capsule(id).await?;
        Ok(())
    }

    /// The capsule if it belongs to the team and is running (404 / 409 otherwise).
    pub async fn require_running(&self, team_id: &str, id: &str) -> Result<CapsuleRow> {
        let row = self.owned(team_id, id).await?;
        if row.capsule.status == CapsuleStatus::Missing {
            return Err(ApiError::new(
                ErrorCode::HostUnavailable,
                format!("capsule {id} is missing: its host is not reachable right now"),
            ));
        }
        if row.capsule.status != CapsuleStatus::Running {
            return Err(ApiError::invalid_state(format!(
                "capsule {id} is {}, not running",
                row.capsule.status.as_str()
            )));
        }
        Ok(row)
    }

    async fn owned(&self, team_id: &str, id: &str) -> Result<CapsuleRow> {
        match self.store.capsule(id).await? {
            Some(row) if row.team_id == team_id => Ok(row),
            _ => Err(ApiError::not_found(format!("capsule {id} not found"))),
        }
    }
}

#[async_trait::async_trait]
impl crate::accounts::TeamCapsules for CapsuleService {
    async fn destroy_team_capsules(&self, team_id: &str) {
        let capsules = match self.list(team_id).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(team_id, error = %e.message, "cannot list the team's capsules");
                return;
            }
        };
        for c in capsules {
            if let Err(e) = self
                .destroy(
                    team_id,
                    &c.id,
                    &wrenn_api::EventActor::system("team-cleanup"),
                )
                .await
            {
                tracing::warn!(team_id, capsule_id = %c.id, error = %e.message, "destroy with its team failed");
            }
        }
    }
}
