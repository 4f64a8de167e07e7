//! Snapshot templates (a team's named live snapshots) and capsule metrics.

use tracing::{info, warn};
use wrenn_api::id::{new_id, prefix, PLATFORM_TEAM_ID};
use wrenn_api::{
    validate_template_name, ApiError, CapsuleStatus, CreateSnapshotRequest, ErrorCode, EventActor,
    EventKind, Template,
};

use super::{CapsuleService, OrLog, Result};
use crate::error::from_host;
use crate::store::{NewTemplate, TemplateOrigin};

impl CapsuleService {
    /// `POST /v1/snapshots`: a live snapshot of a running capsule (shown `snapshotting` for
    /// the moment it is frozen and copied; it runs on). Names are the team's and immutable:
    /// an existing one is 409 unless `overwrite`, which replaces it.
    pub async fn create_snapshot(
        &self,
        team_id: &str,
        req: CreateSnapshotRequest,
        overwrite: bool,
        actor: &EventActor,
    ) -> Result<Template> {
        let name = match req.name {
            Some(n) => n,
            None => format!("template-{:08x}", rand::random::<u32>()),
        };
        validate_template_name(&name).map_err(ApiError::invalid)?;
        let platform = self.pool.base_image_names().await?;
        if platform.contains(&name)
            || (team_id != PLATFORM_TEAM_ID
                && self
                    .store
                    .template(PLATFORM_TEAM_ID, &name)
                    .await?
                    .is_some())
        {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("{name:?} is a platform template"),
            ));
        }
        self.owned(team_id, &req.sandbox_id).await?;
        let exists = self.store.template(team_id, &name).await?.is_some();
        if exists && !overwrite {
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("template {name:?} exists (use ?overwrite=true to replace it)"),
            ));
        }
        if !exists {
            // Checked, not held: a snapshot takes seconds, and the team's creates should not
            // wait for it (two snapshots at once may pass the limit by one).
            let snapshots = super::quotas::Ask {
                snapshots: 1,
                ..Default::default()
            };
            drop(self.admit(team_id, snapshots).await?);
        }
        let template = self
            .snapshot_into(
                team_id,
                &req.sandbox_id,
                &name,
                TemplateOrigin::default(),
                overwrite,
            )
            .await?;
        self.events
            .other(
                EventKind::SnapshotCreate,
                "template",
                &name,
                Some(team_id),
                actor,
                Some(true),
            )
            .await;
        Ok(template)
    }

    /// A build's capsule becomes platform template `name` (a live snapshot; for a `base`
    /// template only its disk is used). `replace` swaps out an existing template by that name
    /// (built-in templates rebuilt after a recipe change).
    pub async fn publish_template(
        &self,
        capsule_id: &str,
        name: &str,
        origin: TemplateOrigin,
        replace: bool,
    ) -> Result<Template> {
        let t = self
            .snapshot_into(PLATFORM_TEAM_ID, capsule_id, name, origin, replace)
            .await?;
        self.events
            .other(
                EventKind::SnapshotCreate,
                "template",
                name,
                None,
                &EventActor::system("template-build"),
                Some(true),
            )
            .await;
        Ok(t)
    }

    /// A live snapshot of a running capsule of `team_id`, recorded as the team's template
    /// `name` (shown `snapshotting` for the moment it is frozen and copied; it runs on).
    async fn snapshot_into(
        &self,
        team_id: &str,
        id: &str,
        name: &str,
        origin: TemplateOrigin,
        overwrite: bool,
    ) -> Result<Template> {
        use CapsuleStatus::*;
        let row = self.owned(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        if !self.store.transition(id, &[Running], Snapshotting).await? {
            return Err(ApiError::invalid_state(format!(
                "capsule {id} is {}, not running",
                row.capsule.status.as_str()
            )));
        }
        let _busy = self.hold(id);
        let snapshot_id = new_id(prefix::SNAPSHOT);
        let taken = host.snapshot(id.to_string(), snapshot_id.clone()).await;
        self.store
            .transition(id, &[Snapshotting], Running)
            .await
            .or_log("recording the end of a snapshot", id, host.host_id());
        let meta = taken.map_err(from_host)?;
        let new = NewTemplate {
            team_id,
            name,
            snapshot_id: &snapshot_id,
            host_id: host.host_id(),
            source_capsule: id,
            vcpus: meta.vcpus,
            memory_mb: meta.memory_mb,
            disk_size_mb: meta.disk_mb as u32,
            size_bytes: meta.size_bytes,
            origin,
        };
        let replaced = if overwrite {
            self.store.delete_template(team_id, name).await?
        } else {
            None
        };
        if !self.store.insert_template(&new).await? {
            // Someone took the name meanwhile: this snapshot is nobody's.
            host.delete_snapshot(snapshot_id.clone()).await.or_log(
                "deleting an unnamed snapshot",
                id,
                host.host_id(),
            );
            return Err(ApiError::new(
                ErrorCode::AlreadyExists,
                format!("template {name:?} exists"),
            ));
        }
        if let Some(old) = replaced {
            self.delete_snapshot_files(&old.host_id, &old.snapshot_id)
                .await;
        }
        info!(capsule_id = %id, template = %name, snapshot_id, size_bytes = meta.size_bytes, "template created");
        Ok(self
            .store
            .template(team_id, name)
            .await?
            .ok_or_else(|| ApiError::internal("template vanished"))?
            .template)
    }

    /// `GET /metrics`: running and paused capsules (and those between the two); others 404.
    pub async fn metrics(
        &self,
        team_id: &str,
        id: &str,
        range: Option<&str>,
    ) -> Result<serde_json::Value> {
        use CapsuleStatus::*;
        let range = range.unwrap_or("10m");
        let Some(range) = wrenn_api::MetricsRange::parse(range) else {
            return Err(ApiError::invalid(format!(
                "range must be one of 5m, 10m, 1h, 2h, 6h, 12h, 24h; got {range:?}"
            )));
        };
        let row = self.owned(team_id, id).await?;
        if !matches!(
            row.capsule.status,
            Running | Pausing | Paused | Resuming | Snapshotting
        ) {
            return Err(ApiError::not_found(format!(
                "no metrics for capsule {id}: it is {}",
                row.capsule.status.as_str()
            )));
        }
        let points = self
            .pool
            .client_for(&row)
            .await?
            .metrics(id.to_string(), range)
            .await
            .map_err(from_host)?;
        Ok(serde_json::json!({ "sandbox_id": id, "range": range.as_str(), "points": points }))
    }

    /// `GET /v1/snapshots`: the team's snapshots and the platform's base templates.
    pub async fn list_templates(&self, team_id: &str, kind: Option<&str>) -> Result<Vec<Template>> {
        if let Some(k) = kind {
            if k != "base" && k != "snapshot" {
                return Err(ApiError::invalid(format!(
                    "type must be base or snapshot, not {k:?}"
                )));
            }
        }
        let mut out = Vec::new();
        if kind != Some("snapshot") {
            let host = self.pool.any().await?;
            for t in host.base_templates().await.map_err(from_host)? {
                out.push(Template {
                    name: t.name,
                    kind: "base".into(),
                    vcpus: None,
                    memory_mb: None,
                    size_bytes: t.size_bytes as i64,
                    created_at: t.built_at,
                    platform: true,
                    metadata: None,
                    protected: true,
                    team_id: None,
                    default_user: None,
                    default_env: None,
                    disk_usage_bytes: None,
                });
            }
        }
        let mut stored = self.store.list_templates(PLATFORM_TEAM_ID).await?;
        if team_id != PLATFORM_TEAM_ID {
            stored.extend(self.store.list_templates(team_id).await?);
        }
        out.extend(
            stored
                .into_iter()
                .map(|t| t.template)
                .filter(|t| kind.is_none_or(|k| k == t.kind)),
        );
        Ok(out)
    }

    /// `DELETE /v1/snapshots/{name}`: the name goes at once; the files once no capsule uses them.
    pub async fn delete_template(
        &self,
        team_id: &str,
        name: &str,
        actor: &EventActor,
    ) -> Result<()> {
        if self
            .pool
            .base_image_names()
            .await?
            .iter()
            .any(|t| t == name)
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("{name:?} is a platform template and cannot be deleted"),
            ));
        }
        if team_id != PLATFORM_TEAM_ID
            && self.store.template(team_id, name).await?.is_none()
            && self.store.template(PLATFORM_TEAM_ID, name).await?.is_some()
        {
            return Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("{name:?} is a platform template and cannot be deleted"),
            ));
        }
        let row = self
            .store
            .delete_template(team_id, name)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("template {name:?} not found")))?;
        self.delete_snapshot_files(&row.host_id, &row.snapshot_id)
            .await;
        // Copies on other hosts go too (each kept by its host while capsules use it), in the
        // background: a host that is slow to answer does not hold up the request.
        let (copies, snapshot_id) = (self.copies.clone(), row.snapshot_id.clone());
        tokio::spawn(async move { copies.delete_all(&snapshot_id).await });
        self.events
            .other(
                EventKind::SnapshotDelete,
                "template",
                name,
                (team_id != PLATFORM_TEAM_ID).then_some(team_id),
                actor,
                Some(true),
            )
            .await;
        Ok(())
    }

    /// Deletes a snapshot's files on its host (logged, not failed, when that is not possible
    /// now: the name is gone either way).
    pub(super) async fn delete_snapshot_files(&self, host_id: &str, snapshot_id: &str) {
        match self.pool.get(host_id) {
            Some(h) => {
                if let Err(e) = h.delete_snapshot(snapshot_id.to_string()).await {
                    warn!(snapshot_id, host_id, error = %e, "cannot delete snapshot files");
                }
            }
            None => warn!(
                snapshot_id,
                host_id, "snapshot files stay: their host is not connected"
            ),
        }
    }
}

