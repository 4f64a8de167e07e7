//! Team statistics: sampler rows and daily usage rollups.

use chrono::{DateTime, NaiveDate, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{parse_ts, ts, Result, Store, StoreError};

/// What a team holds at one moment: capsules with a VM and the resources reserved for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TeamLoad {
    pub running: u32,
    pub vcpus: u32,
    pub memory_mb: u32,
}

impl TeamLoad {
    pub fn is_zero(&self) -> bool {
        *self == TeamLoad::default()
    }

    /// Field-wise maximum.
    pub fn max(self, o: TeamLoad) -> TeamLoad {
        TeamLoad {
            running: self.running.max(o.running),
            vcpus: self.vcpus.max(o.vcpus),
            memory_mb: self.memory_mb.max(o.memory_mb),
        }
    }
}

/// Statuses in which a capsule has a VM on a host, and so holds its vCPUs and memory.
const RESERVING: &str =
    "status IN ('starting', 'running', 'snapshotting', 'pausing', 'resuming', 'stopping')";

fn load_of(r: &AnyRow) -> Result<TeamLoad> {
    let n = |c: &str| -> Result<u32> {
        let v: Option<i64> = r.try_get(c)?;
        u32::try_from(v.unwrap_or(0)).map_err(|_| StoreError::Corrupt(format!("{c} out of range")))
    };
    Ok(TeamLoad {
        running: n("running")?,
        vcpus: n("vcpus")?,
        memory_mb: n("memory_mb")?,
    })
}

impl Store {
    /// The current load of every team that holds at least one VM.
    pub async fn load_by_team(&self) -> Result<Vec<(String, TeamLoad)>> {
        let rows = sqlx::query(&format!(
            "SELECT team_id, COUNT(*) AS running, SUM(vcpus) AS vcpus, SUM(memory_mb) AS memory_mb \
             FROM capsules WHERE {RESERVING} GROUP BY team_id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("team_id")?, load_of(r)?)))
            .collect()
    }

    /// The current load of one team.
    pub async fn team_load(&self, team_id: &str) -> Result<TeamLoad> {
        let r = sqlx::query(&format!(
            "SELECT COUNT(*) AS running, SUM(vcpus) AS vcpus, SUM(memory_mb) AS memory_mb \
             FROM capsules WHERE team_id = $1 AND {RESERVING}"
        ))
        .bind(team_id)
        .fetch_one(&self.pool)
        .await?;
        load_of(&r)
    }

    /// Records one sampler tick: a row per team, all at `at`.
    pub async fn insert_stats_samples(
        &self,
        at: DateTime<Utc>,
        samples: &[(String, TeamLoad)],
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (team, l) in samples {
            sqlx::query(
                "INSERT INTO team_stats_samples (team_id, sampled_at, running_count, vcpus, memory_mb) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(team)
            .bind(ts(at))
            .bind(i64::from(l.running))
            .bind(i64::from(l.vcpus))
            .bind(i64::from(l.memory_mb))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A team's samples taken at or after `since`, oldest first.
    pub async fn stats_samples(
        &self,
        team_id: &str,
        since: DateTime<Utc>,
    ) -> Result<Vec<(DateTime<Utc>, TeamLoad)>> {
        let rows = sqlx::query(
            "SELECT sampled_at, running_count AS running, vcpus, memory_mb FROM team_stats_samples \
             WHERE team_id = $1 AND sampled_at >= $2 ORDER BY sampled_at",
        )
        .bind(team_id)
        .bind(ts(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse_ts(&r.try_get::<String, _>("sampled_at")?)?,
                    load_of(r)?,
                ))
            })
            .collect()
    }

    /// Field-wise maxima of a team's samples since `since`.
    pub async fn stats_peaks(&self, team_id: &str, since: DateTime<Utc>) -> Result<TeamLoad> {
        let r = sqlx::query(
            "SELECT MAX(running_count) AS running, MAX(vcpus) AS vcpus, MAX(memory_mb) AS memory_mb \
             FROM team_stats_samples WHERE team_id = $1 AND sampled_at >= $2",
        )
        .bind(team_id)
        .bind(ts(since))
        .fetch_one(&self.pool)
        .await?;
        load_of(&r)
    }

    /// Deletes samples older than `before`; returns how many.
    pub async fn prune_stats_samples(&self, before: DateTime<Utc>) -> Result<u64> {
        let done = sqlx::query("DELETE FROM team_stats_samples WHERE sampled_at < $1")
            .bind(ts(before))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// Adds reserved-resource minutes to each team's total for `day`.
    pub async fn add_usage(&self, day: NaiveDate, usage: &[(String, f64, f64)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (team, cpu_minutes, ram_mb_minutes) in usage {
            sqlx::query(
                "INSERT INTO team_usage_daily (team_id, day, cpu_minutes, ram_mb_minutes) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (team_id, day) DO UPDATE SET \
                 cpu_minutes = team_usage_daily.cpu_minutes + excluded.cpu_minutes, \
                 ram_mb_minutes = team_usage_daily.ram_mb_minutes + excluded.ram_mb_minutes",
            )
            .bind(team)
            .bind(day.to_string())
            .bind(cpu_minutes)
            .bind(ram_mb_minutes)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// A team's daily totals between `from` and `to` inclusive (days without usage are absent).
    pub async fn usage_days(
        &self,
        team_id: &str,
        from: NaiveDate,
        to: NaiveDate,
    ) -> Result<Vec<(NaiveDate, f64, f64)>> {
        let rows = sqlx::query(
            "SELECT day, cpu_minutes, ram_mb_minutes FROM team_usage_daily \
             WHERE team_id = $1 AND day >= $2 AND day <= $3 ORDER BY day",
        )
        .bind(team_id)
        .bind(from.to_string())
        .bind(to.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let day: String = r.try_get("day")?;
                let day = day
                    .parse::<NaiveDate>()
                    .map_err(|e| StoreError::Corrupt(format!("usage day {day:?}: {e}")))?;
                Ok((day, r.try_get("cpu_minutes")?, r.try_get("ram_mb_minutes")?))
            })
            .collect()
    }
}
