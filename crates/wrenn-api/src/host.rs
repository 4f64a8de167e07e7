//! Hosts: the machines that run capsules, their registration and tokens.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

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
    pub status: String,
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
#[derive(Debug, Clone, Serialize, Deserialize)]
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
