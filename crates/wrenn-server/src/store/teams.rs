//! Teams and their members.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;

use super::Tx;
use wrenn_api::Role;

use super::{opt_ts, parse_ts, role_of, ts, Result, Store};

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
    pub role: Role,
    pub joined_at: DateTime<Utc>,
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

/// A team to create.
pub struct NewTeam<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub slug: &'a str,
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

impl Store {
    // ---- teams --------------------------------------------------------------------------

    /// The platform team (owner of built templates and of the capsules builds run in; it has
    /// no members), created on first start.
    pub async fn ensure_platform_team(&self) -> Result<()> {
        sqlx::query(
            "INSERT INTO teams (id, name, slug, created_at) VALUES ($1, 'Platform', $1, $2) \
             ON CONFLICT DO NOTHING",
        )
        .bind(wrenn_api::id::PLATFORM_TEAM_ID)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

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
    pub async fn teams_of_user(&self, user_id: &str) -> Result<Vec<(TeamRow, Role)>> {
        let rows = sqlx::query(&format!(
            "SELECT {TEAM_COLS}, m.role FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.user_id = $1 AND t.deleted_at IS NULL ORDER BY m.created_at, t.id"
        ))
        .bind(user_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((team_row(r)?, role_of(r.try_get("role")?)?)))
            .collect()
    }

    /// `user_id`'s role in a team that is not deleted.
    pub async fn role_in_team(&self, team_id: &str, user_id: &str) -> Result<Option<Role>> {
        let row = sqlx::query(
            "SELECT m.role FROM team_members m JOIN teams t ON t.id = m.team_id \
             WHERE m.team_id = $1 AND m.user_id = $2 AND t.deleted_at IS NULL",
        )
        .bind(team_id)
        .bind(user_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            Some(r) => Some(role_of(r.try_get(0)?)?),
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
                    role: role_of(r.try_get(3)?)?,
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
        role: Role,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        let done = sqlx::query(
            "INSERT INTO team_members (team_id, user_id, role, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (team_id, user_id) DO NOTHING",
        )
        .bind(team_id)
        .bind(user_id)
        .bind(role.as_str())
        .bind(ts(now))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Changes a member's role; never the owner's. `false` when no such non-owner member.
    pub async fn set_member_role(&self, team_id: &str, user_id: &str, role: Role) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE team_members SET role = $1 WHERE team_id = $2 AND user_id = $3 AND role <> 'owner'",
        )
        .bind(role.as_str())
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
}

pub(super) async fn insert_team_in(
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

pub(super) async fn soft_delete_team_in(
    tx: &mut Tx<'_>,
    id: &str,
    now: DateTime<Utc>,
) -> Result<bool> {
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
