//! Hosts: the machines that run capsules, their registration and tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a host stands (the spec's `Host.status`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HostStatus {
    /// Created; waiting for its agent to register.
    Pending,
    Online,
    Offline,
    /// Takes no new capsules; keeps its own.
    Draining,
    /// Missed three heartbeats.
    Unreachable,
}

impl HostStatus {
    pub const ALL: [HostStatus; 5] = [
        HostStatus::Pending,
        HostStatus::Online,
        HostStatus::Offline,
        HostStatus::Draining,
        HostStatus::Unreachable,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|h| h.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Pending => "pending",
            HostStatus::Online => "online",
            HostStatus::Offline => "offline",
            HostStatus::Draining => "draining",
            HostStatus::Unreachable => "unreachable",
        }
    }

    /// Whether its capsules can be reached (an online or draining host).
    pub fn serves(self) -> bool {
        matches!(self, HostStatus::Online | HostStatus::Draining)
    }
}

/// The spec's `Host` schema.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Host {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub team_id: Option<String>,
    pub provider: Option<String>,
    pub availability_zone: Option<String>,
    pub arch: Option<String>,
    pub cpu_cores: Option<i64>,
    pub memory_mb: Option<i64>,
    pub disk_gb: Option<i64>,
    pub address: Option<String>,
    pub status: HostStatus,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateHostRequest {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub team_id: Option<String>,
    #[serde(default)]
    pub provider: Option<String>,
    #[serde(default)]
    pub availability_zone: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CreateHostResponse {
    pub host: Host,
    pub registration_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterHostRequest {
    pub token: String,
    pub address: String,
    #[serde(default)]
    pub arch: Option<String>,
    #[serde(default)]
    pub cpu_cores: Option<i64>,
    #[serde(default)]
    pub memory_mb: Option<i64>,
    #[serde(default)]
    pub disk_gb: Option<i64>,
}

/// What an agent needs to serve the control plane over mutual TLS (extension): its
/// certificate and key, and the CA that signs the control plane's client certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostTls {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterHostResponse {
    pub host: Host,
    pub token: String,
    pub refresh_token: String,
    pub tls: HostTls,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshHostTokenRequest {
    pub refresh_token: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RefreshHostTokenResponse {
    pub host: Host,
    pub token: String,
    pub refresh_token: String,
    pub tls: HostTls,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostDeletePreview {
    pub host: Host,
    pub sandbox_ids: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddTagRequest {
    pub tag: String,
}

/// An agent's report of something that happened to a capsule on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SandboxEvent {
    pub event: String,
    pub sandbox_id: String,
    pub host_id: String,
    #[serde(default)]
    pub timestamp: Option<i64>,
    /// Why (extension): e.g. the VM's last console lines for `sandbox.error`.
    #[serde(default)]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_statuses_keep_their_wire_names() {
        for h in HostStatus::ALL {
            assert_eq!(HostStatus::parse(h.as_str()), Some(h));
            assert_eq!(
                serde_json::to_string(&h).unwrap(),
                format!("\"{}\"", h.as_str())
            );
        }
    }
}
