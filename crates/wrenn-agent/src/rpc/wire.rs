//! The messages of the control plane ↔ agent service (JSON on the wire).

use serde::{Deserialize, Serialize};

pub use crate::manager::SnapshotMeta;
pub use crate::metrics::MetricPoint;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Id {
    pub id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Flag {
    pub value: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Names {
    pub names: Vec<String>,
}

/// Capsules whose VM died, with why.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadList {
    pub dead: Vec<(String, String)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Capacity {
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_free_mb: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseTemplate {
    pub name: String,
    pub size_bytes: u64,
    /// Milliseconds since the Unix epoch.
    pub built_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseTemplateList {
    pub templates: Vec<BaseTemplate>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateRequest {
    pub id: String,
    pub spec: wrenn_api::CapsuleSpec,
    /// A user snapshot (on this host) to restore instead of booting the template.
    pub from_snapshot: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotRequest {
    pub id: String,
    pub snapshot_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsRequest {
    pub id: String,
    pub range: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricList {
    pub points: Vec<MetricPoint>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Info {
    pub id: String,
    pub phase: crate::Phase,
    pub template: String,
    pub guest_ip: String,
    pub host_ip: String,
    pub metadata: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InfoList {
    pub capsules: Vec<Info>,
}

impl From<crate::CapsuleInfo> for Info {
    fn from(c: crate::CapsuleInfo) -> Self {
        Info {
            id: c.id,
            phase: c.phase,
            template: c.template,
            guest_ip: c.guest_ip,
            host_ip: c.host_ip,
            metadata: c.metadata,
        }
    }
}

impl From<Info> for crate::CapsuleInfo {
    fn from(c: Info) -> Self {
        crate::CapsuleInfo {
            id: c.id,
            phase: c.phase,
            template: c.template,
            guest_ip: c.guest_ip,
            host_ip: c.host_ip,
            metadata: c.metadata,
        }
    }
}

/// An [`crate::AgentError`] as it crosses the wire (in the status message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireError {
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub exit_code: i32,
}
