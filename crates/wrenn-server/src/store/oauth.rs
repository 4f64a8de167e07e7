//! OAuth identities linked to users, and OAuth flows in progress.

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::teams::{insert_team_in, NewTeam};
use super::{ts, Result, Store};

/// A user to create from an OAuth identity.
pub struct OAuthUser<'a> {
    pub user_id: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    pub provider: &'a str,
    pub provider_user_id: &'a str,
}

impl Store {
    // ---- OAuth identities ---------------------------------------------------------------

    pub async fn oauth_user(
        &self,
        provider: &str,
        provider_user_id: &str,
    ) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT user_id FROM oauth_identities WHERE provider = $1 AND provider_user_id = $2",
        )
        .bind(provider)
        .bind(provider_user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    pub async fn providers_of(&self, user_id: &str) -> Result<Vec<String>> {
        sqlx::query("SELECT provider FROM oauth_identities WHERE user_id = $1 ORDER BY provider")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Ok(r.try_get(0)?))
            .collect()
    }

    /// Links an identity to a user; `false` when that identity is linked already.
    pub async fn link_oauth(
        &self,
        provider: &str,
        provider_user_id: &str,
        user_id: &str,
        email: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO oauth_identities (provider, provider_user_id, user_id, email, created_at) \
             VALUES ($1, $2, $3, $4, $5) ON CONFLICT (provider, provider_user_id) DO NOTHING",
        )
        .bind(provider)
        .bind(provider_user_id)
        .bind(user_id)
        .bind(email)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn unlink_oauth(&self, user_id: &str, provider: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM oauth_identities WHERE user_id = $1 AND provider = $2")
            .bind(user_id)
            .bind(provider)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Creates an active user from an OAuth identity with their first team, in one
    /// transaction. `false` when the email is taken.
    pub async fn create_oauth_user(
        &self,
        user: OAuthUser<'_>,
        team: NewTeam<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let OAuthUser {
            user_id,
            email,
            name,
            provider,
            provider_user_id,
        } = user;
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, is_admin, status, created_at) \
             VALUES ($1, $2, $3, NULL, CASE WHEN (SELECT COUNT(*) FROM users WHERE status = 'active') = 0 \
             THEN 1 ELSE 0 END, 'active', $4) ON CONFLICT (email) DO NOTHING",
        )
        .bind(user_id)
        .bind(email)
        .bind(name)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        sqlx::query(
            "INSERT INTO oauth_identities (provider, provider_user_id, user_id, email, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(provider)
        .bind(provider_user_id)
        .bind(user_id)
        .bind(email)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        insert_team_in(&mut tx, &team, user_id, now).await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Records a started OAuth flow (and forgets expired ones).
    pub async fn put_oauth_flow(
        &self,
        state_hash: &str,
        provider: &str,
        user_id: Option<&str>,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        sqlx::query("DELETE FROM oauth_flows WHERE expires_at < $1")
            .bind(ts(now))
            .execute(&self.pool)
            .await?;
        sqlx::query(
            "INSERT INTO oauth_flows (state_hash, provider, user_id, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(state_hash)
        .bind(provider)
        .bind(user_id)
        .bind(ts(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Consumes a flow (single use): its user (connect flows) and expiry, if it exists for
    /// `provider`.
    #[allow(clippy::type_complexity)]
    pub async fn take_oauth_flow(
        &self,
        state_hash: &str,
        provider: &str,
    ) -> Result<Option<(Option<String>, DateTime<Utc>)>> {
        self.consume(
            "DELETE FROM oauth_flows WHERE state_hash = $1 AND provider = $2 RETURNING user_id, expires_at",
            &[state_hash, provider],
        )
        .await
    }
}
