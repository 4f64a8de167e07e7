//! Capsule schemas: `Capsule`, `CreateCapsuleRequest`, `ExecRequest`, `ExecResponse`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Lifecycle states of a capsule (the spec's `Capsule.status` enum plus the SDK's `snapshotting`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CapsuleStatus {
    Pending,
    Starting,
    Running,
    Pausing,
    Paused,
    Resuming,
    Stopping,
    Hibernated,
    Stopped,
    Missing,
    Error,
    Snapshotting,
}

impl CapsuleStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CapsuleStatus::Pending => "pending",
            CapsuleStatus::Starting => "starting",
            CapsuleStatus::Running => "running",
            CapsuleStatus::Pausing => "pausing",
            CapsuleStatus::Paused => "paused",
            CapsuleStatus::Resuming => "resuming",
            CapsuleStatus::Stopping => "stopping",
            CapsuleStatus::Hibernated => "hibernated",
            CapsuleStatus::Stopped => "stopped",
            CapsuleStatus::Missing => "missing",
            CapsuleStatus::Error => "error",
            CapsuleStatus::Snapshotting => "snapshotting",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// States after which nothing runs and nothing can be done but reading the record.
    pub fn is_terminal(self) -> bool {
        matches!(self, CapsuleStatus::Stopped | CapsuleStatus::Error)
    }

    /// The states a capsule that may still hold (or be getting) a VM is in: what a destroy
    /// moves on from.
    pub const LIVE: [CapsuleStatus; 9] = [
        CapsuleStatus::Pending,
        CapsuleStatus::Starting,
        CapsuleStatus::Running,
        CapsuleStatus::Pausing,
        CapsuleStatus::Paused,
        CapsuleStatus::Resuming,
        CapsuleStatus::Snapshotting,
        CapsuleStatus::Missing,
        CapsuleStatus::Stopping,
    ];
}

/// The spec's `Capsule` schema.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Capsule {
    pub id: String,
    pub status: CapsuleStatus,
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub timeout_sec: u32,
    pub guest_ip: String,
    pub host_ip: String,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub last_active_at: Option<DateTime<Utc>>,
    pub last_updated: DateTime<Utc>,
    pub metadata: Option<BTreeMap<String, String>>,
    pub disk_size_mb: Option<u32>,
    /// SDK extension: current disk usage; only on single-capsule GET.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub disk_used_mb: Option<u32>,
    /// Where its guest may connect to (a Wrenn extension).
    #[serde(default)]
    pub network: crate::NetworkPolicy,
}

pub const DEFAULT_TEMPLATE: &str = "minimal";
pub const DEFAULT_VCPUS: u32 = 1;
pub const DEFAULT_MEMORY_MB: u32 = 512;
pub const DEFAULT_DISK_SIZE_MB: u32 = 5120;
pub const MAX_VCPUS: u32 = 8;
pub const MIN_MEMORY_MB: u32 = 128;
pub const MAX_MEMORY_MB: u32 = 16384;
pub const MIN_DISK_SIZE_MB: u32 = 512;
pub const MAX_DISK_SIZE_MB: u32 = 5120;
/// Positive TTLs below this are clamped up to it (the spec's startup envelope).
pub const MIN_TIMEOUT_SEC: u32 = 60;

/// The spec's `CreateCapsuleRequest`; every field optional with the spec's default.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CreateCapsuleRequest {
    pub template: Option<String>,
    pub vcpus: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_size_mb: Option<i64>,
    pub timeout_sec: Option<i64>,
    /// Who may reach the capsule's ports besides its team (a Wrenn extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy: Option<crate::ProxyAccess>,
    /// Where its guest may connect to (a Wrenn extension; default: anywhere public).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::NetworkPolicy>,
}

/// A create request with defaults applied and every bound checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapsuleSpec {
    pub template: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub disk_size_mb: u32,
    pub timeout_sec: u32,
    /// Its egress policy (absent from older agents' and control planes' messages: open).
    #[serde(default)]
    pub network: crate::NetworkPolicy,
}

impl CreateCapsuleRequest {
    /// Applies defaults and checks bounds; the error text names the offending field.
    pub fn validate(&self) -> Result<CapsuleSpec, String> {
        fn bounded(
            name: &str,
            v: Option<i64>,
            default: u32,
            min: u32,
            max: u32,
        ) -> Result<u32, String> {
            let v = v.unwrap_or(default as i64);
            if v < min as i64 || v > max as i64 {
                return Err(format!("{name} must be between {min} and {max}, got {v}"));
            }
            Ok(v as u32)
        }
        let template = self
            .template
            .clone()
            .unwrap_or_else(|| DEFAULT_TEMPLATE.to_string());
        if template.trim().is_empty() {
            return Err("template must not be empty".into());
        }
        let vcpus = bounded("vcpus", self.vcpus, DEFAULT_VCPUS, 1, MAX_VCPUS)?;
        let memory_mb = bounded(
            "memory_mb",
            self.memory_mb,
            DEFAULT_MEMORY_MB,
            MIN_MEMORY_MB,
            MAX_MEMORY_MB,
        )?;
        let disk_size_mb = bounded(
            "disk_size_mb",
            self.disk_size_mb,
            DEFAULT_DISK_SIZE_MB,
            MIN_DISK_SIZE_MB,
            MAX_DISK_SIZE_MB,
        )?;
        let timeout_sec = match self.timeout_sec.unwrap_or(0) {
            t if t < 0 => return Err(format!("timeout_sec must be >= 0, got {t}")),
            0 => 0,
            t if t > u32::MAX as i64 => return Err(format!("timeout_sec is too large: {t}")),
            t => (t as u32).max(MIN_TIMEOUT_SEC),
        };
        let network = match &self.network {
            Some(n) => n.validate().map_err(|e| format!("network.{e}"))?,
            None => crate::NetworkPolicy::default(),
        };
        Ok(CapsuleSpec {
            template,
            vcpus,
            memory_mb,
            disk_size_mb,
            timeout_sec,
            network,
        })
    }
}

