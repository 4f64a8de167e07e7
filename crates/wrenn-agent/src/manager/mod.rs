//! [`CapsuleManager`]: the lifecycle of every capsule on this host, and this host's side of
//! the [`Host`] boundary.
//!
//! Split by concern: `create` (boot or restore a new capsule, template snapshots),
//! `lifecycle` (destroy, pause, resume), `snapshot` (user snapshots), `transfer` (copying
//! snapshots between hosts), `housekeeping` (unused per-shape template snapshots), `recover` (re-adopting
//! VMs after an agent restart, reaping dead ones), `sampling` (metrics).
//!
//! Invariants:
//! - A capsule's pieces (directory with disk overlay and logs, network slot, VMM process) exist
//!   only while its entry is in the manager; a failed create removes every piece it made.
//! - `<capsules>/<id>/state.json` is written before the VM starts and describes every piece, so
//!   after an agent restart [`CapsuleManager::start`] either re-adopts a live VM or removes what a
//!   dead one left behind. Nothing is leaked across crashes.
//! - Operations on one capsule are serialised by its entry's lock; different capsules never wait
//!   on each other. Guest operations hold the lock only to read where envd is.

mod create;
mod housekeeping;
mod lifecycle;
mod network;
mod recover;
mod sampling;
mod snapshot;
mod transfer;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use envd_client::EnvdClient;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use wrenn_api::{CapsuleSpec, MetricPoint, MetricsRange};
use wrenn_host::{
    BaseTemplate, ByteStream, CapsuleInfo, DeadCapsule, FileDigest, Host, HostCapacity, HostError,
    ImportedImage, Phase, RegistryCredentials, ShapeSnapshot, SnapshotManifest, SnapshotMeta,
    UserSnapshot,
};

use crate::config::AgentConfig;
use crate::error::Result;
use crate::images::{BootImages, ImageStore};
use crate::net::{self, Slot};
use crate::vmm::qemu::QemuVmm;
use crate::vmm::{VmProcess, Vmm};
use sampling::Sampler;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");
/// Disk a capsule needs at once beyond the host's reserve (its overlay and logs start small).
const MIN_DISK_ROOM_MB: u64 = 64;
/// A paused capsule's saved VM state (devices and RAM), in its directory.
const SAVED_STATE: &str = "saved.state";

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
    /// The per-shape template snapshot its disk and memory sit on (it holds a marker there in
    /// `users/`, so the snapshot is not collected while this capsule exists).
    #[serde(default)]
    template_snapshot: Option<PathBuf>,
    /// The token this capsule's envd requires on every connection (`None`: an envd from
    /// before tokens, in a snapshot or paused capsule made before them). The record is
    /// readable by root only.
    #[serde(default)]
    envd_token: Option<String>,
    /// Where its guest may connect to (enforced in its slot whenever it runs).
    #[serde(default)]
    network: wrenn_api::NetworkPolicy,
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
    /// The egress rules in force in each running capsule's slot (none: the open default).
    egress: Mutex<HashMap<String, crate::egress::Resolved>>,
    /// When unused per-shape template snapshots were last collected.
    collected_at: Mutex<Option<std::time::Instant>>,
    /// VM starts (boots and restores) running at once. A start is mostly CPU (a restore under
    /// TCG, a boot's kernel); fifty at once on two cores starve the running guests until their
    /// envds miss the platform's deadlines. Past the bound, creates and resumes wait their turn.
    starts: tokio::sync::Semaphore,
}

