//! Template builds (`/v1/admin/builds`): the spec leaves their bodies untyped; these are the
//! shapes the reference platform answers, which clients (the dashboard, scripts) rely on.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a build stands. `Pending` → `Running` → `Success` | `Failed`; `Cancelled` from
/// `Pending` or `Running`. The last three are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BuildStatus {
    Pending,
    Running,
    Success,
    Failed,
    Cancelled,
}

impl BuildStatus {
    pub const ALL: [BuildStatus; 5] = [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
        BuildStatus::Failed,
        BuildStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Pending => "pending",
            BuildStatus::Running => "running",
            BuildStatus::Success => "success",
            BuildStatus::Failed => "failed",
            BuildStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|b| b.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            BuildStatus::Success | BuildStatus::Failed | BuildStatus::Cancelled
        )
    }
}

/// The part of a build a step belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BuildPhase {
    /// Package lists refreshed before the recipe.
    PreBuild,
    /// The recipe's own instructions.
    Recipe,
    /// Clean-up after the recipe (package caches, uploaded files) and the template's defaults.
    PostBuild,
    /// Waiting for the health check before the memory snapshot.
    Healthcheck,
}

impl BuildPhase {
    pub fn as_str(self) -> &'static str {
        match self {
            BuildPhase::PreBuild => "pre-build",
            BuildPhase::Recipe => "recipe",
            BuildPhase::PostBuild => "post-build",
            BuildPhase::Healthcheck => "healthcheck",
        }
    }
}

/// One finished step of a build.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BuildLog {
    /// 1-based within its phase (for the recipe: the instruction's position).
    pub step: u32,
    pub phase: BuildPhase,
    pub cmd: String,
    /// The last [`MAX_LOG_BYTES`] of each stream (the live stream carries everything).
    pub stdout: String,
    pub stderr: String,
    /// The command's exit code; `None` for steps that run no command (`ENV`).
    pub exit: Option<i32>,
    pub ok: bool,
    pub elapsed_ms: u64,
}

/// Output kept per stream per step in a build's record.
pub const MAX_LOG_BYTES: usize = 64 * 1024;

/// The API's build object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub id: String,
    pub name: String,
    /// The template the build starts from; `null` when it starts from an OCI image.
    pub base_template: Option<String>,
    /// Extension: the OCI image the build starts from instead of a template.
    pub base_image: Option<String>,
    pub recipe: Vec<String>,
    pub healthcheck: Option<String>,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub skip_pre_post: bool,
    pub status: BuildStatus,
    /// The recipe instruction running (or last run); 0 before the recipe starts.
    pub current_step: u32,
    /// Instructions in the recipe.
    pub total_steps: u32,
    pub logs: Vec<BuildLog>,
    pub error: Option<String>,
    /// The capsule the build runs (or ran) in; destroyed when the build ends.
    pub sandbox_id: Option<String>,
    pub host_id: Option<String>,
    pub default_user: Option<String>,
    pub default_env: Option<BTreeMap<String, String>>,
    /// `snapshot` (a health check was given: memory included) or `base` (disk only).
    pub template_type: String,
    /// Built into the platform (`python`, `node`, `code-runner-beta`).
    pub builtin: bool,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

/// `POST /v1/admin/builds` (JSON, or the `config` part of a multipart body).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CreateBuildRequest {
    pub name: Option<String>,
    pub base_template: Option<String>,
    /// An OCI image reference (`registry/repository:tag` or `@sha256:…`) to start from instead
    /// of a template.
    pub base_image: Option<String>,
    /// Credentials for `base_image`'s registry (kept in memory only, never stored).
    pub registry_auth: Option<RegistryAuth>,
    #[serde(default)]
    pub recipe: Vec<String>,
    pub healthcheck: Option<String>,
    pub vcpus: Option<u32>,
    pub memory_mb: Option<u32>,
    pub disk_size_mb: Option<u32>,
    #[serde(default)]
    pub skip_pre_post: bool,
}

/// HTTP basic credentials of an OCI registry.
#[derive(Clone, Deserialize)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegistryAuth({}, <hidden>)", self.username)
    }
}

/// Longest OCI image reference.
pub const MAX_IMAGE_REFERENCE: usize = 255;

/// Largest build archive (multipart `archive` part).
pub const MAX_BUILD_ARCHIVE_BYTES: u64 = 100 * 1024 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_strings_round_trip() {
        for s in BuildStatus::ALL {
            assert_eq!(BuildStatus::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert!(BuildStatus::Cancelled.is_final() && !BuildStatus::Running.is_final());
        assert_eq!(
            serde_json::to_value(BuildPhase::PreBuild).unwrap(),
            "pre-build"
        );
    }
}
