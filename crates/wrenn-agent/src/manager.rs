//! [`CapsuleManager`]: the lifecycle of every capsule on this host.
//!
//! Invariants:
//! - A capsule's pieces (directory with disk overlay and logs, network slot, VMM process) exist
//!   only while its entry is in the manager; a failed create removes every piece it made.
//! - `<capsules>/<id>/state.json` is written before the VM starts and describes every piece, so
//!   after an agent restart [`CapsuleManager::start`] either re-adopts a live VM or removes what a
//!   dead one left behind. Nothing is leaked across crashes.
//! - Operations on one capsule are serialised by its entry's lock; different capsules never wait
//!   on each other. Exec holds the lock only to read where envd is.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use wrenn_api::CapsuleSpec;

use crate::config::AgentConfig;
use crate::envd_client::EnvdClient;
pub use crate::envd_client::{ExecEvent, ExecOutput, ExecStream, StartedProcess};
use crate::error::{AgentError, Result};
use crate::images::{BootImages, ImageStore};
use crate::net::{self, Slot};
use crate::vmm::qemu::QemuVmm;
use crate::vmm::{VmConfig, VmProcess, Vmm};
use tokio_util::sync::CancellationToken;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// A paused capsule's saved VM state (devices and RAM), in its directory.
const SAVED_STATE: &str = "saved.state";

/// The most one capsule can have on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostCapacity {
    pub cpus: u32,
    pub memory_mb: u64,
    pub disk_free_mb: u64,
}

/// Free space (MiB) of the filesystem holding `path`.
fn free_mb(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: `statvfs` is plain old data; all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: statvfs reads a NUL-terminated path and writes one struct we own.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return 0;
    }
    (st.f_bavail as u64).saturating_mul(st.f_frsize as u64) / (1024 * 1024)
}

/// A user snapshot as the control plane names it on this host.
#[derive(Debug, Clone)]
pub struct UserSnapshot {
    pub id: String,
}

/// What a user snapshot holds (`meta.json` beside its `state` and flattened `disk.qcow2`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotMeta {
    pub id: String,
    pub vcpus: u32,
    pub memory_mb: u32,
    /// Virtual size of the disk.
    pub disk_mb: u64,
    pub size_bytes: u64,
}

/// Snapshot ids become directory names: letters, digits and dashes only.
fn valid_snapshot_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(AgentError::InvalidRequest(format!(
            "bad snapshot id {id:?}"
        )));
    }
    Ok(())
}

/// A template snapshot: `ram` (guest memory, mapped copy-on-write by every capsule), `state`
/// (devices, without RAM), `disk.qcow2` (the disk at that instant; capsules' overlays sit on it).
/// Never changed once published; capsules' disks depend on it.
struct TemplateSnapshot {
    dir: PathBuf,
    disk_mb: u64,
}

impl TemplateSnapshot {
    fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
}

/// Where a capsule stands on its host.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// The VM runs.
    #[default]
    Running,
    /// Being saved; the VM may still exist (frozen). Only seen in `state.json` after a crash.
    Pausing,
    /// Only files remain: disk overlay and saved state. The slot's number stays reserved.
    Paused,
    /// Being restored from its saved state. Only seen in `state.json` after a crash.
    Resuming,
}

/// What the control plane learns about a capsule on this host.
#[derive(Debug, Clone, PartialEq)]
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

/// Everything persisted about one capsule (its `state.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CapsuleRecord {
    id: String,
    template: String,
    vcpus: u32,
    memory_mb: u32,
    disk_size_mb: u32,
    slot: Slot,
    vm: Option<VmProcess>,
    envd_version: Option<String>,
    kernel_version: Option<String>,
    #[serde(default)]
    phase: Phase,
    /// The disk the VM writes to, when not `disk.qcow2` (a live snapshot moves it onto a new
    /// overlay).
    #[serde(default)]
    disk: Option<PathBuf>,
    /// The user snapshot this capsule was created from (its disk sits on that snapshot's).
    #[serde(default)]
    snapshot: Option<String>,
    /// Cancelled when this VM stops: fails every open connection to its envd at once.
    #[serde(skip)]
    vm_gone: CancellationToken,
}

struct Entry {
    /// `None` until the VM is up, and again once it has been destroyed.
    state: tokio::sync::Mutex<Option<CapsuleRecord>>,
}

pub struct CapsuleManager {
    cfg: AgentConfig,
    images: ImageStore,
    boot: BootImages,
    vmm: Arc<dyn Vmm>,
    capsules: Mutex<HashMap<String, Arc<Entry>>>,
    slots: Mutex<BTreeSet<u32>>,
    metrics: Mutex<HashMap<String, Sampler>>,
}

/// One capsule's metric rings and the last CPU reading they are computed from.
#[derive(Default)]
struct Sampler {
    rings: crate::metrics::Rings,
    last_cpu: Option<(u64, Instant)>,
}

