//! Templates in the database: teams' snapshot templates, and the platform team's built
//! templates (`snapshot` with memory, or `base`: a disk booted afresh).

use std::collections::BTreeMap;

use chrono::Utc;
use sqlx::any::AnyRow;
use sqlx::Row;
use wrenn_api::Template;

use super::{parse_ts, ts, Result, Store};

/// A stored snapshot template: the API's view plus where its files are.
#[derive(Debug, Clone)]
pub struct TemplateRow {
    pub template: Template,
    pub team_id: String,
    pub snapshot_id: String,
    pub host_id: String,
    pub disk_size_mb: u32,
    pub build_id: Option<String>,
    pub cache_key: Option<String>,
}

/// Where a template came from and what it gives its capsules.
#[derive(Debug, Clone)]
pub struct TemplateOrigin {
    /// `snapshot` (memory included: restored as saved) or `base` (the disk, booted afresh).
    pub kind: &'static str,
    pub default_user: Option<String>,
    pub default_env: BTreeMap<String, String>,
    pub build_id: Option<String>,
    pub protected: bool,
    /// For built-in templates: what they were made from.
    pub cache_key: Option<String>,
}

impl Default for TemplateOrigin {
    /// A team's live snapshot.
    fn default() -> Self {
        Self {
            kind: "snapshot",
            default_user: None,
            default_env: BTreeMap::new(),
            build_id: None,
            protected: false,
            cache_key: None,
        }
    }
}

/// What a new snapshot template records.
pub struct NewTemplate<'a> {
    pub team_id: &'a str,
    pub name: &'a str,
    pub snapshot_id: &'a str,
    pub host_id: &'a str,
    pub source_capsule: &'a str,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub size_bytes: u64,
    pub origin: TemplateOrigin,
}

const COLUMNS: &str = "team_id, name, kind, snapshot_id, host_id, vcpus, memory_mb, disk_size_mb, \
     size_bytes, created_at, default_user, default_env, build_id, protected, cache_key";

fn from_row(r: &AnyRow) -> Result<TemplateRow> {
    let team_id: String = r.try_get("team_id")?;
    let default_env: Option<String> = r.try_get("default_env")?;
    let default_env: Option<BTreeMap<String, String>> = default_env
        .map(|s| serde_json::from_str(&s))
        .transpose()
        .map_err(|e| super::StoreError::Corrupt(format!("templates.default_env: {e}")))?;
    Ok(TemplateRow {
        template: Template {
            name: r.try_get("name")?,
            kind: r.try_get("kind")?,
            vcpus: Some(r.try_get::<i64, _>("vcpus")? as u32),
            memory_mb: Some(r.try_get::<i64, _>("memory_mb")? as u32),
            size_bytes: r.try_get("size_bytes")?,
            created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
            platform: team_id == wrenn_api::id::PLATFORM_TEAM_ID,
            metadata: None,
            protected: r.try_get::<i64, _>("protected")? != 0,
            team_id: None,
            default_user: r.try_get("default_user")?,
            default_env,
            disk_usage_bytes: None,
        },
        team_id,
        snapshot_id: r.try_get("snapshot_id")?,
        host_id: r.try_get("host_id")?,
        disk_size_mb: r.try_get::<i64, _>("disk_size_mb")? as u32,
        build_id: r.try_get("build_id")?,
        cache_key: r.try_get("cache_key")?,
    })
}

