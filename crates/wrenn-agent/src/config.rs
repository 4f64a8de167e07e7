//! Host agent configuration, with defaults that need no setup on a single machine.

use std::net::Ipv4Addr;
use std::path::PathBuf;

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    /// Probe KVM with a bounded test boot; fall back to TCG when it does not answer.
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!(
                "accelerator must be auto, kvm or tcg, not {other:?}"
            )),
        }
    }
}

/// Free disk a host keeps for itself by default (MiB).
pub const DEFAULT_DISK_RESERVE_MB: u64 = 2048;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Everything the agent keeps: images, capsule state, disks, logs.
    pub data_dir: PathBuf,
    /// Image cache (kernel, initramfs, rootfs); shareable between agents on one machine.
    pub images_dir: PathBuf,
    /// The envd binary injected into every guest's initramfs.
    pub envd_path: PathBuf,
    pub accel: AccelChoice,
    /// First address of the host-side range; slot N uses the /30 at `slot_base + 4N`.
    pub slot_base: Ipv4Addr,
    /// How many slots (concurrent capsules) this host offers.
    pub max_slots: u32,
    /// Debian mirror for debootstrap and kernel downloads (`apt-get download` uses apt's own).
    pub debian_mirror: String,
    /// QEMU binary.
    pub qemu_binary: String,
    /// How long a cold boot may take before the capsule is declared failed.
    pub boot_timeout: std::time::Duration,
    /// Restore creates from template snapshots (made on first use) instead of cold-booting.
    pub template_snapshots: bool,
    /// Per-shape template snapshots unused this long are removed (`None`: kept forever).
    pub shape_snapshot_idle: Option<std::time::Duration>,
    /// Free disk (MiB) the host keeps for itself: creates and resumes that would leave less
    /// are refused (507 `insufficient_storage`).
    pub disk_reserve_mb: u64,
}

impl AgentConfig {
    pub fn new(data_dir: PathBuf, envd_path: PathBuf) -> Self {
        Self {
            images_dir: data_dir.join("images"),
            data_dir,
            envd_path,
            accel: AccelChoice::Auto,
            slot_base: Ipv4Addr::new(10, 201, 0, 0),
            max_slots: 256,
            debian_mirror: "http://deb.debian.org/debian".to_string(),
            qemu_binary: "qemu-system-x86_64".to_string(),
            boot_timeout: std::time::Duration::from_secs(25),
            template_snapshots: true,
            shape_snapshot_idle: Some(std::time::Duration::from_secs(24 * 3600)),
            disk_reserve_mb: DEFAULT_DISK_RESERVE_MB,
        }
    }

    pub fn images_dir(&self) -> PathBuf {
        self.images_dir.clone()
    }

    /// Short-path directory for unix sockets (their paths must stay under 108 bytes, which a
    /// deep data dir would break): `/run/wrenn-<hash of the data dir>`.
    pub fn run_dir(&self) -> PathBuf {
        use sha2::{Digest, Sha256};
        let h = Sha256::digest(self.data_dir.as_os_str().as_encoded_bytes());
        PathBuf::from(format!("/run/wrenn-{}", hex::encode(&h[..4])))
    }

    pub fn capsules_dir(&self) -> PathBuf {
        self.data_dir.join("capsules")
    }
}
