//! Notification channels and their deliveries. Config values arrive here already encrypted.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;
use wrenn_api::ChannelDelivery;

use super::{parse_ts, ts, Result, Store, StoreError};

/// A stored channel: its encrypted config stays sealed until a delivery needs it.
#[derive(Debug, Clone)]
pub struct ChannelRow {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub provider: String,
    pub events: Vec<String>,
    /// Field name → base64(nonce ‖ ciphertext).
    pub sealed_config: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

const COLS: &str = "id, team_id, name, provider, events, config, created_at, updated_at";

fn json<T: serde::de::DeserializeOwned>(r: &AnyRow, col: &str) -> Result<T> {
    let s: String = r.try_get(col)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("channel {col}: {e}")))
}

fn channel(r: &AnyRow) -> Result<ChannelRow> {
    Ok(ChannelRow {
        id: r.try_get("id")?,
        team_id: r.try_get("team_id")?,
        name: r.try_get("name")?,
        provider: r.try_get("provider")?,
        events: json(r, "events")?,
        sealed_config: json(r, "config")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts(&r.try_get::<String, _>("updated_at")?)?,
    })
}

fn delivery(r: &AnyRow) -> Result<ChannelDelivery> {
    Ok(ChannelDelivery {
        id: r.try_get("id")?,
        channel_id: r.try_get("channel_id")?,
        event: r.try_get("event")?,
        status: r.try_get("status")?,
        attempts: r.try_get::<i64, _>("attempts")? as u32,
        last_error: r.try_get("last_error")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        updated_at: parse_ts(&r.try_get::<String, _>("updated_at")?)?,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
}

impl Store {
    /// Inserts a channel; `false` when the team already has one by that name.
    pub async fn insert_channel(&self, c: &ChannelRow) -> Result<bool> {
        let r = sqlx::query(&format!(
            "INSERT INTO channels ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
        ))
        .bind(&c.id)
        .bind(&c.team_id)
        .bind(&c.name)
        .bind(&c.provider)
        .bind(serde_json::to_string(&c.events).unwrap_or_default())
        .bind(serde_json::to_string(&c.sealed_config).unwrap_or_default())
        .bind(ts(c.created_at))
        .bind(ts(c.updated_at))
        .execute(&self.pool)
        .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if is_unique_violation(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    pub async fn channel(&self, team_id: &str, id: &str) -> Result<Option<ChannelRow>> {
        sqlx::query(&format!(
            "SELECT {COLS} FROM channels WHERE id = $1 AND team_id = $2"
        ))
        .bind(id)
        .bind(team_id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| channel(&r))
        .transpose()
    }

    pub async fn channels(&self, team_id: &str) -> Result<Vec<ChannelRow>> {
        sqlx::query(&format!(
            "SELECT {COLS} FROM channels WHERE team_id = $1 ORDER BY created_at, id"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(channel)
        .collect()
    }

    pub async fn count_channels(&self, team_id: &str) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM channels WHERE team_id = $1")
                .bind(team_id)
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }

    /// Renames a channel and sets its events: `None` when it does not exist, `Some(false)` when
    /// the name is taken.
    pub async fn update_channel(
        &self,
        team_id: &str,
        id: &str,
        name: &str,
        events: &[String],
        now: DateTime<Utc>,
    ) -> Result<Option<bool>> {
        let r = sqlx::query(
            "UPDATE channels SET name = $1, events = $2, updated_at = $3 WHERE id = $4 AND team_id = $5",
        )
        .bind(name)
        .bind(serde_json::to_string(events).unwrap_or_default())
        .bind(ts(now))
        .bind(id)
        .bind(team_id)
        .execute(&self.pool)
        .await;
        match r {
            Ok(done) if done.rows_affected() == 1 => Ok(Some(true)),
            Ok(_) => Ok(None),
            Err(e) if is_unique_violation(&e) => Ok(Some(false)),
            Err(e) => Err(e.into()),
        }
    }

    /// Replaces a channel's sealed config; `false` when it does not exist.
    pub async fn set_channel_config(
        &self,
        team_id: &str,
        id: &str,
        sealed: &BTreeMap<String, String>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE channels SET config = $1, updated_at = $2 WHERE id = $3 AND team_id = $4",
        )
        .bind(serde_json::to_string(sealed).unwrap_or_default())
        .bind(ts(now))
        .bind(id)
        .bind(team_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Deletes a channel and its delivery records; `false` when it did not exist.
    pub async fn delete_channel(&self, team_id: &str, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query("DELETE FROM channels WHERE id = $1 AND team_id = $2")
            .bind(id)
            .bind(team_id)
            .execute(&mut *tx)
            .await?;
        if done.rows_affected() == 1 {
            sqlx::query("DELETE FROM channel_deliveries WHERE channel_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Channels of `team_ids` subscribed to `event`.
    pub async fn subscribed_channels(
        &self,
        team_ids: &[String],
        event: &str,
    ) -> Result<Vec<ChannelRow>> {
        if team_ids.is_empty() {
            return Ok(Vec::new());
        }
        let ps: Vec<String> = (1..=team_ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT {COLS} FROM channels WHERE team_id IN ({}) ORDER BY created_at, id",
            ps.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for t in team_ids {
            query = query.bind(t);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut out = Vec::new();
        for r in &rows {
            let c = channel(r)?;
            if c.events.iter().any(|e| e == event) {
                out.push(c);
            }
        }
        Ok(out)
    }

    /// Teams a host event concerns besides the host's own: those with capsules on it that
    /// still hold (or held, until the host failed) a VM.
    pub async fn teams_on_host(&self, host_id: &str) -> Result<Vec<String>> {
        sqlx::query(
            "SELECT DISTINCT team_id FROM capsules WHERE host_id = $1 \
             AND status NOT IN ('stopped', 'error')",
        )
        .bind(host_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(Into::into))
        .collect()
    }

    /// Teams owned by platform admins (where platform-wide events are announced).
    pub async fn admin_owned_teams(&self) -> Result<Vec<String>> {
        sqlx::query(
            "SELECT DISTINCT m.team_id FROM team_members m JOIN users u ON u.id = m.user_id \
             JOIN teams t ON t.id = m.team_id \
             WHERE m.role = 'owner' AND u.is_admin = 1 AND u.status = 'active' AND t.deleted_at IS NULL",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(Into::into))
        .collect()
    }

    /// Records a delivery about to be attempted. `false` when it already exists (a redelivered
    /// stream entry): the caller reads its status to decide whether to send again.
    pub async fn insert_delivery(
        &self,
        id: &str,
        channel_id: &str,
        event: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO channel_deliveries (id, channel_id, event, status, attempts, last_error, created_at, updated_at) \
             VALUES ($1, $2, $3, 'pending', 0, NULL, $4, $4) ON CONFLICT (id) DO NOTHING",
        )
        .bind(id)
        .bind(channel_id)
        .bind(event)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delivery(&self, id: &str) -> Result<Option<ChannelDelivery>> {
        sqlx::query("SELECT * FROM channel_deliveries WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| delivery(&r))
            .transpose()
    }

    pub async fn update_delivery(
        &self,
        id: &str,
        status: &str,
        attempts: u32,
        last_error: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query(
            "UPDATE channel_deliveries SET status = $1, attempts = $2, last_error = $3, updated_at = $4 WHERE id = $5",
        )
        .bind(status)
        .bind(i64::from(attempts))
        .bind(last_error)
        .bind(ts(now))
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The channel's latest deliveries, newest first.
    pub async fn deliveries(&self, channel_id: &str, limit: u32) -> Result<Vec<ChannelDelivery>> {
        sqlx::query(&format!(
            "SELECT * FROM channel_deliveries WHERE channel_id = $1 ORDER BY created_at DESC, id DESC LIMIT {}",
            limit.clamp(1, 200)
        ))
        .bind(channel_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(delivery)
        .collect()
    }

    /// Forgets deliveries older than `before`.
    pub async fn prune_deliveries(&self, before: DateTime<Utc>) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM channel_deliveries WHERE created_at < $1")
                .bind(ts(before))
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }
}
