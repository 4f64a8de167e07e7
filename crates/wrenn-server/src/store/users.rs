//! Users and their one-time tokens (activation, password reset).
//!
//! Every method that depends on the time takes `now` from its caller, so the account service's
//! clock (a controllable one in tests) decides what has expired.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::teams::{insert_team_in, soft_delete_team_in, NewTeam};
use wrenn_api::UserStatus;

use super::{opt_ts, parse_ts, ts, Result, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    pub status: UserStatus,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

pub(super) const USER_COLS: &str =
    "u.id, u.email, u.name, u.password_hash, u.is_admin, u.status, u.created_at, u.deleted_at";

pub(super) fn user_row(r: &AnyRow) -> Result<UserRow> {
    Ok(UserRow {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        name: r.try_get("name")?,
        password_hash: r.try_get("password_hash")?,
        is_admin: r.try_get::<i64, _>("is_admin")? != 0,
        status: {
            let s: String = r.try_get("status")?;
            UserStatus::parse(&s)
                .ok_or_else(|| StoreError::Corrupt(format!("user status {s:?}")))?
        },
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        deleted_at: opt_ts(r, "deleted_at")?,
    })
}

impl Store {
    // ---- users -------------------------------------------------------------------------

    pub async fn count_users(&self) -> Result<i64> {
        Ok(sqlx::query("SELECT COUNT(*) FROM users")
            .fetch_one(&self.pool)
            .await?
            .try_get(0)?)
    }

    pub async fn count_active_users(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM users WHERE status = 'active'")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }

    pub async fn count_active_admins(&self) -> Result<i64> {
        Ok(
            sqlx::query("SELECT COUNT(*) FROM users WHERE status = 'active' AND is_admin <> 0")
                .fetch_one(&self.pool)
                .await?
                .try_get(0)?,
        )
    }

    pub async fn user_by_email(&self, email: &str) -> Result<Option<UserRow>> {
        sqlx::query(&format!(
            "SELECT {USER_COLS} FROM users u WHERE u.email = $1"
        ))
        .bind(email)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| user_row(&r))
        .transpose()
    }

    pub async fn user_by_id(&self, id: &str) -> Result<Option<UserRow>> {
        sqlx::query(&format!("SELECT {USER_COLS} FROM users u WHERE u.id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| user_row(&r))
            .transpose()
    }

    /// Creates a user; `false` when the email is taken (a concurrent signup won).
    pub async fn insert_user(
        &self,
        id: &str,
        email: &str,
        name: &str,
        password_hash: Option<&str>,
        status: UserStatus,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, is_admin, status, created_at) \
             VALUES ($1, $2, $3, $4, 0, $5, $6) ON CONFLICT (email) DO NOTHING",
        )
        .bind(id)
        .bind(email)
        .bind(name)
        .bind(password_hash)
        .bind(status.as_str())
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes a user that never became active (a stale signup), with its tokens.
    pub async fn delete_inactive_user(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM user_tokens WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        let done = sqlx::query("DELETE FROM users WHERE id = $1 AND status = 'inactive'")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn set_user_name(&self, id: &str, name: &str) -> Result<()> {
        sqlx::query("UPDATE users SET name = $1 WHERE id = $2")
            .bind(name)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Sets the password and ends every session of the user, in one transaction.
    pub async fn set_password_and_revoke(&self, id: &str, hash: &str) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("UPDATE users SET password_hash = $1 WHERE id = $2")
            .bind(hash)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn set_user_admin(&self, id: &str, admin: bool) -> Result<bool> {
        let done =
            sqlx::query("UPDATE users SET is_admin = $1 WHERE id = $2 AND status <> 'deleted'")
                .bind(i64::from(admin))
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Revokes admin from `id` unless that would leave no active admin (checked in the same
    /// statement, so two concurrent revocations cannot both pass). `false` when refused.
    pub async fn revoke_admin_unless_last(&self, id: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE users SET is_admin = 0 WHERE id = $1 AND \
             (SELECT COUNT(*) FROM users WHERE status = 'active' AND is_admin <> 0 AND id <> $1) > 0",
        )
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Reactivates a disabled user.
    pub async fn enable_user(&self, id: &str) -> Result<bool> {
        let done =
            sqlx::query("UPDATE users SET status = 'active' WHERE id = $1 AND status = 'disabled'")
                .bind(id)
                .execute(&self.pool)
                .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Disables a user: status, sessions and the API keys they created, in one transaction.
    pub async fn disable_user(&self, id: &str) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done =
            sqlx::query("UPDATE users SET status = 'disabled' WHERE id = $1 AND status = 'active'")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM api_keys WHERE created_by = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(done.rows_affected() == 1)
    }

    /// Active users whose email starts with `prefix` (at most `limit`).
    pub async fn search_users(&self, prefix: &str, limit: i64) -> Result<Vec<(String, String)>> {
        // LIKE wildcards in the prefix are escaped so they match themselves.
        let escaped: String = prefix
            .chars()
            .flat_map(|c| match c {
                '%' | '_' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let rows = sqlx::query(
            "SELECT id, email FROM users WHERE status = 'active' AND email LIKE $1 ESCAPE '\\' \
             ORDER BY email LIMIT $2",
        )
        .bind(format!("{escaped}%"))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?)))
            .collect()
    }

    /// Every user that is not deleted, with how many teams each belongs to.
    pub async fn list_users(&self) -> Result<Vec<(UserRow, i64)>> {
        let rows = sqlx::query(&format!(
            "SELECT {USER_COLS}, (SELECT COUNT(*) FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = u.id AND t.deleted_at IS NULL) AS teams \
             FROM users u WHERE u.status <> 'deleted' ORDER BY u.created_at, u.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((user_row(r)?, r.try_get::<i64, _>("teams")?)))
            .collect()
    }

    /// Soft-deletes a user: the row stays (for audit) without email, password, sessions,
    /// identities or memberships; `teams` (those they owned alone) are deleted with it.
    pub async fn soft_delete_user(
        &self,
        id: &str,
        teams: &[String],
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        for team in teams {
            soft_delete_team_in(&mut tx, team, now).await?;
        }
        for sql in [
            "DELETE FROM sessions WHERE user_id = $1",
            "DELETE FROM user_tokens WHERE user_id = $1",
            "DELETE FROM oauth_identities WHERE user_id = $1",
            "DELETE FROM team_members WHERE user_id = $1",
        ] {
            sqlx::query(sql).bind(id).execute(&mut *tx).await?;
        }
        sqlx::query(
            "UPDATE users SET status = 'deleted', deleted_at = $1, password_hash = NULL, \
             is_admin = 0, email = $2 WHERE id = $3",
        )
        .bind(ts(now))
        .bind(format!("{id}@deleted.invalid"))
        .bind(id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Removes users deleted before `before`; returns their ids. Their API keys' `created_by`
    /// is cleared so the keys' teams keep them.
    pub async fn purge_deleted_users(&self, before: DateTime<Utc>) -> Result<Vec<String>> {
        let ids: Vec<String> = sqlx::query(
            "SELECT id FROM users WHERE status = 'deleted' AND deleted_at IS NOT NULL AND deleted_at < $1",
        )
        .bind(ts(before))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| r.try_get(0))
        .collect::<std::result::Result<_, _>>()?;
        for id in &ids {
            let mut tx = self.pool.begin().await?;
            sqlx::query("UPDATE api_keys SET created_by = NULL WHERE created_by = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            // The audit trail stays; only who it was is forgotten: their name
            // as an actor, and the email kept about them as a member.
            for sql in [
                "UPDATE audit_logs SET actor_name = 'deleted-user' WHERE actor_type = 'user' AND actor_id = $1",
                "UPDATE audit_logs SET metadata = '{}' WHERE resource_type IN ('member', 'user') AND resource_id = $1",
            ] {
                sqlx::query(sql).bind(id).execute(&mut *tx).await?;
            }
            sqlx::query("DELETE FROM users WHERE id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        }
        Ok(ids)
    }

    // ---- one-time tokens ----------------------------------------------------------------

    /// Stores a token for `purpose`, replacing the user's earlier ones for the same purpose.
    pub async fn put_user_token(
        &self,
        token_hash: &str,
        user_id: &str,
        purpose: &str,
        expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM user_tokens WHERE user_id = $1 AND purpose = $2")
            .bind(user_id)
            .bind(purpose)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO user_tokens (token_hash, user_id, purpose, expires_at, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(token_hash)
        .bind(user_id)
        .bind(purpose)
        .bind(ts(expires_at))
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Consumes a token atomically: of two concurrent uses, one gets it. Returns its user and
    /// expiry (the caller decides whether it was still valid).
    pub async fn take_user_token(
        &self,
        token_hash: &str,
        purpose: &str,
    ) -> Result<Option<(String, DateTime<Utc>)>> {
        self.consume_owned(
            "DELETE FROM user_tokens WHERE token_hash = $1 AND purpose = $2 RETURNING user_id, expires_at",
            &[token_hash, purpose],
        )
        .await
    }

    /// Activates an inactive user and creates their first team (owner), in one transaction.
    /// The user becomes platform admin when no other active user exists. `false` when the user
    /// was not inactive any more.
    pub async fn activate_user(
        &self,
        user_id: &str,
        team: NewTeam<'_>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = sqlx::query(
            "UPDATE users SET status = 'active', is_admin = CASE WHEN \
             (SELECT COUNT(*) FROM users WHERE status = 'active') = 0 THEN 1 ELSE 0 END \
             WHERE id = $1 AND status = 'inactive'",
        )
        .bind(user_id)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != 1 {
            return Ok(false);
        }
        insert_team_in(&mut tx, &team, user_id, now).await?;
        tx.commit().await?;
        Ok(true)
    }
}
