//! Hosts, their tokens and tags, and the platform's own secrets.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;
use wrenn_api::{Host, HostStatus};

use super::StoreError;

use super::{parse_ts, ts, Result, Store};

const HOST_COLS: &str = "id, kind, team_id, provider, availability_zone, arch, cpu_cores, \
     memory_mb, disk_gb, address, status, last_heartbeat_at, created_by, created_at, updated_at";

fn host_row(r: &AnyRow) -> Result<Host> {
    let opt_ts = |c: &str| -> Result<Option<DateTime<Utc>>> {
        r.try_get::<Option<String>, _>(c)?
            .map(|s| parse_ts(&s))
            .transpose()
    };
    Ok(Host {
        id: r.try_get("id")?,
        kind: r.try_get("kind")?,
        team_id: r.try_get("team_id")?,
        provider: r.try_get("provider")?,
        availability_zone: r.try_get("availability_zone")?,
        arch: r.try_get("arch")?,
        cpu_cores: r.try_get("cpu_cores")?,
        memory_mb: r.try_get("memory_mb")?,
        disk_gb: r.try_get("disk_gb")?,
        address: r.try_get("address")?,
        status: {
            let s: String = r.try_get("status")?;
            HostStatus::parse(&s)
                .ok_or_else(|| StoreError::Corrupt(format!("host status {s:?}")))?
        },
        last_heartbeat_at: opt_ts("last_heartbeat_at")?,
        created_by: r.try_get("created_by")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts(&r.try_get::<String, _>("updated_at")?)?,
    })
}

/// The machine facts an agent reports when it registers.
#[derive(Debug, Clone, Default)]
pub struct HostSpecs {
    pub address: String,
    pub arch: Option<String>,
    pub cpu_cores: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
}

/// Marks a `platform_secrets` value sealed with the platform's encryption key.
const SEALED: &str = "sealed:";