impl Store {
    /// Inserts a template; `false` when the team already has one by that name.
    pub async fn insert_template(&self, t: &NewTemplate<'_>) -> Result<bool> {
        let o = &t.origin;
        let env = (!o.default_env.is_empty())
            .then(|| serde_json::to_string(&o.default_env).unwrap_or_default());
        let done = sqlx::query(
            "INSERT INTO templates (team_id, name, kind, snapshot_id, host_id, source_capsule, vcpus, \
             memory_mb, disk_size_mb, size_bytes, created_at, default_user, default_env, build_id, \
             protected, cache_key) \
             VALUES ($1, $2, $11, $3, $4, $5, $6, $7, $8, $9, $10, $12, $13, $14, $15, $16) \
             ON CONFLICT DO NOTHING",
        )
        .bind(t.team_id)
        .bind(t.name)
        .bind(t.snapshot_id)
        .bind(t.host_id)
        .bind(t.source_capsule)
        .bind(t.vcpus as i64)
        .bind(t.memory_mb as i64)
        .bind(t.disk_size_mb as i64)
        .bind(t.size_bytes as i64)
        .bind(ts(Utc::now()))
        .bind(o.kind)
        .bind(o.default_user.as_deref())
        .bind(env)
        .bind(o.build_id.as_deref())
        .bind(o.protected as i64)
        .bind(o.cache_key.as_deref())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub async fn template(&self, team_id: &str, name: &str) -> Result<Option<TemplateRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM templates WHERE team_id = $1 AND name = $2"
        ))
        .bind(team_id)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(from_row)
        .transpose()
    }

    pub async fn list_templates(&self, team_id: &str) -> Result<Vec<TemplateRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM templates WHERE team_id = $1 ORDER BY created_at, name"
        ))
        .bind(team_id)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
    }

    /// Every team's templates (platform admins).
    pub async fn list_all_templates(&self) -> Result<Vec<TemplateRow>> {
        sqlx::query(&format!(
            "SELECT {COLUMNS} FROM templates ORDER BY created_at, team_id, name"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(from_row)
        .collect()
    }

    /// Removes a template row and returns it (`None` if there was none).
    pub async fn delete_template(&self, team_id: &str, name: &str) -> Result<Option<TemplateRow>> {
        let Some(row) = self.template(team_id, name).await? else {
            return Ok(None);
        };
        sqlx::query("DELETE FROM templates WHERE team_id = $1 AND name = $2 AND snapshot_id = $3")
            .bind(team_id)
            .bind(name)
            .bind(&row.snapshot_id)
            .execute(&self.pool)
            .await?;
        Ok(Some(row))
    }
}

/// Copies of template snapshots on other hosts (`template_copies`).
impl Store {
    /// Records that `host_id` holds a copy of `snapshot_id` (idempotent).
    pub async fn add_template_copy(
        &self,
        snapshot_id: &str,
        host_id: &str,
        size_bytes: u64,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO template_copies (snapshot_id, host_id, size_bytes, created_at) \
             VALUES ($1, $2, $3, $4) ON CONFLICT (snapshot_id, host_id) DO NOTHING",
        )
        .bind(snapshot_id)
        .bind(host_id)
        .bind(i64::try_from(size_bytes).unwrap_or(i64::MAX))
        .bind(ts(Utc::now()))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Hosts holding a copy of `snapshot_id`.
    pub async fn template_copies(&self, snapshot_id: &str) -> Result<Vec<String>> {
        let rows = sqlx::query(
            "SELECT host_id FROM template_copies WHERE snapshot_id = $1 ORDER BY created_at, host_id",
        )
        .bind(snapshot_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>("host_id")?))
            .collect()
    }

    /// (snapshot, host) of copies whose template is gone: still to be deleted on their host.
    pub async fn orphaned_template_copies(&self) -> Result<Vec<(String, String)>> {
        let rows = sqlx::query(
            "SELECT c.snapshot_id, c.host_id FROM template_copies c \
             WHERE NOT EXISTS (SELECT 1 FROM templates t WHERE t.snapshot_id = c.snapshot_id) \
             ORDER BY c.created_at",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("snapshot_id")?, r.try_get("host_id")?)))
            .collect()
    }

    /// Bytes of every copy of `snapshot_id` (summed here: PostgreSQL sums BIGINTs as NUMERIC).
    pub async fn template_copy_bytes(&self, snapshot_id: &str) -> Result<i64> {
        let rows = sqlx::query("SELECT size_bytes FROM template_copies WHERE snapshot_id = $1")
            .bind(snapshot_id)
            .fetch_all(&self.pool)
            .await?;
        let mut total = 0i64;
        for r in &rows {
            total = total.saturating_add(r.try_get::<i64, _>("size_bytes")?);
        }
        Ok(total)
    }

    pub async fn remove_template_copy(&self, snapshot_id: &str, host_id: &str) -> Result<()> {
        sqlx::query("DELETE FROM template_copies WHERE snapshot_id = $1 AND host_id = $2")
            .bind(snapshot_id)
            .bind(host_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }
}
