//! The audit log: append-only rows, read newest first by `(created_at, id)`.

use chrono::{DateTime, SecondsFormat, Utc};
use sqlx::any::AnyRow;
use sqlx::Row;
use wrenn_api::AuditLogEntry;

use super::{parse_ts, Result, Store, StoreError};

/// Audit timestamps keep microseconds, so a cursor names one instant exactly.
pub fn audit_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

const COLS: &str = "id, team_id, actor_type, actor_id, actor_name, resource_type, resource_id, \
     action, scope, status, metadata, created_at";

fn entry(r: &AnyRow) -> Result<AuditLogEntry> {
    let metadata: String = r.try_get("metadata")?;
    Ok(AuditLogEntry {
        id: r.try_get("id")?,
        team_id: r.try_get("team_id")?,
        actor_type: r.try_get("actor_type")?,
        actor_id: r.try_get("actor_id")?,
        actor_name: r.try_get("actor_name")?,
        resource_type: r.try_get("resource_type")?,
        resource_id: r.try_get("resource_id")?,
        action: r.try_get("action")?,
        scope: r.try_get("scope")?,
        status: r.try_get("status")?,
        metadata: serde_json::from_str(&metadata)
            .map_err(|e| StoreError::Corrupt(format!("audit metadata: {e}")))?,
        created_at: parse_ts(&r.try_get::<String, _>("created_at")?)?,
    })
}

/// Which entries a page may hold.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// `None`: every team's entries and platform-wide ones (admins).
    pub team_id: Option<String>,
    /// Scopes to include (`team`, `admin`); empty means all.
    pub scopes: Vec<String>,
    pub resource_types: Vec<String>,
    pub actions: Vec<String>,
    /// Only entries strictly older than this `(created_at, id)`.
    pub before: Option<(DateTime<Utc>, String)>,
    pub limit: u32,
}

impl Store {
    pub async fn insert_audit(&self, e: &AuditLogEntry) -> Result<()> {
        sqlx::query(&format!(
            "INSERT INTO audit_logs ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)"
        ))
        .bind(&e.id)
        .bind(&e.team_id)
        .bind(&e.actor_type)
        .bind(&e.actor_id)
        .bind(&e.actor_name)
        .bind(&e.resource_type)
        .bind(&e.resource_id)
        .bind(&e.action)
        .bind(&e.scope)
        .bind(&e.status)
        .bind(serde_json::Value::Object(e.metadata.clone()).to_string())
        .bind(audit_ts(e.created_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// One page, newest first.
    pub async fn audit_page(&self, q: &AuditQuery) -> Result<Vec<AuditLogEntry>> {
        let mut sql = format!("SELECT {COLS} FROM audit_logs WHERE 1 = 1");
        let mut binds: Vec<String> = Vec::new();
        let next = |v: String, binds: &mut Vec<String>| {
            binds.push(v);
            format!("${}", binds.len())
        };
        if let Some(team) = &q.team_id {
            sql += &format!(" AND team_id = {}", next(team.clone(), &mut binds));
        }
        for (col, values) in [
            ("scope", &q.scopes),
            ("resource_type", &q.resource_types),
            ("action", &q.actions),
        ] {
            if !values.is_empty() {
                let ps: Vec<String> = values.iter().map(|v| next(v.clone(), &mut binds)).collect();
                sql += &format!(" AND {col} IN ({})", ps.join(", "));
            }
        }
        if let Some((t, id)) = &q.before {
            let t1 = next(audit_ts(*t), &mut binds);
            let t2 = next(audit_ts(*t), &mut binds);
            let id = next(id.clone(), &mut binds);
            sql += &format!(" AND (created_at < {t1} OR (created_at = {t2} AND id < {id}))");
        }
        sql += &format!(
            " ORDER BY created_at DESC, id DESC LIMIT {}",
            q.limit.clamp(1, 1000)
        );
        let mut query = sqlx::query(&sql);
        for b in &binds {
            query = query.bind(b);
        }
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(entry)
            .collect()
    }
}
