//! What a host reports and keeps: the messages of the host operations.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Where a capsule stands on its host.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The VM runs.
    #[default]
    Running,
    /// Being saved; the VM may still exist (frozen). Only seen on the host after a crash.
    Pausing,
    /// Only files remain: disk overlay and saved state. The slot's number stays reserved.
    Paused,
    /// Being restored from its saved state. Only seen on the host after a crash.
    Resuming,
}

/// What the control plane learns about a capsule on its host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CapsuleInfo {
    pub id: String,
    /// `Running` or `Paused` (transitions in progress are reported as where they started).
    pub phase: Phase,
    pub template: String,
    pub guest_ip: String,
    pub host_ip: String,
    /// kernel_version, vmm_version, agent_version, envd_version, accelerator.
    pub metadata: BTreeMap<String, String>,
}

/// The most one capsule can have on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostCapacity {
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_free_mb: u64,
    /// Free disk the host keeps for itself: it takes no capsule (create, resume) that would
    /// leave it less (`disk_free_mb` counts it).
    #[serde(default)]
    pub disk_reserve_mb: u64,
}

/// A base template a host can boot: its root filesystem image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseTemplate {
    pub name: String,
    pub size_bytes: u64,
    pub built_at: DateTime<Utc>,
}

/// A per-shape template snapshot on a host (made on the first create of a template in one
/// vcpus/memory/disk shape; every later one restores it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShapeSnapshot {
    pub key: String,
    /// Made from this base image (`minimal`)…
    pub image: Option<String>,
    /// …or from this built base template's snapshot.
    pub snapshot_id: Option<String>,
    /// Allocated on disk.
    pub bytes: u64,
    /// Capsules on their way or alive that sit on it.
    pub users: u32,
    pub last_used: Option<DateTime<Utc>>,
}

/// A capsule whose VM died under it, and why (already cleaned up on its host).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadCapsule {
    pub id: String,
    pub reason: String,
}

/// A user snapshot as the control plane names it on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserSnapshot {
    pub id: String,
    /// Boot its disk afresh instead of restoring its memory (a `base` template built from a
    /// capsule): the capsule gets the requested shape.
    #[serde(default)]
    pub disk_only: bool,
}

/// How to log in to an OCI registry (HTTP basic; the password is never logged).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryCredentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for RegistryCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegistryCredentials")
            .field("username", &self.username)
            .field("password", &"<hidden>")
            .finish()
    }
}

/// An OCI image made into a disk on the host, stored like a user snapshot (disk only).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportedImage {
    pub meta: SnapshotMeta,
    /// What the host did (manifest digest, layers), for the build's log.
    pub notes: Vec<String>,
}

/// What a user snapshot holds (also its `meta.json` on the host).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotMeta {
    pub id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Virtual size of the disk.
    pub disk_mb: u64,
    pub size_bytes: u64,
    /// The machine its memory was saved under (VMM, CPU, accelerator, kernel: see the agent's
    /// `machine`); it restores only under the same. `None`: disk only, or saved before this
    /// was recorded (then only its own host restores it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine: Option<String>,
}

/// One file of a snapshot as it is copied between hosts: the receiver keeps it only when it
/// has exactly this size and SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    /// `state` or `disk.qcow2`.
    pub name: String,
    pub size: u64,
    /// Lowercase hex.
    pub sha256: String,
}

/// What a snapshot is made of, as its holder describes it for a copy to another host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    /// Its `machine` says what its memory (`state`) restores under.
    pub meta: SnapshotMeta,
    pub files: Vec<FileDigest>,
}

/// The bytes of a file crossing between hosts, in chunks.
pub type ByteStream =
    futures_util::stream::BoxStream<'static, Result<bytes::Bytes, crate::HostError>>;
