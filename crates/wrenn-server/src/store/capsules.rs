//! Capsule rows.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;
use wrenn_api::{Capsule, CapsuleSpec, CapsuleStatus};

use super::{parse_ts, ts, Result, Store, StoreError};

/// A capsule as stored: the API's view plus what only the control plane needs.
#[derive(Debug, Clone)]
pub struct CapsuleRow {
    pub capsule: Capsule,
    pub team_id: String,
    pub host_id: Option<String>,
    pub error: Option<String>,
}

const COLUMNS: &str =
    "id, team_id, host_id, template, status, vcpus, memory_mb, disk_size_mb, timeout_sec, \
     guest_ip, host_ip, metadata, error, created_at, started_at, last_active_at, last_updated, network";

fn from_row(r: &AnyRow) -> Result<CapsuleRow> {
    let opt_ts = |name: &str| -> Result<Option<chrono::DateTime<Utc>>> {
        r.try_get::<Option<String>, _>(name)?
            .as_deref()
            .map(parse_ts)
            .transpose()
    };
    let status: String = r.try_get("status")?;
    let metadata: Option<String> = r.try_get("metadata")?;
    let metadata = metadata
        .map(|m| serde_json::from_str::<BTreeMap<String, String>>(&m))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("capsule metadata: {e}")))?;
    let network: Option<String> = r.try_get("network")?;
    let network = network
        .map(|n| serde_json::from_str::<wrenn_api::NetworkPolicy>(&n))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("capsule network policy: {e}")))?
        .unwrap_or_default();
    let capsule = Capsule {
        id: r.try_get("id")?,
        status: CapsuleStatus::parse(&status)
            .ok_or_else(|| StoreError::Corrupt(format!("capsule status {status:?}")))?,
        template: r.try_get("template")?,
        vcpus: r.try_get::<i64, _>("vcpus")? as u32,
        memory_mb: r.try_get::<i64, _>("memory_mb")? as u32,
        timeout_sec: r.try_get::<i64, _>("timeout_sec")? as u32,
        guest_ip: r.try_get("guest_ip")?,
        host_ip: r.try_get("host_ip")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        started_at: opt_ts("started_at")?,
        last_active_at: opt_ts("last_active_at")?,
        last_updated: parse_ts(&r.try_get::<String, _>("last_updated")?)?,
        metadata,
        disk_size_mb: Some(r.try_get::<i64, _>("disk_size_mb")? as u32),
        disk_used_mb: None,
        network,
    };
    Ok(CapsuleRow {
        capsule,
        team_id: r.try_get("team_id")?,
        host_id: r.try_get("host_id")?,
        error: r.try_get("error")?,
    })
}

