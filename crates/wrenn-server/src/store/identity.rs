//! Users, one-time tokens, sessions, teams, memberships, API keys and OAuth identities.
//!
//! Every method that depends on the time takes `now` from its caller, so the account service's
//! clock (a controllable one in tests) decides what has expired.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::{parse_ts, ts, Result, Store};

/// Who an API key belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKeyOwner {
    pub key_id: String,
    pub team_id: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    pub id: String,
    pub email: String,
    pub name: String,
    pub password_hash: Option<String>,
    pub is_admin: bool,
    /// `inactive` (signed up, not activated), `active`, `disabled` (by an admin) or `deleted`.
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

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
    pub role: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TeamRow {
    pub id: String,
    pub name: String,
    pub slug: String,
    pub byoc: bool,
    pub created_at: DateTime<Utc>,
    pub deleted_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberRow {
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub role: String,
    pub joined_at: DateTime<Utc>,
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

/// One line of the admin's team list.
#[derive(Debug, Clone)]
pub struct TeamSummary {
    pub team: TeamRow,
    pub members: i64,
    pub owner_email: Option<String>,
    pub capsules: i64,
}

/// A team the user owns, with how many members it has besides them.
#[derive(Debug, Clone)]
pub struct OwnedTeam {
    pub team_id: String,
    pub others: i64,
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

/// A user to create from an OAuth identity.
pub struct OAuthUser<'a> {
    pub user_id: &'a str,
    pub email: &'a str,
    pub name: &'a str,
    pub provider: &'a str,
    pub provider_user_id: &'a str,
}

/// A team to create.
pub struct NewTeam<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub slug: &'a str,
}

fn opt_ts(r: &AnyRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    r.try_get::<Option<String>, _>(col)?
        .map(|s| parse_ts(&s))
        .transpose()
}

const USER_COLS: &str =
    "u.id, u.email, u.name, u.password_hash, u.is_admin, u.status, u.created_at, u.deleted_at";

fn user_row(r: &AnyRow) -> Result<UserRow> {
    Ok(UserRow {
        id: r.try_get("id")?,
        email: r.try_get("email")?,
        name: r.try_get("name")?,
        password_hash: r.try_get("password_hash")?,
        is_admin: r.try_get::<i64, _>("is_admin")? != 0,
        status: r.try_get("status")?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        deleted_at: opt_ts(r, "deleted_at")?,
    })
}

const TEAM_COLS: &str = "t.id, t.name, t.slug, t.byoc, t.created_at, t.deleted_at";

fn team_row(r: &AnyRow) -> Result<TeamRow> {
    Ok(TeamRow {
        id: r.try_get("id")?,
        name: r.try_get("name")?,
        slug: r.try_get("slug")?,
        byoc: r.try_get::<i64, _>("byoc")? != 0,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
        deleted_at: opt_ts(r, "deleted_at")?,
    })
}

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

const SESSION_COLS: &str = "s.id AS sid, s.user_id AS s_user_id, s.team_id AS s_team_id, \
     s.csrf_token, s.user_agent, s.ip_address, s.created_at AS s_created_at, s.last_seen_at, \
     s.expires_at";

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
        status: &str,
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
        .bind(status)
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
            // The audit trail stays; only who it was is forgotten (REFERENCE.md): their name
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
                role: r.try_get("role")?,
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

    // ---- teams --------------------------------------------------------------------------

    /// Creates a team with `owner` as its owner.
    pub async fn create_team(
        &self,
        team: NewTeam<'_>,
        owner: &str,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        insert_team_in(&mut tx, &team, owner, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Creates an active admin user owning a new team, in one transaction (bootstrap).
    pub async fn create_admin_with_team(
        &self,
        user_id: &str,
        email: &str,
        name: &str,
        password_hash: Option<&str>,
        team: NewTeam<'_>,
    ) -> Result<()> {
        let now = Utc::now();
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO users (id, email, name, password_hash, is_admin, status, created_at) \
             VALUES ($1, $2, $3, $4, 1, 'active', $5)",
        )
        .bind(user_id)
        .bind(email)
        .bind(name)
        .bind(password_hash)
        .bind(ts(now))
        .execute(&mut *tx)
        .await?;
        insert_team_in(&mut tx, &team, user_id, now).await?;
        tx.commit().await?;
        Ok(())
    }

    /// A team that is not deleted.
    pub async fn team(&self, id: &str) -> Result<Option<TeamRow>> {
        sqlx::query(&format!(
            "SELECT {TEAM_COLS} FROM teams t WHERE t.id = $1 AND t.deleted_at IS NULL"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .map(|r| team_row(&r))
        .transpose()
    }

    /// The teams `user_id` belongs to (not deleted), each with their role, oldest first.
    pub async fn teams_of_user(&self, user_id: &str) -> Result<Vec<(TeamRow, String)>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEAM_COLS}, m.role FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 AND t.deleted_at IS NULL ORDER BY m.created_at, t.id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((team_row(r)?, r.try_get("role")?)))
            .collect()
    }

    /// `user_id`'s role in a team that is not deleted.
    pub async fn role_in_team(&self, team_id: &str, user_id: &str) -> Result<Option<String>> {
        let row = sqlx::query(
            "SELECT m.role FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.team_id = $1 AND m.user_id = $2 AND t.deleted_at IS NULL",
        )
        .bind(team_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(r.try_get(0)?),
            None => None,
        })
    }

    pub async fn rename_team(&self, id: &str, name: &str) -> Result<()> {
        sqlx::query("UPDATE teams SET name = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(name)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn set_team_byoc(&self, id: &str, byoc: bool) -> Result<bool> {
        let done = sqlx::query("UPDATE teams SET byoc = $1 WHERE id = $2 AND deleted_at IS NULL")
            .bind(i64::from(byoc))
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Soft-deletes a team: the row (and its slug) stays forever; its keys and memberships go.
    pub async fn soft_delete_team(&self, id: &str, now: DateTime<Utc>) -> Result<bool> {
        let mut tx = self.pool.begin().await?;
        let done = soft_delete_team_in(&mut tx, id, now).await?;
        tx.commit().await?;
        Ok(done)
    }

    pub async fn members(&self, team_id: &str) -> Result<Vec<MemberRow>> {
        let rows = sqlx::query(
            "SELECT u.id, u.email, u.name, m.role, m.created_at FROM team_members m \
             JOIN users u ON u.id = m.user_id WHERE m.team_id = $1 \
             ORDER BY CASE m.role WHEN 'owner' THEN 0 WHEN 'admin' THEN 1 ELSE 2 END, m.created_at, u.id",
        )
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(MemberRow {
                    user_id: r.try_get(0)?,
                    email: r.try_get(1)?,
                    name: r.try_get(2)?,
                    role: r.try_get(3)?,
                    joined_at: parse_ts(&r.try_get::<String, _>(4)?)?,
                })
            })
            .collect()
    }

    /// Adds a member; `false` when they already are one.
    pub async fn add_member(
        &self,
        team_id: &str,
        user_id: &str,
        role: &str,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO team_members (team_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (team_id, user_id) DO NOTHING",
        )
        .bind(team_id)
        .bind(user_id)
        .bind(role)
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Changes a member's role; never the owner's. `false` when no such non-owner member.
    pub async fn set_member_role(&self, team_id: &str, user_id: &str, role: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE team_members SET role = $1 WHERE team_id = $2 AND user_id = $3 AND role <> 'owner'",
        )
        .bind(role)
        .bind(team_id)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Removes a non-owner member. Their sessions in that team lose its rights at once (every
    /// request reads the membership) but stay valid for switching to another team.
    pub async fn remove_member(&self, team_id: &str, user_id: &str) -> Result<bool> {
        let done = sqlx::query(
            "DELETE FROM team_members WHERE team_id = $1 AND user_id = $2 AND role <> 'owner'",
        )
        .bind(team_id)
        .bind(user_id)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Teams `user_id` owns (not deleted) with the number of other members of each.
    pub async fn owned_teams(&self, user_id: &str) -> Result<Vec<OwnedTeam>> {
        let rows = sqlx::query(
            "SELECT t.id, (SELECT COUNT(*) FROM team_members o WHERE o.team_id = t.id AND o.user_id <> $1) \
             FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 AND m.role = 'owner' AND t.deleted_at IS NULL",
        )
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OwnedTeam {
                    team_id: r.try_get(0)?,
                    others: r.try_get(1)?,
                })
            })
            .collect()
    }

    /// Every team that is not deleted, for platform admins.
    pub async fn list_teams(&self) -> Result<Vec<TeamSummary>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEAM_COLS}, \
             (SELECT COUNT(*) FROM team_members m WHERE m.team_id = t.id) AS members, \
             (SELECT u.email FROM team_members m JOIN users u ON u.id = m.user_id \
              WHERE m.team_id = t.id AND m.role = 'owner') AS owner_email, \
             (SELECT COUNT(*) FROM capsules c WHERE c.team_id = t.id \
              AND c.status NOT IN ('stopped', 'error')) AS capsules \
             FROM teams t WHERE t.deleted_at IS NULL ORDER BY t.created_at, t.id"
        ))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(TeamSummary {
                    team: team_row(r)?,
                    members: r.try_get("members")?,
                    owner_email: r.try_get("owner_email")?,
                    capsules: r.try_get("capsules")?,
                })
            })
            .collect()
    }

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
            "SELECT k.id, k.team_id, k.name FROM api_keys k JOIN teams t ON t.id = k.team_id \
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
}

