//! Teams' API keys (stored as SHA-256 only).

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{opt_ts, parse_ts, ts, Result, Store};

/// Who an API key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyOwner {
    pub key_id: String,
    pub team_id: String,
    pub name: String,
    /// False when the member who made the key has left the team or is no longer an active
    /// user: the key then stops working (keys made by the platform itself have no creator).
    pub creator_active: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyRow {
    pub id: String,
    pub team_id: String,
    pub name: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl Store {
    // ---- API keys -----------------------------------------------------------------------

    pub async fn create_api_key(
        &self,
        id: &str,
        team_id: &str,
        name: &str,
        key_hash: &str,
        key_prefix: &str,
        created_by: Option<&str>,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO api_keys (id, team_id, name, key_hash, key_prefix, created_by, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(id)
        .bind(team_id)
        .bind(name)
        .bind(key_hash)
        .bind(key_prefix)
        .bind(created_by)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn api_keys(&self, team_id: &str) -> Result<Vec<ApiKeyRow>> {
        let rows = sqlx::query(
            "SELECT id, team_id, name, key_prefix, created_at, last_used_at FROM api_keys \
             WHERE team_id = $1 ORDER BY created_at, id",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(ApiKeyRow {
                    id: r.try_get("id")?,
                    team_id: r.try_get("team_id")?,
                    name: r.try_get("name")?,
                    key_prefix: r.try_get("key_prefix")?,
                    created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
                    last_used_at: opt_ts(r, "last_used_at")?,
                })
            })
            .collect()
    }

    pub async fn delete_api_key(&self, team_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM api_keys WHERE id = $1 AND team_id = $2")
            .bind(id)
            .bind(team_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// The key with this SHA-256 hash, if it exists and its team is not deleted.
    pub async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyOwner>> {
        let row = sqlx::query(
            "SELECT k.id, k.team_id, k.name, \
             CASE WHEN k.created_by IS NULL OR EXISTS (SELECT 1 FROM team_members m \
               JOIN users u ON u.id = m.user_id WHERE m.team_id = k.team_id \
               AND m.user_id = k.created_by AND u.status = 'active') THEN 1 ELSE 0 END \
             FROM api_keys k JOIN teams t ON t.id = k.team_id \
             WHERE k.key_hash = $1 AND t.deleted_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(ApiKeyOwner {
                key_id: r.try_get(0)?,
                team_id: r.try_get(1)?,
                name: r.try_get(2)?,
                creator_active: r.try_get::<i32, _>(3)? != 0,
            }),
            None => None,
        })
    }

    pub async fn touch_api_key(&self, key_id: &str) -> Result<()> {
        sqlx::query("UPDATE api_keys SET last_used_at = $1 WHERE id = $2")
            .bind(ts(Utc::now()))
            .bind(key_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
