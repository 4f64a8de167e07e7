//! Users, teams, memberships and API keys.

use chrono::Utc;
use sqlx::Row;

use super::{ts, Result, Store};

/// Who an API key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyOwner {
    pub key_id: String,
    pub team_id: String,
}

impl Store {
    pub async fn count_users(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    /// Creates an active admin user owning a new team, in one transaction.
    pub async fn create_admin_with_team(
        &self,
        user_id: &str,
        email: &str,
        name: &str,
        team_id: &str,
        team_name: &str,
        team_slug: &str,
    ) -> Result<()> {
        let now = ts(Utc::now());
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO users (id, email, name, is_admin, status, created_at) VALUES ($1, $2, $3, 1, 'active', $4)",
        )
        .bind(user_id)
        .bind(email)
        .bind(name)
        .bind(&now)
        .execute(&mut *tx)
        .await?;
        sqlx::query("INSERT INTO teams (id, name, slug, created_at) VALUES ($1, $2, $3, $4)")
            .bind(team_id)
            .bind(team_name)
            .bind(team_slug)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("INSERT INTO team_members (team_id, user_id, role, created_at) VALUES ($1, $2, 'owner', $3)")
            .bind(team_id)
            .bind(user_id)
            .bind(&now)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

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

    /// The key with this SHA-256 hash, if it exists and its team is not deleted.
    pub async fn api_key_by_hash(&self, key_hash: &str) -> Result<Option<ApiKeyOwner>> {
        let row = sqlx::query(
            "SELECT k.id, k.team_id FROM api_keys k JOIN teams t ON t.id = k.team_id \
             WHERE k.key_hash = $1 AND t.deleted_at IS NULL",
        )
        .bind(key_hash)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(ApiKeyOwner {
                key_id: r.try_get(0)?,
                team_id: r.try_get(1)?,
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