pub const DEFAULT_EXEC_TIMEOUT_SEC: u32 = 30;
pub const MAX_EXEC_TIMEOUT_SEC: u32 = 24 * 3600;

/// The spec's `ExecRequest`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExecRequest {
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    pub timeout_sec: Option<i64>,
    #[serde(default)]
    pub background: bool,
    pub tag: Option<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
}

/// Output encodings of `ExecResponse`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputEncoding {
    #[serde(rename = "utf-8")]
    Utf8,
    #[serde(rename = "base64")]
    Base64,
}

/// The spec's `ExecResponse`, plus the `timed_out` and truncation extensions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecResponse {
    pub sandbox_id: String,
    pub cmd: String,
    pub stdout: String,
    pub stderr: String,
    pub exit_code: i32,
    pub duration_ms: u64,
    pub encoding: OutputEncoding,
    /// Extension: true when the command ran past `timeout_sec` and was killed.
    pub timed_out: bool,
    /// Extension: true when output passed the foreground limit (the first
    /// [`MAX_EXEC_OUTPUT_BYTES`] of each stream are kept).
    #[serde(default)]
    pub truncated: bool,
    /// Extension: bytes of stdout dropped past the limit.
    #[serde(default)]
    pub stdout_dropped_bytes: u64,
    /// Extension: bytes of stderr dropped past the limit.
    #[serde(default)]
    pub stderr_dropped_bytes: u64,
}

/// Output a foreground exec answers per stream (stdout, stderr); the rest is dropped and
/// counted in the answer.
pub const MAX_EXEC_OUTPUT_BYTES: usize = 1024 * 1024;

/// The spec's `BackgroundExecResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackgroundExecResponse {
    pub sandbox_id: String,
    pub cmd: String,
    pub pid: u32,
    pub tag: String,
}

/// The spec's `ProcessEntry`; `tag` only for processes started through the API.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessEntry {
    pub pid: u32,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub tag: Option<String>,
    pub cmd: String,
    pub args: Vec<String>,
}

/// The spec's `ProcessListResponse`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessListResponse {
    pub processes: Vec<ProcessEntry>,
}

/// Longest process tag accepted.
pub const MAX_TAG_LEN: usize = 128;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_spec() {
        let spec = CreateCapsuleRequest::default().validate().unwrap();
        assert_eq!(
            spec,
            CapsuleSpec {
                template: "minimal".into(),
                vcpus: 1,
                memory_mb: 512,
                disk_size_mb: 5120,
                timeout_sec: 0,
                network: crate::NetworkPolicy::default(),
            }
        );
    }

    #[test]
    fn bounds_are_checked() {
        let bad = |r: CreateCapsuleRequest| r.validate().unwrap_err();
        assert!(bad(CreateCapsuleRequest {
            vcpus: Some(0),
            ..Default::default()
        })
        .contains("vcpus"));
        assert!(bad(CreateCapsuleRequest {
            vcpus: Some(99),
            ..Default::default()
        })
        .contains("vcpus"));
        assert!(bad(CreateCapsuleRequest {
            memory_mb: Some(1),
            ..Default::default()
        })
        .contains("memory_mb"));
        assert!(bad(CreateCapsuleRequest {
            timeout_sec: Some(-1),
            ..Default::default()
        })
        .contains("timeout_sec"));
        assert!(bad(CreateCapsuleRequest {
            template: Some(" ".into()),
            ..Default::default()
        })
        .contains("template"));
        let clamped = CreateCapsuleRequest {
            timeout_sec: Some(5),
            ..Default::default()
        }
        .validate()
        .unwrap();
        assert_eq!(clamped.timeout_sec, 60);
    }

    #[test]
    fn status_round_trips() {
        for s in ["running", "stopped", "snapshotting", "error"] {
            assert_eq!(CapsuleStatus::parse(s).unwrap().as_str(), s);
        }
        assert!(CapsuleStatus::parse("bogus").is_none());
    }
}

/// What starts a terminal session: the `{"type":"start", …}` message of
/// `GET /v1/capsules/{id}/pty`, every field optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalStart {
    /// Default `/bin/bash`.
    pub cmd: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Run as this guest user (default root).
    pub user: Option<String>,
}