/// Bytes templates take on the hosts, by base image name and by snapshot id (see
/// [`CapsuleService::template_disk_usage`]).
#[derive(Debug, Default)]
pub struct TemplateDiskUsage {
    pub images: std::collections::HashMap<String, i64>,
    pub snapshots: std::collections::HashMap<String, i64>,
}

/// How long the admin template list waits for each host's answer.
const USAGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

impl CapsuleService {
    /// What templates take on disk: every online host's base images and per-shape template
    /// snapshots (hosts that do not answer within [`USAGE_TIMEOUT`] are left out), plus each
    /// stored template's files where it was made and its copies (from the database).
    pub async fn template_disk_usage(&self) -> Result<TemplateDiskUsage> {
        let mut usage = TemplateDiskUsage::default();
        let mut asks = tokio::task::JoinSet::new();
        for host in self.pool.all() {
            if self.pool.online(host.host_id()).await.is_err() {
                continue;
            }
            asks.spawn(async move {
                tokio::time::timeout(USAGE_TIMEOUT, async {
                    Ok::<_, wrenn_host::HostError>((
                        host.base_templates().await?,
                        host.shape_snapshots().await?,
                    ))
                })
                .await
            });
        }
        while let Some(answer) = asks.join_next().await {
            let Ok(Ok(Ok((images, shapes)))) = answer else {
                continue;
            };
            // What hosts report is added without overflowing (a BYOC host may say anything).
            let add = |total: &mut i64, bytes: u64| {
                *total = total.saturating_add(i64::try_from(bytes).unwrap_or(i64::MAX));
            };
            for i in images {
                add(usage.images.entry(i.name).or_default(), i.size_bytes);
            }
            for s in shapes {
                if let Some(name) = s.image {
                    add(usage.images.entry(name).or_default(), s.bytes);
                } else if let Some(id) = s.snapshot_id {
                    add(usage.snapshots.entry(id).or_default(), s.bytes);
                }
            }
        }
        for t in self.store.list_all_templates().await? {
            let copies = self.store.template_copy_bytes(&t.snapshot_id).await?;
            let total = usage.snapshots.entry(t.snapshot_id).or_default();
            *total = total.saturating_add(t.template.size_bytes.saturating_add(copies));
        }
        Ok(usage)
    }
}