impl Store {
    pub async fn insert_host(&self, h: &Host) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO hosts ({HOST_COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)"
        ))
        .bind(&h.id)
        .bind(&h.kind)
        .bind(&h.team_id)
        .bind(&h.provider)
        .bind(&h.availability_zone)
        .bind(&h.arch)
        .bind(h.cpu_cores)
        .bind(h.memory_mb)
        .bind(h.disk_gb)
        .bind(&h.address)
        .bind(h.status.as_str())
        .bind(h.last_heartbeat_at.map(ts))
        .bind(&h.created_by)
        .bind(ts(h.created_at))
        .bind(ts(h.updated_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn host(&self, id: &str) -> Result<Option<Host>> {
        sqlx::query(&format!("SELECT {HOST_COLS} FROM hosts WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| host_row(&r))
            .transpose()
    }

    /// Every host, or those of one team (BYOC), oldest first.
    pub async fn hosts(&self, team_id: Option<&str>) -> Result<Vec<Host>> {
        let rows = match team_id {
            Some(t) => {
                sqlx::query(&format!(
                    "SELECT {HOST_COLS} FROM hosts WHERE team_id = $1 ORDER BY created_at, id"
                ))
                .bind(t)
                .fetch_all(&self.pool)
                .await?
            }
            None => {
                sqlx::query(&format!(
                    "SELECT {HOST_COLS} FROM hosts ORDER BY created_at, id"
                ))
                .fetch_all(&self.pool)
                .await?
            }
        };
        rows.iter().map(host_row).collect()
    }

    /// Records what an agent reported at registration and marks the host online.
    /// Records host `id` as registered at `s.address`; `false` (and nothing changed) when
    /// another host holds that address.
    pub async fn register_host(&self, id: &str, s: &HostSpecs, now: DateTime<Utc>) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE hosts SET address = $1, arch = $2, cpu_cores = $3, memory_mb = $4, disk_gb = $5, \
             status = 'online', last_heartbeat_at = $6, updated_at = $6 WHERE id = $7 \
             AND ($1 IS NULL OR NOT EXISTS (SELECT 1 FROM hosts o WHERE o.address = $1 AND o.id <> $7))",
        )
        .bind((!s.address.is_empty()).then_some(s.address.as_str()))
        .bind(&s.arch)
        .bind(s.cpu_cores)
        .bind(s.memory_mb)
        .bind(s.disk_gb)
        .bind(ts(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Sets `status`, only from one of `from` (any when empty); `true` when it changed.
    pub async fn set_host_status(
        &self,
        id: &str,
        status: HostStatus,
        from: &[HostStatus],
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let cond = if from.is_empty() {
            String::new()
        } else {
            format!(
                " AND status IN ({})",
                from.iter()
                    .map(|s| format!("'{}'", s.as_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        let done = sqlx::query(&format!(
            "UPDATE hosts SET status = $1, updated_at = $2 WHERE id = $3 AND status <> $1{cond}"
        ))
        .bind(status.as_str())
        .bind(ts(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn record_heartbeat(&self, id: &str, now: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE hosts SET last_heartbeat_at = $1 WHERE id = $2")
            .bind(ts(now))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Deletes the host with its tokens and tags.
    pub async fn delete_host(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "DELETE FROM host_tokens WHERE host_id = $1",
            "DELETE FROM host_tags WHERE host_id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        let done = sqlx::query("DELETE FROM hosts WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Moves capsule and snapshot records from host id `old` to `new` (an id scheme change).
    pub async fn rename_host_refs(&self, old: &str, new: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for sql in [
            "UPDATE capsules SET host_id = $1 WHERE host_id = $2",
            "UPDATE templates SET host_id = $1 WHERE host_id = $2",
        ] {
            sqlx::query(sql)
                .bind(new)
                .bind(old)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    // ---- tokens -------------------------------------------------------------------------

    /// Stores a token; for registration tokens, earlier ones of the host are dropped.
    pub async fn put_host_token(
        &self,
        token_hash: &str,
        host_id: &str,
        kind: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        if kind == "registration" {
            sqlx::query("DELETE FROM host_tokens WHERE host_id = $1 AND kind = 'registration'")
                .bind(host_id)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(
            "INSERT INTO host_tokens (token_hash, host_id, kind, expires_at, created_at) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(host_id)
        .bind(kind)
        .bind(ts(expires_at))
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Consumes a registration token (atomically: one of two concurrent uses wins).
    pub async fn take_registration_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>> {
        self.consume_owned(
            "DELETE FROM host_tokens WHERE token_hash = $1 AND kind = 'registration' RETURNING host_id, expires_at",
            &[token_hash],
        )
        .await
    }

    /// Revokes a refresh token that is live; returns its host. Of two concurrent uses one wins.
    pub async fn revoke_refresh_token(
        &self,
        token_hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<String>> {
        let row = sqlx::query(
            "UPDATE host_tokens SET revoked_at = $1 WHERE token_hash = $2 AND kind = 'refresh' \
             AND revoked_at IS NULL AND expires_at > $1 RETURNING host_id",
        )
        .bind(ts(now))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    /// Revokes every refresh token of a host.
    pub async fn revoke_host_refresh_tokens(
        &self,
        host_id: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE host_tokens SET revoked_at = $1 WHERE host_id = $2 AND kind = 'refresh' AND revoked_at IS NULL",
        )
        .bind(ts(now))
        .bind(host_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    // ---- tags ---------------------------------------------------------------------------

    pub async fn host_tags(&self, host_id: &str) -> Result<Vec<String>> {
        sqlx::query("SELECT tag FROM host_tags WHERE host_id = $1 ORDER BY tag")
            .bind(host_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    pub async fn add_host_tag(&self, host_id: &str, tag: &str) -> Result<()> {
        sqlx::query("INSERT INTO host_tags (host_id, tag) VALUES ($1, $2) ON CONFLICT (host_id, tag) DO NOTHING")
            .bind(host_id)
            .bind(tag)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn remove_host_tag(&self, host_id: &str, tag: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM host_tags WHERE host_id = $1 AND tag = $2")
            .bind(host_id)
            .bind(tag)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    // ---- platform secrets ---------------------------------------------------------------

    /// The secret `name`, created with `make` the first time (the first writer wins, so every
    /// replica ends up with the same value). With a sealer the value is stored as
    /// `sealed:<base64>`; a plaintext value an earlier version stored is sealed in place.
    pub async fn platform_secret(
        &self,
        name: &str,
        make: impl FnOnce() -> String,
    ) -> Result<String> {
        let stored = match self.stored_secret(name).await? {
            Some(v) => v,
            None => {
                let value = make();
                let value = match &self.sealer {
                    Some(s) => format!("{SEALED}{}", s.seal(&value)),
                    None => value,
                };
                sqlx::query(
                    "INSERT INTO platform_secrets (name, value, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
                )
                .bind(name)
                .bind(value)
                .bind(ts(Utc::now()))
                .execute(&self.pool)
                .await?;
                self.stored_secret(name).await?.ok_or_else(|| {
                    StoreError::Corrupt(format!("platform secret {name} vanished"))
                })?
            }
        };
        match (stored.strip_prefix(SEALED), &self.sealer) {
            (Some(sealed), Some(s)) => s.open(sealed).map_err(|e| {
                StoreError::Config(format!(
                    "platform secret {name}: {e} (is WRENN_ENCRYPTION_KEY the key this platform was started with?)"
                ))
            }),
            (Some(_), None) => Err(StoreError::Config(format!(
                "platform secret {name} is sealed and no encryption key is configured"
            ))),
            (None, Some(s)) => {
                // Compare-and-set: a replica sealing it at the same moment wins, harmlessly.
                sqlx::query("UPDATE platform_secrets SET value = $1 WHERE name = $2 AND value = $3")
                    .bind(format!("{SEALED}{}", s.seal(&stored)))
                    .bind(name)
                    .bind(&stored)
                    .execute(&self.pool)
                    .await?;
                Ok(stored)
            }
            (None, None) => Ok(stored),
        }
    }

    /// The raw stored value of platform secret `name` (sealed or not).
    pub async fn stored_secret(&self, name: &str) -> Result<Option<String>> {
        Ok(
            match sqlx::query("SELECT value FROM platform_secrets WHERE name = $1")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?
            {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            },
        )
    }
}

impl Store {
    /// Takes or renews the lease `name` for `holder` until `now + ttl`: `true` when `holder`
    /// holds it now (it was free, expired, or already its own). Jobs that must run in one
    /// replica only (the stats sampler) run while their replica holds the lease.
    pub async fn hold_lease(
        &self,
        name: &str,
        holder: &str,
        now: DateTime<Utc>,
        ttl: chrono::Duration,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO leases (name, holder, expires_at) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires_at = excluded.expires_at \
             WHERE leases.holder = excluded.holder OR leases.expires_at < $4",
        )
        .bind(name)
        .bind(holder)
        .bind(ts(now + ttl))
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
