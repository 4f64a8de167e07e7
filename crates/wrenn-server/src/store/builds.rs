//! Template builds. A build's status only moves forward, and every move is conditional on
//! the status it leaves, so a cancel and the runner finishing can race without either
//! overwriting the other.

use chrono::{DateTime, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;
use wrenn_api::{Build, BuildLog, BuildStatus};

use super::{parse_ts, ts, Result, Store, StoreError};

/// A stored build: the API's view plus what only the control plane needs.
#[derive(Debug, Clone)]
pub struct BuildRow {
    pub build: Build,
    /// Identifies what the build makes (recipe, base, shape); equal hashes make equal templates.
    pub recipe_hash: String,
    /// Where the uploaded archive (normalized to tar) waits on the control plane.
    pub archive: Option<String>,
}

/// What a new build records.
pub struct NewBuild<'a> {
    pub id: &'a str,
    pub name: &'a str,
    /// `""` for a build from an OCI image.
    pub base_template: &'a str,
    pub base_image: Option<&'a str>,
    pub recipe: &'a [String],
    pub healthcheck: Option<&'a str>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub skip_pre_post: bool,
    pub total_steps: u32,
    pub recipe_hash: &'a str,
    pub archive: Option<&'a str>,
    pub builtin: bool,
    pub created_by: &'a str,
}

const COLUMNS: &str = "id, name, base_template, base_image, recipe, healthcheck, vcpus, memory_mb, disk_size_mb, \
     skip_pre_post, status, current_step, total_steps, logs, error, sandbox_id, host_id, \
     default_user, default_env, recipe_hash, archive, builtin, created_at, started_at, completed_at";

fn json<T: serde::de::DeserializeOwned>(r: &AnyRow, col: &str) -> Result<T> {
    let s: String = r.try_get(col)?;
    serde_json::from_str(&s).map_err(|e| StoreError::Corrupt(format!("builds.{col}: {e}")))
}

fn opt_ts(r: &AnyRow, col: &str) -> Result<Option<DateTime<Utc>>> {
    r.try_get::<Option<String>, _>(col)?
        .map(|s| parse_ts(&s))
        .transpose()
}

fn from_row(r: &AnyRow) -> Result<BuildRow> {
    let status: String = r.try_get("status")?;
    let healthcheck: Option<String> = r.try_get("healthcheck")?;
    let default_env: Option<String> = r.try_get("default_env")?;
    Ok(BuildRow {
        build: Build {
            id: r.try_get("id")?,
            name: r.try_get("name")?,
            base_template: Some(r.try_get::<String, _>("base_template")?).filter(|b| !b.is_empty()),
            base_image: r.try_get("base_image")?,
            recipe: json(r, "recipe")?,
            template_type: if healthcheck.is_some() {
                "snapshot"
            } else {
                "base"
            }
            .into(),
            healthcheck,
            vcpus: r.try_get::<i64, _>("vcpus")? as u32,
            memory_mb: r.try_get::<i64, _>("memory_mb")? as u32,
            disk_size_mb: r.try_get::<i64, _>("disk_size_mb")? as u32,
            skip_pre_post: r.try_get::<i64, _>("skip_pre_post")? != 0,
            status: BuildStatus::parse(&status)
                .ok_or_else(|| StoreError::Corrupt(format!("build status {status:?}")))?,
            current_step: r.try_get::<i64, _>("current_step")? as u32,
            total_steps: r.try_get::<i64, _>("total_steps")? as u32,
            logs: json(r, "logs")?,
            error: r.try_get("error")?,
            sandbox_id: r.try_get("sandbox_id")?,
            host_id: r.try_get("host_id")?,
            default_user: r.try_get("default_user")?,
            default_env: default_env
                .map(|s| serde_json::from_str(&s))
                .transpose()
                .map_err(|e| StoreError::Corrupt(format!("builds.default_env: {e}")))?,
            builtin: r.try_get::<i64, _>("builtin")? != 0,
            created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
            started_at: opt_ts(r, "started_at")?,
            completed_at: opt_ts(r, "completed_at")?,
        },
        recipe_hash: r.try_get("recipe_hash")?,
        archive: r.try_get("archive")?,
    })
}

