//! A control group per VM: what one capsule's QEMU may take of the host — memory (its guest RAM
//! plus the VMM's own measured overhead), CPU (its vCPUs' worth), tasks, and disk bandwidth.
//!
//! Both layouts are supported, detected once at start and named in the log:
//! - **cgroup v2** where the unified hierarchy has the controllers (`memory`, `cpu`, `pids`,
//!   and `io` if present): `<unified>/<scope>/<vm>`, the scope directly under the hierarchy's
//!   root (v2 allows no processes in a group whose children take controllers, and the agent's
//!   own group has processes).
//! - **cgroup v1** otherwise (machines where v2 is mounted but empty): one directory per
//!   controller (`memory`, `cpu`, `pids`, `blkio`) under the agent's own group in each
//!   hierarchy, `<hierarchy><own group>/<scope>/<vm>`, so the capsules stay inside whatever
//!   limits the agent itself runs under.
//!
//! Neither is required: a host without usable cgroups runs VMs unconfined and says so.
//! A VM joins its group right after QEMU's exec, while QEMU starts and before its guest runs
//! (see `vmm::qemu`: before exec, the ~10 ms a first v1 attach can take was added to every
//! create). Groups are removed when their
//! VM has stopped (a VM that died is torn down like any other); any left by an agent that
//! crashed are empty and removed at its next start.

use std::path::{Path, PathBuf};

use tracing::{info, warn};

/// Memory the VMM takes beyond its guest's RAM: QEMU itself, its I/O buffers and, under TCG,
/// the translation cache (bounded by `-accel tcg,tb-size`, see `vmm::qemu`).
pub const VMM_OVERHEAD_MB: u64 = 448;
/// Tasks (QEMU's threads) one VM may have.
pub const PIDS_MAX: u32 = 256;
/// Disk bandwidth one VM may use on the data directory's disk, each way.
pub const DISK_BPS: u64 = 256 * 1024 * 1024;
const CPU_PERIOD_US: u64 = 100_000;

/// What one VM may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub memory_bytes: u64,
    pub cpus: u32,
    pub pids: u32,
    pub disk_bps: u64,
}