type Tx<'c> = sqlx::Transaction<'c, sqlx::Any>;

async fn insert_team_in(
    tx: &mut Tx<'_>,
    team: &NewTeam<'_>,
    owner: &str,
    now: DateTime<Utc>,
) -> Result<()> {
    let now = ts(now);
    sqlx::query("INSERT INTO teams (id, name, slug, created_at) VALUES ($1, $2, $3, $4)")
        .bind(team.id)
        .bind(team.name)
        .bind(team.slug)
        .bind(&now)
        .execute(&mut **tx)
        .await?;
    sqlx::query(
        "INSERT INTO team_members (team_id, user_id, role, created_at) VALUES ($1, $2, 'owner', $3)",
    )
    .bind(team.id)
    .bind(owner)
    .bind(&now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn soft_delete_team_in(tx: &mut Tx<'_>, id: &str, now: DateTime<Utc>) -> Result<bool> {
    let done = sqlx::query("UPDATE teams SET deleted_at = $1 WHERE id = $2 AND deleted_at IS NULL")
        .bind(ts(now))
        .bind(id)
        .execute(&mut **tx)
        .await?;
    for sql in [
        "DELETE FROM api_keys WHERE team_id = $1",
        "DELETE FROM team_members WHERE team_id = $1",
        "DELETE FROM channel_deliveries WHERE channel_id IN (SELECT id FROM channels WHERE team_id = $1)",
        "DELETE FROM channels WHERE team_id = $1",
    ] {
        sqlx::query(sql).bind(id).execute(&mut **tx).await?;
    }
    Ok(done.rows_affected() == 1)
}

impl Store {
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