/// An SQL list of statuses (fixed strings, never user input).
fn status_list(statuses: &[BuildStatus]) -> String {
    statuses
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

impl Store {
    pub async fn insert_build(&self, b: &NewBuild<'_>) -> Result<BuildRow> {
        sqlx::query(
            "INSERT INTO builds (id, name, base_template, recipe, healthcheck, vcpus, memory_mb, \
             disk_size_mb, skip_pre_post, status, current_step, total_steps, logs, recipe_hash, \
             archive, builtin, created_by, created_at, base_image) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'pending', 0, $10, '[]', $11, $12, $13, $14, $15, $16)",
        )
        .bind(b.id)
        .bind(b.name)
        .bind(b.base_template)
        .bind(to_json(&b.recipe))
        .bind(b.healthcheck)
        .bind(b.vcpus as i64)
        .bind(b.memory_mb as i64)
        .bind(b.disk_size_mb as i64)
        .bind(b.skip_pre_post as i64)
        .bind(b.total_steps as i64)
        .bind(b.recipe_hash)
        .bind(b.archive)
        .bind(b.builtin as i64)
        .bind(b.created_by)
        .bind(ts(Utc::now()))
        .bind(b.base_image)
        .execute(&self.pool)
        .await?;
        self.build(b.id)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("build {} vanished after insert", b.id)))
    }

    pub async fn build(&self, id: &str) -> Result<Option<BuildRow>> {
        sqlx::query(&format!("SELECT {COLUMNS} FROM builds WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .as_ref()
            .map(from_row)
            .transpose()
    }

    /// Builds, newest first.
    pub async fn list_builds(&self, limit: u32) -> Result<Vec<BuildRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM builds ORDER BY created_at DESC, id DESC LIMIT $1"
        ))
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
    }

    /// Builds in one of `statuses` (run by `replica`, when given), oldest first.
    pub async fn builds_in(
        &self,
        statuses: &[BuildStatus],
        replica: Option<&str>,
    ) -> Result<Vec<BuildRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM builds WHERE status IN ({}) AND ($1 IS NULL OR replica = $1) \
             ORDER BY created_at, id",
            status_list(statuses)
        ))
        .bind(replica)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
    }

    /// The newest build of `name` that is pending or running, if any.
    pub async fn active_build_named(&self, name: &str) -> Result<Option<BuildRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM builds WHERE name = $1 AND status IN ('pending', 'running') \
             ORDER BY created_at DESC LIMIT 1"
        ))
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
    }

    /// `pending` → `running` on `replica` (with its start time); `false` if it was not
    /// pending (another replica took it, or it was cancelled).
    pub async fn start_build(&self, id: &str, replica: &str) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE builds SET status = 'running', started_at = $2, replica = $3 \
             WHERE id = $1 AND status = 'pending'",
        )
        .bind(id)
        .bind(ts(Utc::now()))
        .bind(replica)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Records the capsule a running build uses.
    pub async fn set_build_capsule(
        &self,
        id: &str,
        sandbox_id: Option<&str>,
        host_id: Option<&str>,
    ) -> Result<()> {
        sqlx::query("UPDATE builds SET sandbox_id = $2, host_id = $3 WHERE id = $1")
            .bind(id)
            .bind(sandbox_id)
            .bind(host_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the step a running build is at.
    pub async fn set_build_step(&self, id: &str, step: u32) -> Result<()> {
        sqlx::query("UPDATE builds SET current_step = $2 WHERE id = $1 AND status = 'running'")
            .bind(id)
            .bind(step as i64)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Replaces a build's logs (the runner holds the whole list; builds are bounded in steps).
    pub async fn set_build_logs(&self, id: &str, logs: &[BuildLog]) -> Result<()> {
        sqlx::query("UPDATE builds SET logs = $2 WHERE id = $1")
            .bind(id)
            .bind(to_json(&logs))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Records the defaults a build's template will carry.
    pub async fn set_build_defaults(
        &self,
        id: &str,
        user: &str,
        env: &std::collections::BTreeMap<String, String>,
    ) -> Result<()> {
        sqlx::query("UPDATE builds SET default_user = $2, default_env = $3 WHERE id = $1")
            .bind(id)
            .bind(user)
            .bind(to_json(env))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends a build: `from` one of the given statuses to a final one. `false` when it was no
    /// longer in any of them (someone else ended it first).
    pub async fn finish_build(
        &self,
        id: &str,
        from: &[BuildStatus],
        to: BuildStatus,
        error: Option<&str>,
    ) -> Result<bool> {
        let list = status_list(from);
        let done = sqlx::query(&format!(
            "UPDATE builds SET status = $2, error = $3, completed_at = $4, archive = NULL \
             WHERE id = $1 AND status IN ({list})"
        ))
        .bind(id)
        .bind(to.as_str())
        .bind(error)
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }
}