impl Limits {
    pub fn for_vm(memory_mb: u32, vcpus: u32) -> Self {
        Self {
            memory_bytes: (u64::from(memory_mb) + VMM_OVERHEAD_MB) << 20,
            cpus: vcpus.max(1),
            pids: PIDS_MAX,
            disk_bps: DISK_BPS,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Layout {
    /// The scope directory in the unified hierarchy.
    V2 { scope: PathBuf, io: bool },
    /// The scope directory in each v1 hierarchy, by controller.
    V1 { dirs: Vec<(&'static str, PathBuf)> },
}

/// The cgroups this agent puts its VMs in.
#[derive(Debug, Clone)]
pub struct Cgroups {
    layout: Layout,
    /// `MAJ:MIN` of the disk holding the data directory (for the bandwidth limit).
    disk: Option<String>,
    /// How many times each group name was prepared. A group is named after its capsule, so a
    /// resume right after a pause prepares the name its stopped VM's group still has; the
    /// removal of that old group (in the background) checks the count under this lock and
    /// leaves a group prepared since alone.
    generations: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
}

/// What one VM's group has used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// CPU time of all its tasks since the group was made.
    pub cpu_ns: u64,
    /// Its memory working set: everything charged to it less the inactive file cache (which
    /// the kernel reclaims first when the group nears its limit).
    pub memory_bytes: u64,
}

/// One VM's group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    /// The group's directory in each hierarchy.
    pub dirs: Vec<PathBuf>,
}

impl VmCgroup {
    /// The `cgroup.procs` files a process's pid is written into to move it into the group.
    pub fn procs(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| d.join("cgroup.procs")).collect()
    }
}

const V1_CONTROLLERS: [&str; 4] = ["memory", "cpu", "pids", "blkio"];

impl Cgroups {
    /// Detects the layout (`scope` names this agent's directory) and prepares the scope.
    /// `None`, with a warning, when neither layout is usable.
    pub fn detect(scope: &str, data_dir: &Path) -> Option<Self> {
        let disk = whole_disk_of(data_dir);
        let layout = match detect_v2(scope).or_else(|| detect_v1(scope)) {
            Some(l) => l,
            None => {
                warn!("no usable cgroups (v2 controllers or v1 memory/cpu/pids): VMs run without resource limits");
                return None;
            }
        };
        match &layout {
            Layout::V2 { scope, io } => {
                info!(layout = "v2", dir = %scope.display(), io, "VMs run in cgroup v2 groups")
            }
            Layout::V1 { dirs } => info!(
                layout = "v1",
                controllers = %dirs.iter().map(|(c, _)| *c).collect::<Vec<_>>().join(","),
                dir = %dirs[0].1.display(),
                "VMs run in cgroup v1 groups"
            ),
        }
        let c = Self {
            layout,
            disk,
            generations: Default::default(),
        };
        c.collect();
        Some(c)
    }

    /// Which layout is in use (`v1` or `v2`).
    pub fn layout(&self) -> &'static str {
        match self.layout {
            Layout::V2 { .. } => "v2",
            Layout::V1 { .. } => "v1",
        }
    }

    /// Creates (or reuses) the group `name` with `limits`.
    pub fn prepare(&self, name: &str, limits: Limits) -> std::io::Result<VmCgroup> {
        let mut generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        *generations.entry(name.to_string()).or_default() += 1;
        let quota = u64::from(limits.cpus) * CPU_PERIOD_US;
        match &self.layout {
            Layout::V2 { scope, io } => {
                let dir = scope.join(name);
                std::fs::create_dir_all(&dir)?;
                write(&dir, "memory.max", &limits.memory_bytes.to_string())?;
                // No swapping a guest's memory out behind its back (if swap is accounted).
                let _ = std::fs::write(dir.join("memory.swap.max"), "0");
                write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"))?;
                write(&dir, "pids.max", &limits.pids.to_string())?;
                if let (true, Some(disk)) = (io, &self.disk) {
                    let bps = limits.disk_bps;
                    if let Err(e) = write(&dir, "io.max", &format!("{disk} rbps={bps} wbps={bps}"))
                    {
                        warn!(error = %e, "cannot limit a VM's disk bandwidth");
                    }
                }
                Ok(VmCgroup { dirs: vec![dir] })
            }
            Layout::V1 { dirs } => {
                let mut made = Vec::new();
                for (controller, scope) in dirs {
                    let dir = scope.join(name);
                    std::fs::create_dir_all(&dir)?;
                    match *controller {
                        "memory" => {
                            write(
                                &dir,
                                "memory.limit_in_bytes",
                                &limits.memory_bytes.to_string(),
                            )?;
                            let _ = std::fs::write(dir.join("memory.swappiness"), "0");
                        }
                        "cpu" => {
                            write(&dir, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                            write(&dir, "cpu.cfs_quota_us", &quota.to_string())?;
                        }
                        "pids" => write(&dir, "pids.max", &limits.pids.to_string())?,
                        "blkio" => {
                            if let Some(disk) = &self.disk {
                                let bps = limits.disk_bps;
                                for f in [
                                    "blkio.throttle.read_bps_device",
                                    "blkio.throttle.write_bps_device",
                                ] {
                                    if let Err(e) = write(&dir, f, &format!("{disk} {bps}")) {
                                        warn!(error = %e, "cannot limit a VM's disk bandwidth");
                                    }
                                }
                            }
                        }
                        _ => {}
                    }
                    made.push(dir);
                }
                Ok(VmCgroup { dirs: made })
            }
        }
    }

    /// Removes the group `name` once its VM has stopped: a killed process's threads leave the
    /// group a moment after the process reads as gone, so this retries for up to a second.
    /// One still holding a task after that is left for [`Cgroups::collect`]. The group as it
    /// is when this is called: once the name is prepared again (a new VM of the capsule), the
    /// removal stops.
    pub fn remove(&self, name: &str) -> impl std::future::Future<Output = ()> + Send + 'static {
        let this = self.clone();
        let name = name.to_string();
        let generation = this.generation(&name);
        async move { this.remove_generation(&name, generation).await }
    }

    fn generation(&self, name: &str) -> u64 {
        let generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
        generations.get(name).copied().unwrap_or(0)
    }

    async fn remove_generation(&self, name: &str, generation: u64) {
        for _ in 0..50 {
            let left = {
                let generations = self.generations.lock().unwrap_or_else(|e| e.into_inner());
                if generations.get(name).copied().unwrap_or(0) != generation {
                    return;
                }
                self.scopes()
                    .into_iter()
                    .map(|s| s.join(name))
                    .filter(|d| {
                        remove_dir(d);
                        d.exists()
                    })
                    .count()
            };
            if left == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        warn!(
            cgroup = name,
            "a VM's cgroup still has tasks; left for later"
        );
    }

    /// Removes every group of this agent without tasks (left by a previous run's VMs). Only
    /// at start: later, an empty group may be one a VM is about to join.
    pub fn collect(&self) {
        for scope in self.scopes() {
            let Ok(entries) = std::fs::read_dir(&scope) else {
                continue;
            };
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    remove_dir(&e.path());
                }
            }
        }
    }

