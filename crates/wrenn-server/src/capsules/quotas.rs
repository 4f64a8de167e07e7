//! Team quotas where a team takes more: a create (a capsule, its vCPUs, memory and disk), a
//! resume (vCPUs and memory again) and a snapshot template. Platform builds (the platform
//! team) are not limited.
//!
//! A check and the write it admits happen under the team's admission lock, so concurrent
//! requests of one team cannot together pass a limit each passes alone. The lock is this
//! replica's: replicas sharing a database may overshoot by the requests admitted at the same
//! moment on others.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedMutexGuard;
use wrenn_api::id::PLATFORM_TEAM_ID;
use wrenn_api::quota::{QuotaFigures, QuotaOverrides, TeamQuota};
use wrenn_api::{ApiError, ErrorCode};

use super::{CapsuleService, Result};

/// The platform's defaults and the per-team admission locks.
pub struct Quotas {
    defaults: QuotaFigures,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Quotas {
    pub fn new(defaults: QuotaFigures) -> Self {
        Self {
            defaults,
            locks: Mutex::default(),
        }
    }

    async fn lock(&self, team_id: &str) -> OwnedMutexGuard<()> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(team_id.to_string())
            .or_default()
            .clone();
        lock.lock_owned().await
    }
}

/// What a request would add to the team's holdings.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ask {
    pub capsules: i64,
    pub vcpus: i64,
    pub memory_mb: i64,
    pub disk_mb: i64,
    pub snapshots: i64,
}

/// Holds the team's admission lock until the admitted change is recorded.
pub struct Admission(#[allow(dead_code)] Option<OwnedMutexGuard<()>>);

/// `Err(quota_exceeded)` naming the first limit `ask` would pass.
fn check(team_id: &str, limits: &QuotaFigures, usage: &QuotaFigures, ask: &Ask) -> Result<()> {
    let asked = QuotaFigures {
        capsules: ask.capsules,
        vcpus: ask.vcpus,
        memory_mb: ask.memory_mb,
        disk_mb: ask.disk_mb,
        snapshots: ask.snapshots,
    };
    for (((name, limit), (_, used)), (_, more)) in limits
        .named()
        .into_iter()
        .zip(usage.named())
        .zip(asked.named())
    {
        if more > 0 && used + more > limit {
            return Err(ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "team quota exceeded: {name} limit is {limit}, {used} in use, this needs {more} more \
                     (free some, or ask a platform admin to raise it: PUT /v1/admin/teams/{team_id}/quota)"
                ),
            ));
        }
    }
    Ok(())
}

impl CapsuleService {
    /// Admits `ask` for `team_id` or answers which limit it passes. Keep the admission until
    /// the change is recorded (the capsule row written, the status moved).
    pub(super) async fn admit(&self, team_id: &str, ask: Ask) -> Result<Admission> {
        if team_id == PLATFORM_TEAM_ID {
            return Ok(Admission(None));
        }
        let guard = self.quotas.lock(team_id).await;
        let q = self.quota(team_id).await?;
        check(team_id, &q.limits, &q.usage, &ask)?;
        Ok(Admission(Some(guard)))
    }

    /// The team's limits, what was set for it, and what it holds.
    pub async fn quota(&self, team_id: &str) -> Result<TeamQuota> {
        let overrides = self.store.team_quota(team_id).await?;
        Ok(TeamQuota {
            team_id: team_id.to_string(),
            limits: overrides.over(&self.quotas.defaults),
            overrides,
            usage: self.store.team_usage(team_id).await?,
        })
    }

    /// Replaces what is set for the team (platform admins). Lowering a limit below what the
    /// team holds takes nothing away: it only refuses more.
    pub async fn set_quota(&self, team_id: &str, overrides: QuotaOverrides) -> Result<TeamQuota> {
        overrides.validate().map_err(ApiError::invalid)?;
        if self.store.team(team_id).await?.is_none() {
            return Err(ApiError::not_found(format!("team {team_id} not found")));
        }
        self.store
            .set_team_quota(team_id, &overrides, chrono::Utc::now())
            .await?;
        self.quota(team_id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_limit_passed_is_named() {
        let limits = QuotaFigures {
            capsules: 3,
            vcpus: 4,
            memory_mb: 4096,
            disk_mb: 10_000,
            snapshots: 1,
        };
        let usage = QuotaFigures {
            capsules: 2,
            vcpus: 3,
            memory_mb: 1024,
            disk_mb: 0,
            snapshots: 1,
        };
        let create = |vcpus| Ask {
            capsules: 1,
            vcpus,
            memory_mb: 512,
            disk_mb: 1024,
            snapshots: 0,
        };
        assert!(
            check("t", &limits, &usage, &create(1)).is_ok(),
            "exactly at the limit"
        );
        let e = check("t", &limits, &usage, &create(2)).unwrap_err();
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(
            e.message
                .contains("vcpus limit is 4, 3 in use, this needs 2"),
            "{}",
            e.message
        );
        // A limit already passed (lowered by an admin) refuses only what asks for more of it.
        let snap = Ask {
            snapshots: 1,
            ..Default::default()
        };
        assert!(check("t", &limits, &usage, &snap)
            .unwrap_err()
            .message
            .contains("snapshots"));
        let resume = Ask {
            vcpus: 1,
            memory_mb: 512,
            ..Default::default()
        };
        assert!(check("t", &limits, &usage, &resume).is_ok());
    }
}