/// VM starts allowed at once per host core.
const STARTS_PER_CORE: usize = 2;

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
            &cfg.run_dir().join("jail"),
        )
        .await?;
        // One scope per agent (named by its slot range, like its network table), so agents
        // sharing a machine never collect each other's groups.
        let scope = format!("wrenn-{}", cfg.slot_base.to_string().replace('.', "_"));
        let vmm = vmm.with_cgroups(crate::cgroup::Cgroups::detect(&scope, &cfg.data_dir));
        let mgr = Arc::new(Self {
            cfg,
            images,
            boot,
            vmm: Arc::new(vmm),
            capsules: Mutex::new(HashMap::new()),
            slots: Mutex::new(BTreeSet::new()),
            metrics: Mutex::new(HashMap::new()),
            egress: Mutex::new(HashMap::new()),
            collected_at: Mutex::new(None),
            starts: tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(1, |n| n.get()) * STARTS_PER_CORE,
            ),
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
        let weak = Arc::downgrade(&mgr);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(crate::egress::REFRESH);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                tick.tick().await;
                let Some(mgr) = weak.upgrade() else { return };
                mgr.refresh_egress().await;
            }
        });
        Ok(mgr)
    }

    /// What a memory snapshot saved here restores under (see `Vmm::machine`), with the kernel.
    pub(crate) fn machine_name(&self) -> String {
        format!(
            "{} / kernel {}",
            self.vmm.machine(),
            self.boot.kernel.version
        )
    }

    pub fn vmm_version(&self) -> &str {
        self.vmm.version()
    }

    pub fn accel(&self) -> &'static str {
        self.vmm.accel().as_str()
    }

    /// Templates this host can boot.
    fn template_names(&self) -> Vec<String> {
        crate::images::TEMPLATES
            .iter()
            .filter(|r| self.images.rootfs_path(r.name).is_some())
            .map(|r| r.name.to_string())
            .collect()
    }

    /// Templates this host can boot: name, size of the root filesystem image, when it was built.
    fn base_template_list(&self) -> Vec<BaseTemplate> {
        crate::images::TEMPLATES
            .iter()
            .filter_map(|r| {
                let meta = std::fs::metadata(self.images.rootfs_path(r.name)?).ok()?;
                let built = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
                Some(BaseTemplate {
                    name: r.name.to_string(),
                    size_bytes: meta.len(),
                    built_at: built.into(),
                })
            })
            .collect()
    }

    /// What one capsule on this host can have at most: the host's CPUs, its memory less a
    /// reserve for the host itself, and the free space where capsule disks live.
    pub fn host_capacity(&self) -> HostCapacity {
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
            disk_reserve_mb: self.cfg.disk_reserve_mb,
        }
    }

    /// Refuses work that would leave the host less free disk than its reserve (`need_mb`:
    /// what the work writes at once).
    fn ensure_disk_room(&self, need_mb: u64, what: &str) -> Result<()> {
        let free = free_mb(&self.cfg.capsules_dir());
        let reserve = self.cfg.disk_reserve_mb;
        if free < reserve + need_mb {
            return Err(HostError::InsufficientStorage(format!(
                "the host's disk is full: {free} MiB free, it keeps {reserve} MiB for itself and {what} needs {need_mb} MiB"
            )));
        }
        Ok(())
    }

    fn entry(&self, id: &str) -> Result<Arc<Entry>> {
        lock(&self.capsules)
            .get(id)
            .cloned()
            .ok_or_else(|| HostError::NotFound(format!("capsule {id} not found on this host")))
    }

    /// The envd of a running capsule; the capsule's lock is held only while looking it up.
    async fn envd_of(&self, id: &str) -> Result<EnvdClient> {
        let entry = lock(&self.capsules)
            .get(id)
            .cloned()
            .ok_or_else(|| HostError::NotFound(format!("capsule {id} not found on this host")))?;
        let state = entry.state.lock().await;
        let record = state
            .as_ref()
            .filter(|r| r.phase == Phase::Running)
            .ok_or_else(|| HostError::InvalidState(format!("capsule {id} is not running")))?;
        Ok(self.envd_for(record))
    }

    /// Every capsule this host holds (one in the middle of an operation is skipped).
    async fn list_capsules(&self) -> Vec<CapsuleInfo> {
        let entries: Vec<_> = lock(&self.capsules).values().cloned().collect();
        let mut out = Vec::new();
        for e in entries {
            // Short holds (metrics sampling, finding a guest's address) are waited for: a
            // capsule skipped here looks vanished to the control plane's reconciler. Long ones
            // (create, pause, resume, snapshot, destroy) are in states it does not check.
            if let Ok(state) = tokio::time::timeout(LIST_LOCK_WAIT, e.state.lock()).await {
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
            if let Err(e) = self.destroy_capsule(&id).await {
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

    fn envd_for(&self, r: &CapsuleRecord) -> EnvdClient {
        EnvdClient::new(SocketAddr::new(
            r.slot.reach_ip.into(),
            envd_proto::ENVD_PORT,
        ))
        .with_token(r.envd_token.as_deref())
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
        if let Some(dir) = &r.template_snapshot {
            create::release_template_snapshot(dir, &r.id);
        }
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

    /// Writes the capsule's record: a new file renamed over the old, so a crash of the agent
    /// leaves the old record or the new, never a torn one. A paused capsule's record is also
    /// synced, file and directory: after a power loss its files are all that is left of it
    /// (its saved state is synced when written). A running capsule's VM would not survive a
    /// power loss anyway, and syncing every record cost each create and pause ~10 ms.
    fn persist(&self, r: &CapsuleRecord) -> Result<()> {
        let dir = self.capsule_dir(&r.id);
        let tmp = dir.join("state.json.tmp");
        let json = serde_json::to_vec_pretty(r).map_err(|e| HostError::Io(e.into()))?;
        let durable = r.phase == Phase::Paused;
        write_private(&tmp, &json, durable)?;
        std::fs::rename(tmp, dir.join("state.json"))?;
        if durable {
            std::fs::File::open(&dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// A running capsule's record (locked by the caller) and its VM; `InvalidState` otherwise.
fn running<'a>(
    state: &'a mut Option<CapsuleRecord>,
    id: &str,
) -> Result<(&'a mut CapsuleRecord, VmProcess)> {
    let record = state
        .as_mut()
        .filter(|r| r.phase == Phase::Running)
        .ok_or_else(|| HostError::InvalidState(format!("capsule {id} is not running")))?;
    let vm = record
        .vm
        .clone()
        .ok_or_else(|| HostError::InvalidState(format!("capsule {id} has no VM")))?;
    Ok((record, vm))
}

/// How long listing waits for a capsule's entry held by someone else.
const LIST_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

pub(super) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these short critical sections cannot leave the maps
    // inconsistent (each is a single insert/remove), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A new capsule token for envd: 32 random bytes, hex.
fn new_envd_token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Writes `bytes` to a new file at `path` readable by root only (records and tokens), synced
/// to disk when `durable`.
fn write_private(path: &std::path::Path, bytes: &[u8], durable: bool) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    if durable {
        f.sync_all()?;
    }
    Ok(())
}

/// The last lines of a console log, for error messages.
pub(super) fn tail(path: &std::path::Path) -> String {
    crate::console::tail(path)
}

/// This host's side of the boundary: each operation is one of the manager's own methods.
#[async_trait::async_trait]
impl Host for CapsuleManager {
    async fn templates(&self) -> Result<Vec<String>> {
        Ok(self.template_names())
    }
    async fn base_templates(&self) -> Result<Vec<BaseTemplate>> {
        Ok(self.base_template_list())
    }
    async fn capacity(&self) -> Result<HostCapacity> {
        Ok(self.host_capacity())
    }
    async fn list(&self) -> Result<Vec<CapsuleInfo>> {
        Ok(self.list_capsules().await)
    }
    async fn reap_dead(&self) -> Result<Vec<DeadCapsule>> {
        Ok(self.reap_dead_vms().await)
    }
    async fn create(
        &self,
        id: String,
        spec: CapsuleSpec,
        from: Option<UserSnapshot>,
    ) -> Result<CapsuleInfo> {
        self.create_capsule(&id, &spec, from.as_ref()).await
    }
    async fn destroy(&self, id: String) -> Result<bool> {
        self.destroy_capsule(&id).await
    }
    async fn pause(&self, id: String) -> Result<()> {
        self.pause_capsule(&id).await
    }
    async fn resume(&self, id: String) -> Result<CapsuleInfo> {
        self.resume_capsule(&id).await
    }
    async fn set_network(&self, id: String, policy: wrenn_api::NetworkPolicy) -> Result<()> {
        self.change_network(&id, &policy).await
    }
    async fn snapshot(&self, id: String, snapshot_id: String) -> Result<SnapshotMeta> {
        self.take_snapshot(&id, &snapshot_id).await
    }
    async fn delete_snapshot(&self, snapshot_id: String) -> Result<()> {
        self.remove_snapshot(&snapshot_id).await
    }
    async fn metrics(&self, id: String, range: MetricsRange) -> Result<Vec<MetricPoint>> {
        self.metric_points(&id, range)
    }
    async fn cache_template(&self, snapshot_id: String, key: String) -> Result<()> {
        self.keep_in_cache(&snapshot_id, &key).await
    }
    async fn adopt_template(
        &self,
        key: String,
        snapshot_id: String,
    ) -> Result<Option<SnapshotMeta>> {
        self.adopt_from_cache(&key, &snapshot_id).await
    }
    async fn import_image(
        &self,
        reference: String,
        credentials: Option<RegistryCredentials>,
        snapshot_id: String,
        disk_mb: u64,
    ) -> Result<ImportedImage> {
        self.import_oci(&reference, credentials.as_ref(), &snapshot_id, disk_mb)
            .await
    }
    async fn holds_snapshot(&self, snapshot_id: String) -> Result<bool> {
        self.holds(&snapshot_id)
    }
    async fn snapshot_manifest(&self, snapshot_id: String) -> Result<SnapshotManifest> {
        self.manifest_of(&snapshot_id).await
    }
    async fn install_snapshot(
        &self,
        transfer: String,
        manifest: SnapshotManifest,
    ) -> Result<SnapshotMeta> {
        self.install_transfer(&transfer, &manifest).await
    }
    async fn abort_transfer(&self, transfer: String) -> Result<()> {
        self.drop_transfer(&transfer).await
    }
    async fn machine(&self) -> Result<String> {
        Ok(self.machine_name())
    }
    async fn shape_snapshots(&self) -> Result<Vec<ShapeSnapshot>> {
        Ok(self.shape_snapshots())
    }
    async fn envd(&self, id: &str) -> Result<EnvdClient> {
        self.envd_of(id).await
    }
    async fn read_snapshot_file(&self, snapshot_id: &str, file: &str) -> Result<ByteStream> {
        self.open_snapshot_file(snapshot_id, file).await
    }
    async fn write_snapshot_file(
        &self,
        transfer: &str,
        digest: &FileDigest,
        body: ByteStream,
    ) -> Result<()> {
        self.receive_snapshot_file(transfer, digest, body).await
    }
}