impl Store {
    pub async fn insert_capsule(
        &self,
        id: &str,
        team_id: &str,
        host_id: &str,
        spec: &CapsuleSpec,
    ) -> Result<CapsuleRow> {
        let now = ts(Utc::now());
        sqlx::query(
            "INSERT INTO capsules (id, team_id, host_id, template, status, vcpus, memory_mb, disk_size_mb, \
             timeout_sec, created_at, last_updated, network) \
             VALUES ($1, $2, $3, $4, 'starting', $5, $6, $7, $8, $9, $9, $10)",
        )
        .bind(id)
        .bind(team_id)
        .bind(host_id)
        .bind(&spec.template)
        .bind(spec.vcpus as i64)
        .bind(spec.memory_mb as i64)
        .bind(spec.disk_size_mb as i64)
        .bind(spec.timeout_sec as i64)
        .bind(&now)
        .bind(network_json(&spec.network)?)
        .execute(&self.pool)
        .await?;
        self.capsule(id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("capsule {id} vanished after insert")))
    }

    pub async fn capsule(&self, id: &str) -> Result<Option<CapsuleRow>> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM capsules WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// The team's capsules that still exist (not `stopped` or `error`), newest first.
    pub async fn list_live_capsules(&self, team_id: &str) -> Result<Vec<CapsuleRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM capsules WHERE team_id = $1 AND status NOT IN ('stopped', 'error') \
             ORDER BY created_at DESC, id"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// Every team's capsules that still exist, newest first (platform admins).
    pub async fn list_all_live_capsules(&self) -> Result<Vec<CapsuleRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM capsules WHERE status NOT IN ('stopped', 'error') \
             ORDER BY created_at DESC, id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    /// vCPUs and memory reserved on each host by the capsules that hold (or are getting, or
    /// may still hold) a VM there.
    pub async fn reserved_by_host(&self) -> Result<std::collections::HashMap<String, (i64, i64)>> {
        let rows = sqlx::query(
            "SELECT host_id, SUM(vcpus), SUM(memory_mb) FROM capsules WHERE host_id IS NOT NULL \
             AND status IN ('pending', 'starting', 'running', 'pausing', 'resuming', 'snapshotting', 'missing') \
             GROUP BY host_id",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, (r.try_get(1)?, r.try_get(2)?))))
            .collect()
    }

    /// Capsules on a host in any of `statuses`.
    pub async fn capsules_on_host(
        &self,
        host_id: &str,
        statuses: &[CapsuleStatus],
    ) -> Result<Vec<CapsuleRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM capsules WHERE host_id = $1"
        ))
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?;
        let all: Vec<CapsuleRow> = rows.iter().map(from_row).collect::<Result<_>>()?;
        Ok(all
            .into_iter()
            .filter(|r| statuses.contains(&r.capsule.status))
            .collect())
    }

    /// Moves a capsule to `to` only if it is currently in one of `from`; returns whether it moved.
    pub async fn transition(
        &self,
        id: &str,
        from: &[CapsuleStatus],
        to: CapsuleStatus,
    ) -> Result<bool> {
        let list = from
            .iter()
            .map(|s| format!("'{}'", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ");
        let done = sqlx::query(&format!(
            "UPDATE capsules SET status = $1, last_updated = $2 WHERE id = $3 AND status IN ({list})"
        ))
        .bind(to.as_str())
        .bind(ts(Utc::now()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// `running` → `pausing` for the inactivity timeout, only if nothing recorded activity on
    /// the capsule after `idle_since` (a ping that lands between the reaper's read and this
    /// write keeps the capsule running); returns whether it moved.
    pub async fn begin_auto_pause(&self, id: &str, idle_since: DateTime<Utc>) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE capsules SET status = 'pausing', pause_reason = 'ttl_expired', last_updated = $1 \
             WHERE id = $2 AND status = 'running' AND (last_active_at IS NULL OR last_active_at <= $3) \
             AND (busy_until IS NULL OR busy_until < $1)",
        )
        .bind(ts(Utc::now()))
        .bind(id)
        .bind(ts(idle_since))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets a capsule's last activity to `at`, even back in time (tests of the TTL reaper).
    #[cfg(test)]
    pub(crate) async fn backdate_activity(&self, id: &str, at: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE capsules SET last_active_at = $1 WHERE id = $2")
            .bind(ts(at))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `starting` → `running` with what the host reported; false if the capsule left `starting`.
    pub async fn mark_running(
        &self,
        id: &str,
        guest_ip: &str,
        host_ip: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool> {
        self.to_running(id, "starting", guest_ip, host_ip, metadata)
            .await
    }

    /// `resuming` → `running` with what the host reported (the activity clock restarts);
    /// false if the capsule left `resuming` meanwhile.
    pub async fn mark_resumed(
        &self,
        id: &str,
        guest_ip: &str,
        host_ip: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool> {
        self.to_running(id, "resuming", guest_ip, host_ip, metadata)
            .await
    }

    /// `from` → `running`; `started_at` is set the first time only.
    async fn to_running(
        &self,
        id: &str,
        from: &str,
        guest_ip: &str,
        host_ip: &str,
        metadata: &BTreeMap<String, String>,
    ) -> Result<bool> {
        let now = ts(Utc::now());
        let meta =
            serde_json::to_string(metadata).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let done = sqlx::query(
            "UPDATE capsules SET status = 'running', guest_ip = $1, host_ip = $2, metadata = $3, \
             started_at = COALESCE(started_at, $4), last_active_at = $4, last_updated = $4 \
             WHERE id = $5 AND status = $6",
        )
        .bind(guest_ip)
        .bind(host_ip)
        .bind(meta)
        .bind(&now)
        .bind(id)
        .bind(from)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Any non-terminal state → `error`, keeping the reason.
    pub async fn mark_error(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query(
            "UPDATE capsules SET status = 'error', error = $1, last_updated = $2 \
             WHERE id = $3 AND status NOT IN ('stopped', 'error')",
        )
        .bind(reason)
        .bind(ts(Utc::now()))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Running capsules with an inactivity timeout (candidates for auto-pause).
    /// Running capsules with an inactivity timeout that no replica holds busy at `now`.
    pub async fn running_with_timeout(&self, now: DateTime<Utc>) -> Result<Vec<CapsuleRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM capsules WHERE status = 'running' AND timeout_sec > 0 \
             AND (busy_until IS NULL OR busy_until < $1)"
        ))
        .bind(ts(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(from_row).collect()
    }

    pub async fn set_pause_reason(&self, id: &str, reason: &str) -> Result<()> {
        sqlx::query("UPDATE capsules SET pause_reason = $1 WHERE id = $2")
            .bind(reason)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn pause_reason(&self, id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar::<_, Option<String>>(
            "SELECT pause_reason FROM capsules WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .flatten())
    }

    /// Records when each capsule was last active (never moving a time backwards).
    /// Marks `ids` in use until `until` (never shortening a later mark of another replica).
    pub async fn record_busy(&self, ids: &[String], until: DateTime<Utc>) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let until = ts(until);
        for id in ids {
            sqlx::query(
                "UPDATE capsules SET busy_until = $1 \
                 WHERE id = $2 AND (busy_until IS NULL OR busy_until < $1)",
            )
            .bind(&until)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn record_activity(&self, batch: &[(String, chrono::DateTime<Utc>)]) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for (id, at) in batch {
            let at = ts(*at);
            sqlx::query(
                "UPDATE capsules SET last_active_at = $1 \
                 WHERE id = $2 AND (last_active_at IS NULL OR last_active_at < $1)",
            )
            .bind(&at)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Records capsule `id`'s egress policy.
    pub async fn set_capsule_network(
        &self,
        id: &str,
        network: &wrenn_api::NetworkPolicy,
    ) -> Result<()> {
        sqlx::query("UPDATE capsules SET network = $1, last_updated = $2 WHERE id = $3")
            .bind(network_json(network)?)
            .bind(ts(Utc::now()))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn touch_capsule(&self, id: &str) -> Result<()> {
        sqlx::query("UPDATE capsules SET last_active_at = $1 WHERE id = $2")
            .bind(ts(Utc::now()))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}

/// The stored form of a policy: NULL for the default.
fn network_json(network: &wrenn_api::NetworkPolicy) -> Result<Option<String>> {
    if *network == wrenn_api::NetworkPolicy::default() {
        return Ok(None);
    }
    serde_json::to_string(network)
        .map(Some)
        .map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// A capsule's port proxy access, as [`Store::proxy_access`] reads it.
#[derive(Debug, Clone)]
pub struct ProxyAccessRow {
    pub team_id: String,
    pub access: wrenn_api::ProxyAccess,
    /// Access tokens name the generation they were issued in; a newer one revokes them.
    pub token_generation: i64,
}

impl Store {
    /// The proxy access of capsule `id` (private, generation 0, when never set); `None` when
    /// there is no such capsule.
    pub async fn proxy_access(&self, id: &str) -> Result<Option<ProxyAccessRow>> {
        let Some(r) = sqlx::query(
            "SELECT c.team_id, a.public, a.public_ports, a.token_generation FROM capsules c \
             LEFT JOIN capsule_proxy_access a ON a.capsule_id = c.id WHERE c.id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let ports: Option<String> = r.try_get("public_ports")?;
        let public_ports = match ports {
            Some(p) => serde_json::from_str(&p)
                .map_err(|e| StoreError::Corrupt(format!("capsule public ports: {e}")))?,
            None => Vec::new(),
        };
        Ok(Some(ProxyAccessRow {
            team_id: r.try_get("team_id")?,
            access: wrenn_api::ProxyAccess {
                public: r.try_get::<Option<i64>, _>("public")?.unwrap_or(0) != 0,
                public_ports,
            },
            token_generation: r
                .try_get::<Option<i64>, _>("token_generation")?
                .unwrap_or(0),
        }))
    }

    pub async fn set_proxy_access(&self, id: &str, access: &wrenn_api::ProxyAccess) -> Result<()> {
        let ports = serde_json::to_string(&access.public_ports)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query(
            "INSERT INTO capsule_proxy_access (capsule_id, public, public_ports, updated_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (capsule_id) DO UPDATE SET \
             public = excluded.public, public_ports = excluded.public_ports, updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(access.public as i64)
        .bind(ports)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Starts a new token generation for capsule `id`: every token issued before is revoked.
    pub async fn revoke_proxy_tokens(&self, id: &str) -> Result<()> {
        sqlx::query(
            "INSERT INTO capsule_proxy_access (capsule_id, token_generation, updated_at) \
             VALUES ($1, 1, $2) ON CONFLICT (capsule_id) DO UPDATE SET \
             token_generation = capsule_proxy_access.token_generation + 1, updated_at = excluded.updated_at",
        )
        .bind(id)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