    /// What the group `name` has used so far; `None` where the layout does not account it.
    pub fn usage(&self, name: &str) -> Option<Usage> {
        match &self.layout {
            Layout::V2 { scope, .. } => {
                let dir = scope.join(name);
                let cpu = read_stat(&dir.join("cpu.stat"), "usage_usec")?;
                let current = read_number(&dir.join("memory.current"))?;
                let inactive = read_stat(&dir.join("memory.stat"), "inactive_file").unwrap_or(0);
                Some(Usage {
                    cpu_ns: cpu.saturating_mul(1000),
                    memory_bytes: current.saturating_sub(inactive),
                })
            }
            Layout::V1 { dirs } => {
                let dir = |c: &str| {
                    dirs.iter()
                        .find(|(n, _)| *n == c)
                        .map(|(_, d)| d.join(name))
                };
                let memory = dir("memory")?;
                let usage = read_number(&memory.join("memory.usage_in_bytes"))?;
                let inactive =
                    read_stat(&memory.join("memory.stat"), "total_inactive_file").unwrap_or(0);
                // `cpuacct` is accounted where it shares the hierarchy with `cpu` (the usual
                // `cpu,cpuacct` mount).
                let cpu_ns = read_number(&dir("cpu")?.join("cpuacct.usage"))?;
                Some(Usage {
                    cpu_ns,
                    memory_bytes: usage.saturating_sub(inactive),
                })
            }
        }
    }

    fn scopes(&self) -> Vec<PathBuf> {
        match &self.layout {
            Layout::V2 { scope, .. } => vec![scope.clone()],
            Layout::V1 { dirs } => dirs.iter().map(|(_, d)| d.clone()).collect(),
        }
    }
}

fn read_number(file: &Path) -> Option<u64> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

/// The value of `key` in a flat-keyed cgroup file (`key value` lines, as `memory.stat`).
fn read_stat(file: &Path, key: &str) -> Option<u64> {
    parse_stat(&std::fs::read_to_string(file).ok()?, key)
}

fn parse_stat(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value).map_err(|e| {
        std::io::Error::new(e.kind(), format!("{}/{file} = {value}: {e}", dir.display()))
    })
}

/// rmdir(2) of a group; only succeeds once no task is left in it (the files in a cgroup
/// directory are not real, so it is never `remove_dir_all`).
fn remove_dir(dir: &Path) {
    let _ = std::fs::remove_dir(dir);
}

fn detect_v2(scope: &str) -> Option<Layout> {
    for root in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let root = Path::new(root);
        let Ok(controllers) = std::fs::read_to_string(root.join("cgroup.controllers")) else {
            continue;
        };
        let has = |c: &str| controllers.split_whitespace().any(|x| x == c);
        if !(has("memory") && has("cpu") && has("pids")) {
            continue;
        }
        let io = has("io");
        let dir = root.join(scope);
        let wanted: &[&str] = if io {
            &["memory", "cpu", "pids", "io"]
        } else {
            &["memory", "cpu", "pids"]
        };
        let enable = |d: &Path| {
            wanted
                .iter()
                .all(|c| std::fs::write(d.join("cgroup.subtree_control"), format!("+{c}")).is_ok())
        };
        if !enable(root) || std::fs::create_dir_all(&dir).is_err() || !enable(&dir) {
            warn!(root = %root.display(), "cgroup v2 controllers cannot be enabled here");
            continue;
        }
        return Some(Layout::V2 { scope: dir, io });
    }
    None
}

