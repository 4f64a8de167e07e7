//! Team quotas: the limits platform admins set (`team_quotas`) and what a team holds now.

use chrono::{DateTime, Utc};
use sqlx::Row;
use wrenn_api::quota::{QuotaFigures, QuotaOverrides};

use super::{ts, Result, Store};

/// Capsule states that hold (or are getting, or may still hold) a VM: they count against the
/// running vCPU and memory limits. The same set reserves room on hosts.
const HOLDING_VM: &str =
    "('pending', 'starting', 'running', 'pausing', 'resuming', 'snapshotting', 'missing')";

impl Store {
    /// The limits set for `team_id` (`None` fields: the platform default).
    pub async fn team_quota(&self, team_id: &str) -> Result<QuotaOverrides> {
        let row = sqlx::query(
            "SELECT capsules, vcpus, memory_mb, disk_mb, snapshots FROM team_quotas WHERE team_id = $1",
        )
        .bind(team_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => QuotaOverrides {
                capsules: r.try_get(0)?,
                vcpus: r.try_get(1)?,
                memory_mb: r.try_get(2)?,
                disk_mb: r.try_get(3)?,
                snapshots: r.try_get(4)?,
            },
            None => QuotaOverrides::default(),
        })
    }

    /// Replaces the limits set for `team_id`.
    pub async fn set_team_quota(
        &self,
        team_id: &str,
        q: &QuotaOverrides,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO team_quotas (team_id, capsules, vcpus, memory_mb, disk_mb, snapshots, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (team_id) DO UPDATE SET \
             capsules = excluded.capsules, vcpus = excluded.vcpus, memory_mb = excluded.memory_mb, \
             disk_mb = excluded.disk_mb, snapshots = excluded.snapshots, updated_at = excluded.updated_at",
        )
        .bind(team_id)
        .bind(q.capsules)
        .bind(q.vcpus)
        .bind(q.memory_mb)
        .bind(q.disk_mb)
        .bind(q.snapshots)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What `team_id` holds now, in the units of its quota.
    pub async fn team_usage(&self, team_id: &str) -> Result<QuotaFigures> {
        let r = sqlx::query(&format!(
            "SELECT \
               (SELECT COUNT(*) FROM capsules WHERE team_id = $1 AND status NOT IN ('stopped', 'error')), \
               (SELECT COALESCE(SUM(vcpus), 0) FROM capsules WHERE team_id = $1 AND status IN {HOLDING_VM}), \
               (SELECT COALESCE(SUM(memory_mb), 0) FROM capsules WHERE team_id = $1 AND status IN {HOLDING_VM}), \
               (SELECT COALESCE(SUM(disk_size_mb), 0) FROM capsules WHERE team_id = $1 AND status NOT IN ('stopped', 'error')), \
               (SELECT COUNT(*) FROM templates WHERE team_id = $1)"
        ))
        .bind(team_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(QuotaFigures {
            capsules: r.try_get(0)?,
            vcpus: r.try_get(1)?,
            memory_mb: r.try_get(2)?,
            disk_mb: r.try_get(3)?,
            snapshots: r.try_get(4)?,
        })
    }
}