impl CapsuleManager {
    /// Builds missing images, prepares the host network, picks the accelerator and re-adopts (or
    /// cleans up after) the capsules a previous run of the agent left.
    pub async fn start(cfg: AgentConfig) -> Result<Arc<Self>> {
        std::fs::create_dir_all(cfg.capsules_dir())?;
        std::fs::create_dir_all(cfg.images_dir())?;
        std::fs::create_dir_all(cfg.run_dir())?;
        let images = ImageStore::new(cfg.images_dir(), cfg.debian_mirror.clone());
        let boot = images.ensure_all(&cfg.envd_path, &["minimal"]).await?;
        net::prepare_host(cfg.slot_base, cfg.max_slots).await?;
        let vmm = QemuVmm::new(
            &cfg.qemu_binary,
            cfg.accel,
            &boot.kernel.vmlinux,
            &boot.initramfs,
            &cfg.images_dir(),
        )
        .await?;
        let mgr = Arc::new(Self {
            cfg,
            images,
            boot,
            vmm: Arc::new(vmm),
            capsules: Mutex::new(HashMap::new()),
            slots: Mutex::new(BTreeSet::new()),
            metrics: Mutex::new(HashMap::new()),
        });
        mgr.recover().await;
        let weak = Arc::downgrade(&mgr);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::metrics::SAMPLE_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(mgr) = weak.upgrade() else { return };
                mgr.sample_metrics();
            }
        });
        Ok(mgr)
    }

    pub fn vmm_version(&self) -> &str {
        self.vmm.version()
    }

    pub fn accel(&self) -> &'static str {
        self.vmm.accel().as_str()
    }

    pub fn kernel_version(&self) -> &str {
        &self.boot.kernel.version
    }

    /// Templates this host can boot.
    pub fn templates(&self) -> Vec<String> {
        crate::images::TEMPLATES
            .iter()
            .filter(|r| self.images.rootfs_path(r.name).is_some())
            .map(|r| r.name.to_string())
            .collect()
    }

    /// Templates this host can boot: name, size of the root filesystem image, when it was built.
    pub fn base_templates(&self) -> Vec<(String, u64, std::time::SystemTime)> {
        crate::images::TEMPLATES
            .iter()
            .filter_map(|r| {
                let meta = std::fs::metadata(self.images.rootfs_path(r.name)?).ok()?;
                let built = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                Some((r.name.to_string(), meta.len(), built))
            })
            .collect()
    }

    /// What one capsule on this host can have at most: the host's CPUs, its memory less a
    /// reserve for the host itself, and the free space where capsule disks live.
    pub fn capacity(&self) -> HostCapacity {
        const HOST_RESERVE_MB: u64 = 512;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let mem_total_mb = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .map(|kib| kib / 1024)
            .unwrap_or(0);
        HostCapacity {
            cpus,
            memory_mb: mem_total_mb.saturating_sub(HOST_RESERVE_MB),
            disk_free_mb: free_mb(&self.cfg.capsules_dir()),
        }
    }

    pub fn has_template(&self, name: &str) -> bool {
        self.images.rootfs_path(name).is_some()
    }

    /// Boots a capsule and returns once envd answers. On any failure nothing is left behind.
    pub async fn create(
        &self,
        id: &str,
        spec: &CapsuleSpec,
        from: Option<&UserSnapshot>,
    ) -> Result<CapsuleInfo> {
        let rootfs = match from {
            Some(_) => PathBuf::new(),
            None => self.images.rootfs_path(&spec.template).ok_or_else(|| {
                AgentError::InvalidRequest(format!(
                    "template {:?} is not available on this host",
                    spec.template
                ))
            })?,
        };
        let from_meta = match from {
            Some(s) => Some(self.snapshot_meta(&s.id)?),
            None => None,
        };
        let entry = Arc::new(Entry {
            state: tokio::sync::Mutex::new(None),
        });
        // Held for the whole boot so a concurrent destroy waits for a definite outcome.
        let mut state = entry.state.lock().await;
        {
            let mut map = lock(&self.capsules);
            if map.contains_key(id) {
                return Err(AgentError::InvalidState(format!(
                    "capsule {id} already exists"
                )));
            }
            map.insert(id.to_string(), entry.clone());
        }
        let slot = match self.allocate_slot() {
            Some(s) => s,
            None => {
                lock(&self.capsules).remove(id);
                return Err(AgentError::InvalidState(
                    "no free network slot on this host".into(),
                ));
            }
        };
        let mut record = CapsuleRecord {
            id: id.to_string(),
            template: spec.template.clone(),
            vcpus: spec.vcpus,
            memory_mb: spec.memory_mb,
            disk_size_mb: spec.disk_size_mb,
            slot,
            vm: None,
            envd_version: None,
            kernel_version: None,
            phase: Phase::Running,
            vm_gone: CancellationToken::new(),
            disk: None,
            snapshot: from.map(|s| s.id.clone()),
        };
        let started = Instant::now();
        if let Some(meta) = &from_meta {
            // The snapshot's machine is restored as it was.
            record.vcpus = meta.vcpus;
            record.memory_mb = meta.memory_mb;
        }
        let booted = match &from_meta {
            Some(meta) => self.restore_from_user_snapshot(&mut record, meta).await,
            None => self.boot_vm(&mut record, &rootfs).await,
        };
        match booted {
            Ok(()) => {
                info!(
                    capsule_id = id,
                    ms = started.elapsed().as_millis() as u64,
                    "capsule running"
                );
                let info = self.info(&record);
                *state = Some(record);
                Ok(info)
            }
            Err(e) => {
                warn!(capsule_id = id, error = %e, "create failed; cleaning up");
                self.teardown(&record).await;
                lock(&self.capsules).remove(id);
                Err(e)
            }
        }
    }

    /// The VM a capsule runs in; the same for its first boot and every restore.
    fn vm_config(&self, record: &CapsuleRecord) -> VmConfig {
        let dir = self.capsule_dir(&record.id);
        VmConfig {
            id: record.id.clone(),
            disk: record
                .disk
                .clone()
                .unwrap_or_else(|| dir.join("disk.qcow2")),
            dir,
            netns: record.slot.netns.clone(),
            vcpus: record.vcpus,
            memory_mb: record.memory_mb,
            kernel: self.boot.kernel.vmlinux.clone(),
            initramfs: self.boot.initramfs.clone(),
            qmp_socket: self.cfg.run_dir().join(format!("{}.qmp", record.id)),
            lifeline_socket: self.cfg.run_dir().join(format!("{}.life", record.id)),
            guest_env: vec![
                ("WRENN_IP".into(), format!("{}/24", net::GUEST_IP)),
                ("WRENN_GW".into(), net::GATEWAY_IP.to_string()),
                ("WRENN_GWMAC".into(), net::GATEWAY_MAC.into()),
            ],
            memory: crate::vmm::Memory::Anonymous,
        }
    }

    /// Starts the capsule's VM: restored from the template's snapshot (made on first use), or
    /// cold-booted when no snapshot can be made. A restore that fails fails the create (the
    /// caller removes every piece): falling back would hide a VMM dying under the capsule.
    async fn boot_vm(&self, record: &mut CapsuleRecord, rootfs: &std::path::Path) -> Result<()> {
        std::fs::create_dir_all(self.capsule_dir(&record.id))?;
        self.persist(record)?;
        if !self.cfg.template_snapshots {
            return self.cold_boot(record, rootfs).await;
        }
        match self.template_snapshot(record, rootfs).await {
            Ok(snap) => self.restore_from_template(record, &snap).await,
            Err(e) => {
                warn!(capsule_id = %record.id, error = %e, "no template snapshot; cold-booting");
                self.cold_boot(record, rootfs).await
            }
        }
    }

    async fn restore_from_user_snapshot(
        &self,
        record: &mut CapsuleRecord,
        meta: &SnapshotMeta,
    ) -> Result<()> {
        std::fs::create_dir_all(self.capsule_dir(&record.id))?;
        self.persist(record)?;
        let dir = self.snapshot_dir(&meta.id);
        let cfg = self.vm_config(record);
        crate::disk::create_overlay_on_snapshot(&dir.join("disk.qcow2"), &cfg.disk, meta.disk_mb)
            .await?;
        net::create(&record.slot).await?;
        let vm = self.vmm.restore(&cfg, &dir.join("state"), false).await?;
        self.adopt_restored(record, vm).await
    }

    fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(id)
    }

    fn snapshot_meta(&self, id: &str) -> Result<SnapshotMeta> {
        valid_snapshot_id(id)?;
        let bytes = std::fs::read(self.snapshot_dir(id).join("meta.json")).map_err(|e| {
            AgentError::NotFound(format!("snapshot {id} is not on this host ({e})"))
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::Vmm(format!("snapshot {id}: unreadable metadata: {e}")))
    }

    /// A live snapshot of a running capsule: the guest freezes for as long as saving its
    /// memory takes (its disk moves onto a new overlay meanwhile) and runs on; then the frozen
    /// disk layers are flattened into the snapshot, which depends on nothing afterwards.
    pub async fn snapshot(&self, id: &str, snapshot_id: &str) -> Result<SnapshotMeta> {
        valid_snapshot_id(snapshot_id)?;
        let final_dir = self.snapshot_dir(snapshot_id);
        if final_dir.exists() {
            return Err(AgentError::AlreadyExists(format!(
                "snapshot {snapshot_id} exists"
            )));
        }
        let tmp = final_dir.with_extension("tmp");
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        std::fs::create_dir_all(&tmp)?;
        let started = Instant::now();
        let frozen = {
            let entry = self.entry(id)?;
            let mut state = entry.state.lock().await;
            let record = state
                .as_mut()
                .filter(|r| r.phase == Phase::Running)
                .ok_or_else(|| AgentError::InvalidState(format!("capsule {id} is not running")))?;
            let vm = record
                .vm
                .clone()
                .ok_or_else(|| AgentError::InvalidState(format!("capsule {id} has no VM")))?;
            let frozen = self.vm_config(record).disk;
            let next = self
                .capsule_dir(id)
                .join(format!("disk-{:08x}.qcow2", rand::random::<u32>()));
            let result = self.vmm.snapshot(&vm, &next, &tmp.join("state")).await;
            if next.exists() {
                record.disk = Some(next);
                self.persist(record)?;
            }
            if let Err(e) = result {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(e);
            }
            let meta = SnapshotMeta {
                id: snapshot_id.to_string(),
                vcpus: record.vcpus,
                memory_mb: record.memory_mb,
                disk_mb: 0,
                size_bytes: 0,
            };
            (frozen, meta)
        };
        let frozen_ms = started.elapsed().as_millis() as u64;
        let (frozen_disk, mut meta) = frozen;
        // The frozen layers never change again while the capsule lives; if it is destroyed
        // meanwhile the copy fails and so does the snapshot.
        let flattened = async {
            crate::disk::flatten(&frozen_disk, &tmp.join("disk.qcow2")).await?;
            meta.disk_mb = crate::disk::virtual_size_mb(&tmp.join("disk.qcow2")).await?;
            meta.size_bytes = ["state", "disk.qcow2"]
                .iter()
                .map(|f| std::fs::metadata(tmp.join(f)).map(|m| m.len()).unwrap_or(0))
                .sum();
            let json = serde_json::to_vec_pretty(&meta).map_err(|e| AgentError::Io(e.into()))?;
            std::fs::write(tmp.join("meta.json"), json)?;
            std::fs::rename(&tmp, &final_dir)?;
            Ok::<_, AgentError>(())
        }
        .await;
        if let Err(e) = flattened {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(e);
        }
        info!(
            capsule_id = id,
            snapshot_id,
            frozen_ms,
            ms = started.elapsed().as_millis() as u64,
            size_bytes = meta.size_bytes,
            "snapshot taken"
        );
        Ok(meta)
    }

    /// Deletes a user snapshot's files, or, while capsules created from it still exist, marks
    /// it so that the last of them removes the files when it goes.
    pub async fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        valid_snapshot_id(snapshot_id)?;
        let dir = self.snapshot_dir(snapshot_id);
        if !dir.exists() {
            return Ok(());
        }
        std::fs::write(dir.join("deleted"), b"")?;
        self.collect_snapshot(snapshot_id).await;
        Ok(())
    }

    /// Removes a deleted snapshot's files once no capsule on this host uses them.
    async fn collect_snapshot(&self, snapshot_id: &str) {
        let dir = self.snapshot_dir(snapshot_id);
        if !dir.join("deleted").exists() {
            return;
        }
        let entries: Vec<_> = lock(&self.capsules).values().cloned().collect();
        for e in entries {
            // A capsule being created or changed right now: decide next time.
            let Ok(state) = e.state.try_lock() else {
                return;
            };
            if state.as_ref().and_then(|r| r.snapshot.as_deref()) == Some(snapshot_id) {
                return;
            }
        }
        let _ = tokio::fs::remove_dir_all(&dir).await;
    }

    async fn restore_from_template(
        &self,
        record: &mut CapsuleRecord,
        snap: &TemplateSnapshot,
    ) -> Result<()> {
        let mut cfg = self.vm_config(record);
        cfg.memory = crate::vmm::Memory::PrivateFile(snap.ram());
        crate::disk::create_overlay_on_snapshot(&snap.disk(), &cfg.disk, snap.disk_mb).await?;
        net::create(&record.slot).await?;
        let vm = self.vmm.restore(&cfg, &snap.state(), true).await?;
        self.adopt_restored(record, vm).await
    }

    /// Records a VM just restored for a new capsule, waits for its envd and tells it it was
    /// restored (clock, entropy).
    async fn adopt_restored(&self, record: &mut CapsuleRecord, vm: VmProcess) -> Result<()> {
        record.vm = Some(vm.clone());
        self.persist(record)?;
        let deadline = Instant::now() + self.cfg.boot_timeout;
        let health = self.wait_for_envd(record, &vm, deadline).await?;
        self.envd(record).restored().await?;
        record.envd_version = Some(health.envd_version);
        record.kernel_version = Some(health.kernel_version);
        self.persist(record)?;
        Ok(())
    }

    /// The snapshot every capsule of this template and shape is restored from: made once, by
    /// cold-booting the template with its RAM in a file, waiting for envd, and saving the
    /// device state without the RAM (which stays in the file). Shared by agents using the same
    /// images directory (built under a lock, published by a rename).
    async fn template_snapshot(
        &self,
        record: &CapsuleRecord,
        rootfs: &std::path::Path,
    ) -> Result<TemplateSnapshot> {
        let base_mb = std::fs::metadata(rootfs)?.len().div_ceil(1024 * 1024);
        let disk_mb = base_mb.max(u64::from(record.disk_size_mb));
        let key = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            for part in [
                rootfs.to_string_lossy().as_ref(),
                self.boot.initramfs.to_string_lossy().as_ref(),
                &self.boot.kernel.version,
                self.vmm.version(),
                self.vmm.accel().as_str(),
                &format!("{}/{}/{}", record.vcpus, record.memory_mb, disk_mb),
            ] {
                h.update(part.as_bytes());
                h.update([0]);
            }
            hex::encode(&h.finalize()[..8])
        };
        let root = self.cfg.images_dir().join("snapshots");
        let snap = TemplateSnapshot {
            dir: root.join(&key),
            disk_mb,
        };
        if snap.state().exists() {
            return Ok(snap);
        }
        std::fs::create_dir_all(&root)?;
        let _lock = crate::images::DirLock::acquire(root.join(format!("{key}.lock"))).await?;
        if snap.state().exists() {
            return Ok(snap);
        }
        let slot = self
            .allocate_slot()
            .ok_or_else(|| AgentError::InvalidState("no free network slot on this host".into()))?;
        let tmp = root.join(format!("{key}.tmp"));
        let started = Instant::now();
        let result = self
            .build_template_snapshot(record, rootfs, &slot, &tmp, disk_mb)
            .await;
        net::destroy(&slot).await;
        lock(&self.slots).remove(&slot.index);
        match result {
            Ok(()) => {
                std::fs::rename(&tmp, &snap.dir)?;
                info!(template = %record.template, key, ms = started.elapsed().as_millis() as u64, "template snapshot ready");
                Ok(snap)
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                Err(e)
            }
        }
    }

    async fn build_template_snapshot(
        &self,
        record: &CapsuleRecord,
        rootfs: &std::path::Path,
        slot: &Slot,
        tmp: &std::path::Path,
        disk_mb: u64,
    ) -> Result<()> {
        let _ = tokio::fs::remove_dir_all(tmp).await;
        std::fs::create_dir_all(tmp)?;
        let name = format!(
            "tpl-{}",
            tmp.file_stem()
                .map(|s| s.to_string_lossy())
                .unwrap_or_default()
        );
        let mut cfg = self.vm_config(record);
        cfg.id = name.clone();
        cfg.dir = tmp.to_path_buf();
        cfg.disk = tmp.join("disk.qcow2");
        cfg.netns = slot.netns.clone();
        cfg.qmp_socket = self.cfg.run_dir().join(format!("{name}.qmp"));
        cfg.lifeline_socket = self.cfg.run_dir().join(format!("{name}.life"));
        cfg.memory = crate::vmm::Memory::SharedFile(tmp.join("ram"));
        crate::disk::create_overlay(rootfs, &cfg.disk, disk_mb as u32).await?;
        net::create(slot).await?;
        let vm = self.vmm.boot(&cfg).await?;
        let result = async {
            let client =
                EnvdClient::new(SocketAddr::new(slot.reach_ip.into(), envd_proto::ENVD_PORT));
            let deadline = Instant::now() + self.cfg.boot_timeout;
            loop {
                match tokio::time::timeout(Duration::from_secs(2), client.health()).await {
                    Ok(Ok(_)) => break,
                    _ if Instant::now() > deadline || !self.vmm.is_alive(&vm) => {
                        return Err(AgentError::Envd(format!(
                            "template VM: envd did not answer; console: {}",
                            tail(&vm.console_log)
                        )))
                    }
                    _ => tokio::time::sleep(Duration::from_millis(25)).await,
                }
            }
            // Let boot-time work (growing the filesystem) finish in the template, not in every
            // capsule restored from it.
            let settle = envd_proto::ExecSpec {
                command: envd_proto::CommandSpec {
                    cmd: "while pgrep -x resize2fs >/dev/null; do sleep 0.05; done; sync".into(),
                    ..Default::default()
                },
                timeout_ms: 60_000,
            };
            client.exec(settle).await?;
            self.vmm.save(&vm, &tmp.join("state"), true).await
        }
        .await;
        let _ = self.vmm.shutdown(&vm).await;
        let _ = std::fs::remove_file(&cfg.qmp_socket);
        let _ = std::fs::remove_file(&cfg.lifeline_socket);
        result
    }

    async fn cold_boot(&self, record: &mut CapsuleRecord, rootfs: &std::path::Path) -> Result<()> {
        let cfg = self.vm_config(record);
        crate::disk::create_overlay(rootfs, &cfg.disk, record.disk_size_mb).await?;
        net::create(&record.slot).await?;
        let vm = self.vmm.boot(&cfg).await?;
        record.vm = Some(vm.clone());
        self.persist(record)?;
        let deadline = Instant::now() + self.cfg.boot_timeout;
        let health = match self.wait_for_envd(record, &vm, deadline).await {
            Err(AgentError::Envd(msg)) => {
                let state = crate::vmm::qemu::diagnose(&vm.qmp_socket).await;
                return Err(AgentError::Envd(format!("{msg}; vm: {state}")));
            }
            other => other?,
        };
        record.envd_version = Some(health.envd_version);
        record.kernel_version = Some(health.kernel_version);
        self.persist(record)?;
        Ok(())
    }

    async fn wait_for_envd(
        &self,
        record: &CapsuleRecord,
        vm: &VmProcess,
        deadline: Instant,
    ) -> Result<crate::envd_client::EnvdHealth> {
        // Without the lifeline: a guest still booting is not a broken network to repair.
        let client = self.envd(record).with_lifeline(None);
        let started = Instant::now();
        let mut last_err = String::new();
        while Instant::now() < deadline {
            if !self.vmm.is_alive(vm) {
                let qemu_log = vm.console_log.with_file_name("qemu.log");
                return Err(AgentError::Vmm(format!(
                    "VM exited during boot; qemu: {}; console: {}",
                    tail(&qemu_log),
                    tail(&vm.console_log)
                )));
            }
            match tokio::time::timeout(Duration::from_secs(2), client.health()).await {
                Ok(Ok(h)) => return Ok(h),
                Ok(Err(e)) => last_err = e.to_string(),
                Err(_) => last_err = "health check timed out".into(),
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Err(AgentError::Envd(format!(
            "envd did not answer within {:?} ({last_err}); console: {}",
            started.elapsed(),
            tail(&vm.console_log)
        )))
    }

    /// Destroys a capsule and everything it holds. Returns false when it did not exist.
    pub async fn destroy(&self, id: &str) -> Result<bool> {
        let Some(entry) = lock(&self.capsules).get(id).cloned() else {
            return Ok(false);
        };
        let mut state = entry.state.lock().await;
        let Some(record) = state.take() else {
            return Ok(false);
        };
        self.teardown(&record).await;
        lock(&self.capsules).remove(id);
        lock(&self.metrics).remove(id);
        drop(state);
        if let Some(snap) = &record.snapshot {
            self.collect_snapshot(snap).await;
        }
        info!(capsule_id = id, "capsule destroyed");
        Ok(true)
    }

    /// Saves a running capsule (processes, memory, open files, disk) to files in its directory,
    /// then stops its VM and removes its network slot; the slot's number (so its host-reachable
    /// address) stays reserved for the resume. On failure the capsule runs on, or, when even
    /// resuming its frozen VM fails, it is destroyed and the error says so.
    pub async fn pause(&self, id: &str) -> Result<()> {
        let entry = self.entry(id)?;
        let mut state = entry.state.lock().await;
        let record = state
            .as_mut()
            .filter(|r| r.phase == Phase::Running)
            .ok_or_else(|| AgentError::InvalidState(format!("capsule {id} is not running")))?;
        let vm = record
            .vm
            .clone()
            .ok_or_else(|| AgentError::InvalidState(format!("capsule {id} has no VM")))?;
        let started = Instant::now();
        record.phase = Phase::Pausing;
        self.persist(record)?;
        let saved = self.capsule_dir(id).join(SAVED_STATE);
        if let Err(e) = self.vmm.save(&vm, &saved, false).await {
            let _ = std::fs::remove_file(&saved);
            match self.vmm.thaw(&vm).await {
                Ok(()) => {
                    warn!(capsule_id = id, error = %e, "pause failed; the capsule runs on");
                    record.phase = Phase::Running;
                    self.persist(record)?;
                    return Err(e);
                }
                Err(thaw) => {
                    warn!(capsule_id = id, error = %e, thaw = %thaw, "pause failed and the VM cannot run on; destroying it");
                    if let Some(r) = state.take() {
                        self.teardown(&r).await;
                    }
                    lock(&self.capsules).remove(id);
                    return Err(AgentError::Vmm(format!(
                        "pause failed ({e}) and the frozen VM could not be resumed ({thaw}); the capsule was destroyed"
                    )));
                }
            }
        }
        let saved_ms = started.elapsed().as_millis() as u64;
        record.vm_gone.cancel();
        record.vm_gone = CancellationToken::new();
        if let Err(e) = self.vmm.shutdown(&vm).await {
            warn!(capsule_id = id, error = %e, "stopping the saved VM failed");
        }
        net::destroy(&record.slot).await;
        record.vm = None;
        record.phase = Phase::Paused;
        self.persist(record)?;
        self.save_metrics(id);
        info!(
            capsule_id = id,
            saved_ms,
            ms = started.elapsed().as_millis() as u64,
            state_bytes = std::fs::metadata(&saved).map(|m| m.len()).unwrap_or(0),
            "capsule paused"
        );
        Ok(())
    }

    /// Restores a paused capsule into the same network slot and returns once envd answers
    /// (its clock set, its entropy reseeded). On failure it stays paused, files intact.
    pub async fn resume(&self, id: &str) -> Result<CapsuleInfo> {
        let entry = self.entry(id)?;
        let mut state = entry.state.lock().await;
        let record = state
            .as_mut()
            .filter(|r| r.phase == Phase::Paused)
            .ok_or_else(|| AgentError::InvalidState(format!("capsule {id} is not paused")))?;
        let started = Instant::now();
        let saved = self.capsule_dir(id).join(SAVED_STATE);
        if !saved.exists() {
            return Err(AgentError::Vmm(format!(
                "capsule {id} has no saved state to resume from"
            )));
        }
        record.phase = Phase::Resuming;
        self.persist(record)?;
        match self.restore_vm(record, &saved).await {
            Ok(()) => {
                record.phase = Phase::Running;
                self.persist(record)?;
                let _ = std::fs::remove_file(&saved);
                info!(
                    capsule_id = id,
                    ms = started.elapsed().as_millis() as u64,
                    "capsule resumed"
                );
                Ok(self.info(record))
            }
            Err(e) => {
                warn!(capsule_id = id, error = %e, "resume failed; the capsule stays paused");
                record.vm_gone.cancel();
                record.vm_gone = CancellationToken::new();
                if let Some(vm) = record.vm.take() {
                    let _ = self.vmm.stop(&vm).await;
                }
                net::destroy(&record.slot).await;
                record.phase = Phase::Paused;
                self.persist(record)?;
                Err(e)
            }
        }
    }

    async fn restore_vm(&self, record: &mut CapsuleRecord, saved: &std::path::Path) -> Result<()> {
        net::create(&record.slot).await?;
        let cfg = self.vm_config(record);
        let vm = self.vmm.restore(&cfg, saved, false).await?;
        record.vm = Some(vm.clone());
        self.persist(record)?;
        let deadline = Instant::now() + self.cfg.boot_timeout;
        self.wait_for_envd(record, &vm, deadline).await?;
        self.envd(record).restored().await
    }

    /// Finds running capsules whose VM died under them (killed, crashed, out of memory),
    /// removes what is left of each, and reports them with the reason.
    pub async fn reap_dead_vms(&self) -> Vec<(String, String)> {
        let entries: Vec<(String, Arc<Entry>)> = lock(&self.capsules)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut dead = Vec::new();
        for (id, entry) in entries {
            // A capsule mid-operation is that operation's to judge.
            let Ok(mut state) = entry.state.try_lock() else {
                continue;
            };
            let gone = state.as_ref().is_some_and(|r| {
                r.phase == Phase::Running && r.vm.as_ref().is_some_and(|vm| !self.vmm.is_alive(vm))
            });
            if !gone {
                continue;
            }
            let Some(record) = state.take() else { continue };
            let vm = record.vm.as_ref();
            let console = vm.map(|v| tail(&v.console_log)).unwrap_or_default();
            let qemu = vm
                .map(|v| tail(&v.console_log.with_file_name("qemu.log")))
                .unwrap_or_default();
            let reason = format!(
                "the VM exited unexpectedly (qemu: {}; console: {})",
                if qemu.is_empty() { "no message" } else { &qemu },
                if console.is_empty() {
                    "empty"
                } else {
                    &console
                }
            );
            warn!(capsule_id = %id, %reason, "VM died");
            self.teardown(&record).await;
            lock(&self.capsules).remove(&id);
            lock(&self.metrics).remove(&id);
            drop(state);
            if let Some(snap) = &record.snapshot {
                self.collect_snapshot(snap).await;
            }
            dead.push((id, reason));
        }
        dead
    }

    /// Takes one metrics sample of every running capsule (skipping any that is mid-operation).
    fn sample_metrics(&self) {
        let entries: Vec<(String, Arc<Entry>)> = lock(&self.capsules)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = Instant::now();
        let unix = chrono::Utc::now().timestamp();
        let ticks_per_sec = crate::metrics::clock_ticks();
        for (id, entry) in entries {
            let Ok(state) = entry.state.try_lock() else {
                continue;
            };
            let Some(r) = state.as_ref().filter(|r| r.phase == Phase::Running) else {
                continue;
            };
            let Some(vm) = &r.vm else { continue };
            let Some((ticks, rss)) = crate::metrics::process_usage(vm.pid) else {
                continue;
            };
            let disk = crate::metrics::allocated_disk_bytes(&self.capsule_dir(&id));
            let vcpus = f64::from(r.vcpus.max(1));
            drop(state);
            let mut all = lock(&self.metrics);
            let s = all.entry(id).or_default();
            let cpu_pct = match s.last_cpu {
                Some((t0, at)) if ticks >= t0 => {
                    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                    ((ticks - t0) as f64 / ticks_per_sec / secs / vcpus * 100.0).clamp(0.0, 100.0)
                }
                _ => 0.0,
            };
            s.last_cpu = Some((ticks, now));
            s.rings.push(crate::metrics::MetricPoint {
                timestamp_unix: unix,
                cpu_pct,
                mem_bytes: rss,
                disk_bytes: disk,
            });
        }
    }

    /// Metric points of a capsule on this host (running, or paused: the points kept at pause).
    pub fn metrics(&self, id: &str, range: &str) -> Result<Vec<crate::metrics::MetricPoint>> {
        let (tier, window) = crate::metrics::Tier::for_range(range)
            .ok_or_else(|| AgentError::InvalidRequest(format!("unknown range {range:?}")))?;
        if !lock(&self.capsules).contains_key(id) {
            return Err(AgentError::NotFound(format!(
                "capsule {id} not found on this host"
            )));
        }
        let now = chrono::Utc::now().timestamp();
        Ok(lock(&self.metrics)
            .get(id)
            .map(|s| s.rings.query(tier, window, now))
            .unwrap_or_default())
    }

    /// Saves a capsule's rings beside it (at pause), so they survive an agent restart.
    fn save_metrics(&self, id: &str) {
        let rings = lock(&self.metrics).get(id).map(|s| s.rings.clone());
        if let Some(rings) = rings {
            if let Err(e) = rings.save(&self.capsule_dir(id).join("metrics.json")) {
                warn!(capsule_id = id, error = %e, "cannot save metrics");
            }
        }
        // The next CPU reading comes from a new VMM process.
        if let Some(s) = lock(&self.metrics).get_mut(id) {
            s.last_cpu = None;
        }
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>> {
        lock(&self.capsules)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("capsule {id} not found on this host")))
    }

    /// Runs a foreground command in a running capsule.
    pub async fn exec(&self, id: &str, spec: envd_proto::ExecSpec) -> Result<ExecOutput> {
        self.envd_of(id).await?.exec(spec).await
    }

    /// Starts a command in a running capsule and streams its output.
    pub async fn exec_stream(&self, id: &str, spec: envd_proto::ExecSpec) -> Result<ExecStream> {
        self.envd_of(id).await?.exec_stream(spec).await
    }

    /// Starts a background process in a running capsule.
    pub async fn start_process(
        &self,
        id: &str,
        spec: envd_proto::StartSpec,
    ) -> Result<StartedProcess> {
        self.envd_of(id).await?.start(spec).await
    }

    /// Every user process in a running capsule.
    pub async fn list_processes(&self, id: &str) -> Result<Vec<envd_proto::ProcessInfo>> {
        self.envd_of(id).await?.list_processes().await
    }

    /// Signals a process of a running capsule, chosen by pid or tag.
    pub async fn signal_process(
        &self,
        id: &str,
        selector: &str,
        signal: envd_proto::Signal,
    ) -> Result<()> {
        self.envd_of(id).await?.signal(selector, signal).await
    }

    /// The guest agent of a running capsule, for file operations (`list_dir`, `read_file`, ...).
    pub async fn envd_client(&self, id: &str) -> Result<EnvdClient> {
        self.envd_of(id).await
    }

    /// The envd of a running capsule; the capsule's lock is held only while looking it up.
    async fn envd_of(&self, id: &str) -> Result<EnvdClient> {
        let entry = lock(&self.capsules)
            .get(id)
            .cloned()
            .ok_or_else(|| AgentError::NotFound(format!("capsule {id} not found on this host")))?;
        let state = entry.state.lock().await;
        let record = state
            .as_ref()
            .filter(|r| r.phase == Phase::Running)
            .ok_or_else(|| AgentError::InvalidState(format!("capsule {id} is not running")))?;
        Ok(self.envd(record))
    }

    /// Every capsule that is running on this host.
    pub async fn list(&self) -> Vec<CapsuleInfo> {
        let entries: Vec<_> = lock(&self.capsules).values().cloned().collect();
        let mut out = Vec::new();
        for e in entries {
            if let Ok(state) = e.state.try_lock() {
                if let Some(r) = state.as_ref() {
                    out.push(self.info(r));
                }
            }
        }
        out
    }

    /// Destroys every capsule (used by tests and by an operator's clean shutdown).
    pub async fn destroy_all(&self) {
        let ids: Vec<String> = lock(&self.capsules).keys().cloned().collect();
        for id in ids {
            if let Err(e) = self.destroy(&id).await {
                warn!(capsule_id = %id, error = %e, "destroy failed");
            }
        }
    }

    fn info(&self, r: &CapsuleRecord) -> CapsuleInfo {
        let mut metadata = BTreeMap::new();
        let unknown = || "unknown".to_string();
        metadata.insert(
            "kernel_version".into(),
            r.kernel_version.clone().unwrap_or_else(unknown),
        );
        metadata.insert(
            "envd_version".into(),
            r.envd_version.clone().unwrap_or_else(unknown),
        );
        metadata.insert("vmm_version".into(), self.vmm.version().to_string());
        metadata.insert("agent_version".into(), AGENT_VERSION.to_string());
        metadata.insert("accelerator".into(), self.vmm.accel().as_str().to_string());
        CapsuleInfo {
            id: r.id.clone(),
            phase: match r.phase {
                Phase::Running | Phase::Pausing => Phase::Running,
                Phase::Paused | Phase::Resuming => Phase::Paused,
            },
            template: r.template.clone(),
            guest_ip: net::GUEST_IP.to_string(),
            host_ip: r.slot.reach_ip.to_string(),
            metadata,
        }
    }

    fn envd(&self, r: &CapsuleRecord) -> EnvdClient {
        EnvdClient::new(SocketAddr::new(
            r.slot.reach_ip.into(),
            envd_proto::ENVD_PORT,
        ))
        .with_lifeline(r.vm.as_ref().and_then(|vm| vm.lifeline_socket.as_deref()))
        .with_cancellation(r.vm_gone.clone())
    }

    /// Removes every piece of a capsule. Best effort on each piece; never fails half-way.
    async fn teardown(&self, r: &CapsuleRecord) {
        r.vm_gone.cancel();
        if let Some(vm) = &r.vm {
            if let Err(e) = self.vmm.stop(vm).await {
                warn!(capsule_id = %r.id, error = %e, "stopping the VM failed");
            }
        }
        net::destroy(&r.slot).await;
        let _ = tokio::fs::remove_dir_all(self.capsule_dir(&r.id)).await;
        let _ = tokio::fs::remove_file(self.cfg.run_dir().join(format!("{}.qmp", r.id))).await;
        let _ = tokio::fs::remove_file(self.cfg.run_dir().join(format!("{}.life", r.id))).await;
        lock(&self.slots).remove(&r.slot.index);
    }

    fn allocate_slot(&self) -> Option<Slot> {
        let mut used = lock(&self.slots);
        let index = (0..self.cfg.max_slots).find(|i| !used.contains(i))?;
        used.insert(index);
        Some(Slot::new(self.cfg.slot_base, index))
    }

    fn capsule_dir(&self, id: &str) -> PathBuf {
        self.cfg.capsules_dir().join(id)
    }

    fn persist(&self, r: &CapsuleRecord) -> Result<()> {
        let dir = self.capsule_dir(&r.id);
        let tmp = dir.join("state.json.tmp");
        let json = serde_json::to_vec_pretty(r).map_err(|e| AgentError::Io(e.into()))?;
        std::fs::write(&tmp, json)?;
        std::fs::rename(tmp, dir.join("state.json"))?;
        Ok(())
    }

    /// Removes what interrupted snapshot builds left: half-written user snapshots, and
    /// template snapshot builds nobody holds the lock of any more (with their VM).
    async fn remove_interrupted_snapshots(&self) {
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("snapshots")) {
            for p in rd.flatten().map(|e| e.path()) {
                if p.extension().is_some_and(|x| x == "tmp") {
                    warn!(dir = %p.display(), "removing an interrupted snapshot");
                    let _ = tokio::fs::remove_dir_all(&p).await;
                }
            }
        }
        let root = self.cfg.images_dir().join("snapshots");
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        for p in rd.flatten().map(|e| e.path()) {
            if p.extension().is_none_or(|x| x != "tmp") {
                continue;
            }
            let Some(key) = p.file_stem().map(|s| s.to_string_lossy().to_string()) else {
                continue;
            };
            let Some(_lock) =
                crate::images::DirLock::try_acquire(&root.join(format!("{key}.lock")))
            else {
                continue; // another agent is building it right now
            };
            for pid in crate::vmm::qemu::find_by_name(&format!("tpl-{key}")) {
                // SAFETY: kill(2) on a QEMU whose command line names this abandoned build.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
            }
            warn!(dir = %p.display(), "removing an interrupted template snapshot build");
            let _ = tokio::fs::remove_dir_all(&p).await;
        }
    }

    /// Re-adopts live VMs from a previous agent run and removes whatever dead ones left.
    async fn recover(&self) {
        self.remove_interrupted_snapshots().await;
        let Ok(rd) = std::fs::read_dir(self.cfg.capsules_dir()) else {
            return;
        };
        for dir in rd.flatten().map(|e| e.path()) {
            let record: Option<CapsuleRecord> = std::fs::read(dir.join("state.json"))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(record) = record else {
                warn!(dir = %dir.display(), "capsule directory without state; removing");
                let _ = tokio::fs::remove_dir_all(&dir).await;
                continue;
            };
            lock(&self.slots).insert(record.slot.index);
            match self.recover_one(record.clone(), &dir).await {
                Some(r) => {
                    info!(capsule_id = %r.id, phase = ?r.phase, "re-adopted capsule");
                    if let Some(rings) =
                        crate::metrics::Rings::load(&self.capsule_dir(&r.id).join("metrics.json"))
                    {
                        lock(&self.metrics).insert(
                            r.id.clone(),
                            Sampler {
                                rings,
                                last_cpu: None,
                            },
                        );
                    }
                    let entry = Arc::new(Entry {
                        state: tokio::sync::Mutex::new(Some(r.clone())),
                    });
                    lock(&self.capsules).insert(r.id.clone(), entry);
                }
                None => {
                    warn!(capsule_id = %record.id, phase = ?record.phase, "capsule did not survive; cleaning up");
                    self.teardown(&record).await;
                }
            }
        }
        // VMs no record accounts for: started by a create or resume the crash cut short before
        // it could record them. Each holds its capsule's disk; none may outlive this moment.
        let adopted: HashMap<String, u32> = {
            let entries: Vec<_> = lock(&self.capsules)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut m = HashMap::new();
            for (id, e) in entries {
                if let Some(pid) = e
                    .state
                    .lock()
                    .await
                    .as_ref()
                    .and_then(|r| r.vm.as_ref())
                    .map(|v| v.pid)
                {
                    m.insert(id, pid);
                }
            }
            m
        };
        let capsules_dir = self.cfg.capsules_dir().to_string_lossy().to_string();
        for (pid, name) in crate::vmm::qemu::find_mentioning(&capsules_dir) {
            if adopted.get(&name) != Some(&pid) {
                warn!(capsule_id = %name, pid, "killing a VM no capsule record accounts for");
                // SAFETY: kill(2) on a QEMU whose command line names this agent's capsules
                // directory and that no adopted capsule owns.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                // Its disk lock goes with it; wait, so a resume right after start finds it free.
                for _ in 0..500 {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        // Namespaces no capsule owns are leftovers of a crash between slot creation and persist.
        let owned: BTreeSet<u32> = lock(&self.slots).clone();
        for index in net::existing_slots(self.cfg.slot_base, self.cfg.max_slots) {
            if !owned.contains(&index) {
                net::destroy(&Slot::new(self.cfg.slot_base, index)).await;
            }
        }
    }
}

impl CapsuleManager {
    /// Decides what one capsule found at start-up is now: running, paused, or lost (`None`).
    /// A crash in the middle of a pause or resume lands on whichever side is whole.
    async fn recover_one(
        &self,
        mut record: CapsuleRecord,
        dir: &std::path::Path,
    ) -> Option<CapsuleRecord> {
        let saved = dir.join(SAVED_STATE);
        let alive = record.vm.as_ref().is_some_and(|vm| self.vmm.is_alive(vm));
        let healthy = |r: &CapsuleRecord| {
            let client = self.envd(r);
            async move { client.health().await.is_ok() }
        };
        let to_paused = |mut r: CapsuleRecord| async move {
            if let Some(vm) = r.vm.take() {
                let _ = self.vmm.stop(&vm).await;
            }
            net::destroy(&r.slot).await;
            r.phase = Phase::Paused;
            self.persist(&r).ok()?;
            Some(r)
        };
        match record.phase {
            Phase::Running => {
                if !alive || record.envd_version.is_none() {
                    return None;
                }
                if !healthy(&record).await {
                    // Frozen by a live snapshot the crash interrupted: it runs on.
                    let vm = record.vm.clone()?;
                    self.vmm.thaw(&vm).await.ok()?;
                    if !healthy(&record).await {
                        return None;
                    }
                }
                // A saved state left by a crash right after a resume is stale.
                let _ = std::fs::remove_file(&saved);
                Some(record)
            }
            Phase::Pausing if saved.exists() => to_paused(record).await,
            Phase::Pausing => {
                // Crashed while saving: the frozen VM, if it lives, simply runs on.
                let vm = record.vm.clone().filter(|_| alive)?;
                self.vmm.thaw(&vm).await.ok()?;
                record.phase = Phase::Running;
                if !healthy(&record).await {
                    return None;
                }
                self.persist(&record).ok()?;
                Some(record)
            }
            Phase::Paused if saved.exists() => to_paused(record).await,
            Phase::Paused => None,
            Phase::Resuming => {
                if alive && healthy(&record).await {
                    record.phase = Phase::Running;
                    self.persist(&record).ok()?;
                    let _ = self.envd(&record).restored().await;
                    let _ = std::fs::remove_file(&saved);
                    return Some(record);
                }
                if saved.exists() {
                    return to_paused(record).await;
                }
                None
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections cannot leave the maps
    // inconsistent (each is a single insert/remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The last lines of a console log, for error messages.
fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(8).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}