fn detect_v1(scope: &str) -> Option<Layout> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let mut dirs = Vec::new();
    for controller in V1_CONTROLLERS {
        let Some(mount) = v1_mount(&mounts, controller) else {
            if controller == "blkio" {
                continue; // optional: only the bandwidth limit is lost
            }
            return None;
        };
        let group = v1_own_group(&own, controller).unwrap_or_else(|| "/".into());
        let dir = mount.join(group.trim_start_matches('/')).join(scope);
        if std::fs::create_dir_all(&dir).is_err() {
            return None;
        }
        dirs.push((controller, dir));
    }
    Some(Layout::V1 { dirs })
}

/// Where the v1 hierarchy holding `controller` is mounted (`/proc/self/mounts` lines like
/// `cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,memory 0 0`).
fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() >= 4 && f[2] == "cgroup" && f[3].split(',').any(|o| o == controller))
            .then(|| PathBuf::from(f[1]))
    })
}

/// This process's group in the v1 hierarchy of `controller` (`/proc/self/cgroup` lines like
/// `4:memory:/some/group`, controllers comma-joined when mounted together).
fn v1_own_group(own: &str, controller: &str) -> Option<String> {
    own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, names, path) = (f.next()?, f.next()?, f.next()?);
        names
            .split(',')
            .any(|n| n == controller)
            .then(|| path.to_string())
    })
}

/// `MAJ:MIN` of the whole disk holding `path` (bandwidth limits take disks, not partitions);
/// `None` for file systems without one (tmpfs, overlay).
fn whole_disk_of(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(path).ok()?.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    if major == 0 {
        return None;
    }
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    if sys.join("partition").exists() {
        // The parent directory of a partition is its disk.
        let disk = std::fs::read_to_string(sys.canonicalize().ok()?.parent()?.join("dev")).ok()?;
        return Some(disk.trim().to_string());
    }
    sys.exists().then(|| format!("{major}:{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_hierarchies_and_own_groups_are_read_from_proc() {
        let mounts = "cgroup2 /sys/fs/cgroup/unified cgroup2 rw,nosuid 0 0\n\
                      cgroup /sys/fs/cgroup/memory cgroup rw,nosuid,nodev,noexec,relatime,memory 0 0\n\
                      cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,cpu,cpuacct 0 0\n";
        assert_eq!(
            v1_mount(mounts, "memory"),
            Some("/sys/fs/cgroup/memory".into())
        );
        assert_eq!(
            v1_mount(mounts, "cpu"),
            Some("/sys/fs/cgroup/cpu,cpuacct".into())
        );
        assert_eq!(v1_mount(mounts, "pids"), None);
        let own = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/\n0::/\n";
        assert_eq!(
            v1_own_group(own, "memory").as_deref(),
            Some("/process_api/abc")
        );
        assert_eq!(v1_own_group(own, "cpuacct").as_deref(), Some("/"));
        assert_eq!(v1_own_group(own, "pids"), None);
    }

    #[test]
    fn reads_flat_keyed_files() {
        let stat =
            "usage_usec 1234\nuser_usec 1000\ninactive_file 4096\ntotal_inactive_file 8192\n";
        assert_eq!(parse_stat(stat, "usage_usec"), Some(1234));
        assert_eq!(parse_stat(stat, "inactive_file"), Some(4096));
        assert_eq!(parse_stat(stat, "total_inactive_file"), Some(8192));
        assert_eq!(parse_stat(stat, "usage"), None);
    }

    #[test]
    fn limits_follow_the_vm() {
        let l = Limits::for_vm(512, 2);
        assert_eq!(l.memory_bytes, (512 + VMM_OVERHEAD_MB) << 20);
        assert_eq!(l.cpus, 2);
        assert_eq!(Limits::for_vm(512, 0).cpus, 1);
    }
}
