//! Browser sessions.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::users::{user_row, UserRow, USER_COLS};
use wrenn_api::Role;

use super::{parse_ts, role_of, ts, Result, Store};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRow {
    pub id: String,
    pub user_id: String,
    pub team_id: String,
    pub csrf_token: String,
    pub user_agent: String,
    pub ip_address: String,
    pub created_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// A session with what every request needs to know about its user and team, read in one query.
#[derive(Debug, Clone)]
pub struct SessionContext {
    pub session: SessionRow,
    pub user: UserRow,
    /// The user's role in the session's team; `None` once they left or were removed, or the
    /// team was deleted.
    pub role: Option<Role>,
}

/// What a new session holds.
pub struct NewSession<'a> {
    pub id: &'a str,
    pub token_hash: &'a str,
    pub csrf_token: &'a str,
    pub user_id: &'a str,
    pub team_id: &'a str,
    pub user_agent: &'a str,
    pub ip_address: &'a str,
    pub created_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

const SESSION_COLS: &str = "s.id AS sid, s.user_id AS s_user_id, s.team_id AS s_team_id, \
     s.csrf_token, s.user_agent, s.ip_address, s.created_at AS s_created_at, s.last_seen_at, \
     s.expires_at";

fn session_row(r: &AnyRow) -> Result<SessionRow> {
    Ok(SessionRow {
        id: r.try_get("sid")?,
        user_id: r.try_get("s_user_id")?,
        team_id: r.try_get("s_team_id")?,
        csrf_token: r.try_get("csrf_token")?,
        user_agent: r.try_get("user_agent")?,
        ip_address: r.try_get("ip_address")?,
        created_at: parse_ts(&r.try_get::<String, _>("s_created_at")?)?,
        last_seen_at: parse_ts(&r.try_get::<String, _>("last_seen_at")?)?,
        expires_at: parse_ts(&r.try_get::<String, _>("expires_at")?)?,
    })
}

impl Store {
    // ---- sessions -----------------------------------------------------------------------

    pub async fn insert_session(&self, s: NewSession<'_>) -> Result<()> {
        sqlx::query(
            "INSERT INTO sessions (id, token_hash, csrf_token, user_id, team_id, user_agent, \
             ip_address, created_at, last_seen_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9)",
        )
        .bind(s.id)
        .bind(s.token_hash)
        .bind(s.csrf_token)
        .bind(s.user_id)
        .bind(s.team_id)
        .bind(s.user_agent)
        .bind(s.ip_address)
        .bind(ts(s.created_at))
        .bind(ts(s.expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The session whose secret hashes to `token_hash`, with its user and their role in the
    /// session's team. Expiry is the caller's business.
    pub async fn session_context(&self, token_hash: &str) -> Result<Option<SessionContext>> {
        let row = sqlx::query(&format!(
            "SELECT {SESSION_COLS}, {USER_COLS}, \
             (SELECT m.role FROM team_members m JOIN teams t ON t.id = m.team_id \
              WHERE m.team_id = s.team_id AND m.user_id = s.user_id AND t.deleted_at IS NULL) AS role \
             FROM sessions s JOIN users u ON u.id = s.user_id WHERE s.token_hash = $1"
        ))
        .bind(token_hash)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(r) => Ok(Some(SessionContext {
                session: session_row(&r)?,
                user: user_row(&r)?,
                role: r
                    .try_get::<Option<String>, _>("role")?
                    .map(role_of)
                    .transpose()?,
            })),
            None => Ok(None),
        }
    }

    pub async fn touch_session(&self, id: &str, now: DateTime<Utc>) -> Result<()> {
        sqlx::query("UPDATE sessions SET last_seen_at = $1 WHERE id = $2")
            .bind(ts(now))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn sessions_of_user(&self, user_id: &str) -> Result<Vec<SessionRow>> {
        let rows = sqlx::query(&format!(
            "SELECT {SESSION_COLS} FROM sessions s WHERE s.user_id = $1 ORDER BY s.created_at, s.id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(session_row).collect()
    }

    /// Deletes one session of `user_id`; `false` when they have no such session.
    pub async fn delete_session(&self, user_id: &str, id: &str) -> Result<bool> {
        let done = sqlx::query("DELETE FROM sessions WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn delete_sessions_of_user(&self, user_id: &str) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM sessions WHERE user_id = $1")
            .bind(user_id)
            .execute(&self.pool)
            .await?
            .rows_affected())
    }

    /// Removes sessions past their absolute end or idle since before `idle_before`.
    pub async fn delete_expired_sessions(
        &self,
        now: DateTime<Utc>,
        idle_before: DateTime<Utc>,
    ) -> Result<u64> {
        Ok(
            sqlx::query("DELETE FROM sessions WHERE expires_at <= $1 OR last_seen_at <= $2")
                .bind(ts(now))
                .bind(ts(idle_before))
                .execute(&self.pool)
                .await?
                .rows_affected(),
        )
    }

    /// Replaces session `old_id` with a new one (switch-team), in one transaction.
    pub async fn rotate_session(
        &self,
        old_id: &str,
        new: NewSession<'_>,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("DELETE FROM sessions WHERE id = $1")
            .bind(old_id)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "INSERT INTO sessions (id, token_hash, csrf_token, user_id, team_id, user_agent, \
             ip_address, created_at, last_seen_at, expires_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(new.id)
        .bind(new.token_hash)
        .bind(new.csrf_token)
        .bind(new.user_id)
        .bind(new.team_id)
        .bind(new.user_agent)
        .bind(new.ip_address)
        .bind(ts(new.created_at))
        .bind(ts(now))
        .bind(ts(new.expires_at))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}
