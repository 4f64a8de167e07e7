//! The QEMU `microvm` driver.
//!
//! Every VM's QEMU starts confined (`jail`): in the capsule's network namespace, in a mount
//! namespace holding only its own files, as the slot's own uid without capabilities, under its
//! own seccomp filter (`-sandbox on`), in a cgroup of its own, in its own process group so a
//! Ctrl-C on the agent's terminal does not reach it. What it cannot open there it gets as
//! descriptors: its QMP and lifeline sockets, its RAM file, states, a live snapshot's overlay.
//! A VM is identified by pid and process start time (persisted in the capsule's state), so
//! after a restart the agent finds its VMs and never signals a recycled pid. `-name <capsule
//! id>` labels it for humans and tests.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufReadExt, BufReader};
use tracing::{info, warn};

mod start;

use super::migration;
use super::process::{self, comm, find_mentioning, kill_and_wait};
pub use super::process::{find_by_name, is_running, process_start_time};
use super::qmp::Qmp;
use super::ram::{self, TemplateRam};
use super::{Accel, Memory, Usage, VmConfig, VmProcess, Vmm};
use crate::cgroup::Cgroups;
use crate::config::AccelChoice;
use crate::error::{HostError, Result};
use start::VmFds;

/// Kernel command line measured to boot fastest here (microvm, PVH vmlinux, uncompressed
/// initramfs: 1.8 s to exec-ready under TCG on a 2-core host).
const BASE_CMDLINE: &str = "console=ttyS0 panic=-1 quiet reboot=t mitigations=off tsc=reliable \
no_timer_check i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd 8250.nr_uarts=1 \
random.trust_cpu=on cryptomgr.notests";

/// QEMU's seccomp filter, installed before it touches guest data: no obsolete system calls,
/// no set*uid (a VM never regains privileges), no fork/exec (migrations go through descriptors
/// the agent passes, never `exec:`), no scheduler or NUMA changes (its share of the host is the
/// agent's to set: niceness and cgroup).
const SANDBOX: &str = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";

/// Scheduling niceness of every VMM process: guests share the CPU fairly among themselves but
/// yield to the platform's own processes (measured: ~1 ms less API latency per exec on two busy
/// cores).
pub const VM_NICE: libc::c_int = 5;
/// How long the KVM probe may take before KVM is declared unusable.
const KVM_PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// TCG's translation cache per VM, MiB (QEMU's default is 1 GiB).
const TCG_TB_MB: u32 = 256;

/// The host CPU as KVM guests with `-cpu host` see it: its model name and a digest of its flags.
fn host_cpu() -> String {
    use sha2::{Digest, Sha256};
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
    let flags = hex::encode(&Sha256::digest(field("flags").as_bytes())[..6]);
    format!("{} flags {flags}", field("model name"))
}

/// The virtual CPU guests see. TCG's default (`qemu64`) lacks SSE4.2 and POPCNT (x86-64-v2),
/// which current numpy, pandas and most PyPI wheels require ("Illegal instruction" at import);
/// `max` is everything TCG can emulate (QEMU 7.2: up to AVX2). Under KVM the host's own CPU.
fn cpu_model(accel: Accel) -> &'static str {
    match accel {
        Accel::Tcg => "max",
        Accel::Kvm => "host",
    }
}

pub struct QemuVmm {
    binary: String,
    /// The binary's absolute path (what a jail execs: it has no `PATH` of the host's).
    binary_path: PathBuf,
    version: String,
    machine: String,
    accel: Accel,
    /// Host TSC frequency handed to TCG guests (see [`host_tsc_khz`]).
    tsc_khz: Option<u64>,
    /// The cgroups VMs run in (none: unconfined).
    cgroups: Option<Cgroups>,
    /// The empty directory every VM's jail root is mounted on (in its own namespace).
    jail_root: PathBuf,
    /// Sealed copies of template RAM files.
    ram: TemplateRam,
    /// RAM files lent to a running VM's uid, by its pid: given back to root when it stops.
    lent: Mutex<HashMap<u32, PathBuf>>,
}

impl QemuVmm {
    /// Finds QEMU's version and picks the accelerator (probing KVM when asked to choose).
    pub async fn new(
        binary: &str,
        choice: AccelChoice,
        kernel: &Path,
        initramfs: &Path,
        cache_dir: &Path,
        jail_root: &Path,
    ) -> Result<Self> {
        let binary_path = find_binary(binary).ok_or_else(|| {
            HostError::Vmm(format!("cannot find {binary} (install qemu-system-x86)"))
        })?;
        std::fs::create_dir_all(jail_root)?;
        let out = tokio::process::Command::new(binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| {
                HostError::Vmm(format!(
                    "cannot run {binary} (install qemu-system-x86): {e}"
                ))
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        let accel = match choice {
            AccelChoice::Tcg => Accel::Tcg,
            AccelChoice::Kvm => Accel::Kvm,
            AccelChoice::Auto => cached_probe(binary, kernel, initramfs, cache_dir).await,
        };
        // The CPU model is part of the version: a state saved under one model does not restore
        // under another, so every snapshot key that names the VMM changes with it.
        let version = format!(
            "qemu {} cpu={}",
            text.lines()
                .next()
                .and_then(|l| l.split("version ").nth(1))
                .and_then(|v| v.split_whitespace().next())
                .unwrap_or("unknown"),
            cpu_model(accel)
        );
        let tsc_khz = match accel {
            Accel::Tcg => host_tsc_khz().await,
            Accel::Kvm => None,
        };
        let machine = match accel {
            // TSC rates within a few MHz are one clock to a guest.
            Accel::Tcg => format!(
                "{version} / tcg / tsc {} MHz",
                tsc_khz.map(|k| (k + 2500) / 5000 * 5).unwrap_or(0)
            ),
            Accel::Kvm => format!("{version} / kvm / {}", host_cpu()),
        };
        info!(%version, accel = accel.as_str(), tsc_khz, "vmm ready");
        Ok(Self {
            binary: binary.to_string(),
            binary_path,
            machine,
            version,
            accel,
            tsc_khz,
            cgroups: None,
            jail_root: jail_root.to_path_buf(),
            ram: TemplateRam::default(),
            lent: Mutex::new(HashMap::new()),
        })
    }

    /// Runs every VM in a cgroup of its own under `cgroups`.
    pub fn with_cgroups(mut self, cgroups: Option<Cgroups>) -> Self {
        self.cgroups = cgroups;
        self
    }

    /// Removes the stopped `vm`'s cgroup and gives back what it was lent.
    async fn release(&self, vm: &VmProcess) {
        self.give_back(vm.pid);
        if let (Some(c), Some(name)) = (&self.cgroups, &vm.cgroup) {
            c.remove(name).await;
        }
    }

    fn give_back(&self, pid: u32) {
        let lent = self
            .lent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&pid);
        if let Some(path) = lent {
            ram::give_back(&path);
        }
    }

    /// QEMU's arguments. `incoming`: start frozen, waiting for a saved state (`-S -incoming
    /// defer`); the machine must be exactly the one that was saved, so both paths share this.
    fn args(&self, cfg: &VmConfig, incoming: bool, fds: &VmFds) -> Result<Vec<String>> {
        let s = |p: &Path| -> Result<String> { Ok(crate::images::path_str(p)?.to_string()) };
        let mut cmdline = BASE_CMDLINE.to_string();
        if let Some(khz) = self.tsc_khz {
            cmdline.push_str(&format!(" tsc_early_khz={khz}"));
        }
        for (k, v) in &cfg.guest_env {
            cmdline.push_str(&format!(" {k}={v}"));
        }
        let accel = match self.accel {
            Accel::Kvm => "kvm".to_string(),
            // The translation cache is bounded (MiB): it counts in the VM's memory limit
            // (`cgroup::VMM_OVERHEAD_MB`).
            Accel::Tcg => format!("tcg,thread=multi,tb-size={TCG_TB_MB}"),
        };
        let dir = &cfg.dir;
        Ok(vec![
            "-name".into(),
            cfg.id.clone(),
            "-sandbox".into(),
            SANDBOX.into(),
            "-accel".into(),
            accel,
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-M".into(),
            "microvm".into(),
            "-m".into(),
            format!("{}M", cfg.memory_mb),
            "-object".into(),
            // A RAM file comes as a descriptor (see `ram`): the jail holds no path to it.
            match (&cfg.memory, fds.memory) {
                (Memory::SharedFile(_), Some(fd)) => format!(
                    "memory-backend-file,id=mem,size={}M,mem-path=/proc/self/fd/{fd},share=on",
                    cfg.memory_mb
                ),
                (Memory::PrivateFile(_), Some(fd)) => format!(
                    "memory-backend-file,id=mem,size={}M,mem-path=/proc/self/fd/{fd},share=off",
                    cfg.memory_mb
                ),
                _ => format!("memory-backend-ram,id=mem,size={}M", cfg.memory_mb),
            },
            "-machine".into(),
            "memory-backend=mem".into(),
            "-smp".into(),
            cfg.vcpus.to_string(),
            "-cpu".into(),
            cpu_model(self.accel).into(),
            // Appended to, so a resumed capsule's console follows on from before its pause.
            "-chardev".into(),
            format!(
                "file,id=console,path={},append=on",
                s(&dir.join("console.log"))?
            ),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            s(&cfg.kernel)?,
            "-initrd".into(),
            s(&cfg.initramfs)?,
            "-append".into(),
            cmdline,
            "-drive".into(),
            // writeback caching with the guest's flushes honoured: data a process fsyncs is on
            // the host's disk.
            format!(
                "id=d0,file={},format=qcow2,if=none,cache=writeback,discard=unmap",
                s(&cfg.disk)?
            ),
            "-device".into(),
            "virtio-blk-device,drive=d0".into(),
            "-netdev".into(),
            "tap,id=n0,ifname=tap0,script=no,downscript=no".into(),
            "-device".into(),
            format!("virtio-net-device,netdev=n0,mac={}", crate::net::GUEST_MAC),
            "-device".into(),
            "virtio-rng-device".into(),
            // The serial lifeline (found in the guest by its name): envd stays reachable when user code
            // breaks the guest network.
            "-device".into(),
            "virtio-serial-device,max_ports=2".into(),
            // Both sockets are listening sockets the agent bound at their paths.
            "-chardev".into(),
            format!("socket,id=lifeline,fd={},server=on,wait=off", fds.lifeline),
            "-device".into(),
            format!(
                "virtserialport,chardev=lifeline,nr=1,name={}",
                envd_proto::lifeline::PORT_NAME
            ),
            "-chardev".into(),
            format!("socket,id=qmp,fd={},server=on,wait=off", fds.qmp),
            "-mon".into(),
            "chardev=qmp,mode=control".into(),
        ]
        .into_iter()
        .chain(
            incoming
                .then(|| ["-S", "-incoming", "defer"].map(String::from))
                .into_iter()
                .flatten(),
        )
        .collect())
    }

    /// Connects to a VM's QMP socket, waiting for QEMU to create it.
    async fn qmp(&self, vm: &VmProcess) -> Result<Qmp> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match Qmp::connect(&vm.qmp_socket).await {
                Ok(q) => return Ok(q),
                Err(e) if std::time::Instant::now() > deadline || !is_running(vm) => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }
}

impl QemuVmm {
    /// Loads `state` into `vm` (started with `-incoming defer`), which stays frozen.
    async fn load(&self, vm: &VmProcess, state: &Path, ignore_shared: bool) -> Result<Qmp> {
        let mut qmp = self.qmp(vm).await?;
        migration::load_with(&mut qmp, state, ignore_shared).await?;
        Ok(qmp)
    }
}

/// `e` with the last lines QEMU logged for the VM of `cfg`.
fn with_qemu_log(cfg: &VmConfig, e: HostError) -> HostError {
    let log = std::fs::read_to_string(cfg.dir.join("qemu.log")).unwrap_or_default();
    let last = log.lines().rev().take(3).collect::<Vec<_>>().join(" | ");
    HostError::Vmm(format!("{e}; qemu: {last}"))
}

#[async_trait]
impl Vmm for QemuVmm {
    fn version(&self) -> &str {
        &self.version
    }

    fn accel(&self) -> Accel {
        self.accel
    }

    fn machine(&self) -> &str {
        &self.machine
    }

    async fn boot(&self, cfg: &VmConfig) -> Result<VmProcess> {
        self.spawn(cfg, false).await
    }

    fn is_alive(&self, vm: &VmProcess) -> bool {
        is_running(vm)
    }

    fn usage(&self, vm: &VmProcess) -> Option<Usage> {
        let (ticks, rss) = crate::metrics::process_usage(vm.pid)?;
        // The group counts every task and the memory charged to the VM (what its limit holds
        // it to); the process alone is the fallback on hosts without cgroups.
        let group = self
            .cgroups
            .as_ref()
            .zip(vm.cgroup.as_deref())
            .and_then(|(c, name)| c.usage(name));
        Some(match group {
            Some(u) => Usage {
                cpu_seconds: u.cpu_ns as f64 / 1e9,
                memory_bytes: i64::try_from(u.memory_bytes).unwrap_or(i64::MAX),
            },
            None => Usage {
                cpu_seconds: ticks as f64 / crate::metrics::clock_ticks(),
                memory_bytes: rss,
            },
        })
    }

    async fn stop(&self, vm: &VmProcess) -> Result<()> {
        let r = kill_and_wait(vm).await;
        if r.is_ok() {
            self.release(vm).await;
        }
        r
    }

    async fn save(&self, vm: &VmProcess, state: &Path, ignore_shared: bool) -> Result<()> {
        let mut qmp = self.qmp(vm).await?;
        migration::save_with(&mut qmp, state, ignore_shared).await
    }

    async fn snapshot(
        &self,
        vm: &VmProcess,
        // Named in `new_disk`'s header already: QEMU needs no path to it.
        _disk: &Path,
        new_disk: &Path,
        state: &Path,
    ) -> Result<()> {
        // The jailed VM cannot make files: the overlay (made by the caller) is given to its
        // uid and handed over as a descriptor set, then added as a node opened read-write from the
        // start and without image locks (QEMU's locks live on open file descriptions; an
        // fd-set image opened read-only first and upgraded kept a stale lock on the first one,
        // and `cont` then failed to take its write lock). The VM is the only user of its
        // overlay. Its header names `disk` by path, for restores.
        let mut moved_ok = false;
        let result = async {
            if let Some(uid) = vm.uid {
                std::os::unix::fs::chown(new_disk, Some(uid), Some(uid))?;
            }
            let rw = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(new_disk)?;
            let mut qmp = self.qmp(vm).await?;
            // One set per overlay: a name QEMU has not used in this run.
            let fdset = rand::random::<u32>() >> 1;
            qmp.add_fd(fdset, rw.as_fd()).await?;
            drop(rw);
            qmp.execute("stop", None).await?;
            let node = format!("overlay{fdset}");
            let moved = async {
                qmp.execute(
                    "blockdev-add",
                    Some(serde_json::json!({
                        "driver": "qcow2",
                        "node-name": node,
                        "file": {
                            "driver": "file",
                            "filename": format!("/dev/fdset/{fdset}"),
                            "locking": "off",
                        },
                        "backing": null,
                    })),
                )
                .await?;
                qmp.execute(
                    "blockdev-snapshot",
                    Some(serde_json::json!({ "node": "d0", "overlay": node })),
                )
                .await
            }
            .await;
            moved_ok = moved.is_ok();
            if moved_ok {
                crate::failpoint::hit("snapshot-after-switch");
            }
            let saved = match moved {
                Ok(_) => migration::save_with(&mut qmp, state, false).await,
                Err(e) => Err(e),
            };
            // The guest runs on whatever happened (after a completed migration `cont` also
            // takes the disk back from the finished migration).
            let thawed = qmp.execute("cont", None).await;
            saved?;
            thawed?;
            Ok::<_, HostError>(())
        }
        .await;
        // Whether the disk moved is what the caller learns from `new_disk` existing.
        if !moved_ok {
            let _ = std::fs::remove_file(new_disk);
        }
        result
    }

    async fn thaw(&self, vm: &VmProcess) -> Result<()> {
        let mut qmp = self.qmp(vm).await?;
        // QEMU carries a migration on after the agent that started it is gone, and stops the
        // guest when it completes (`postmigrate`): cancel it and wait until it has ended.
        let _ = qmp.execute("migrate_cancel", None).await;
        for _ in 0..500 {
            let info = qmp.execute("query-migrate", None).await?;
            match info.get("status").and_then(|s| s.as_str()) {
                Some("active" | "setup" | "cancelling" | "pre-switchover" | "device") => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => break,
            }
        }
        let status = qmp.execute("query-status", None).await?;
        if status.get("running").and_then(|r| r.as_bool()) != Some(true) {
            qmp.execute("cont", None).await?;
        }
        Ok(())
    }

    async fn restore(
        &self,
        cfg: &VmConfig,
        state: &Path,
        ignore_shared: bool,
    ) -> Result<VmProcess> {
        let vm = self.spawn(cfg, true).await?;
        let result = async {
            let mut qmp = self.load(&vm, state, ignore_shared).await?;
            qmp.execute("cont", None).await?;
            Ok::<_, HostError>(())
        }
        .await;
        if let Err(e) = result {
            let _ = self.stop(&vm).await;
            return Err(with_qemu_log(cfg, e));
        }
        Ok(vm)
    }

    async fn split_memory(&self, cfg: &VmConfig, state_in: &Path, state_out: &Path) -> Result<()> {
        let vm = self.spawn(cfg, true).await?;
        let result = async {
            let mut qmp = self.load(&vm, state_in, false).await?;
            // Still frozen (never `cont`): nothing in the guest moved since it was saved.
            migration::save_with(&mut qmp, state_out, true).await
        }
        .await;
        let _ = self.stop(&vm).await;
        result.map_err(|e| with_qemu_log(cfg, e))
    }

    async fn shutdown(&self, vm: &VmProcess) -> Result<()> {
        if let Ok(mut qmp) = self.qmp(vm).await {
            let _ = qmp.execute("quit", None).await;
            // Done once its files are closed (the disk and the state are free): the rest of
            // its exit (its jail's mounts, its memory) goes on in the background.
            for _ in 0..2500 {
                if !is_running(vm) || files_closed(vm.pid) {
                    // A pause ends here: its group goes in the background, not on its clock.
                    self.give_back(vm.pid);
                    if let (Some(c), Some(name)) = (self.cgroups.clone(), vm.cgroup.clone()) {
                        tokio::spawn(c.remove(&name));
                    }
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            warn!(pid = vm.pid, "qemu did not quit; killing it");
        }
        self.stop(vm).await
    }

    async fn diagnose(&self, vm: &VmProcess) -> String {
        diagnose(&vm.qmp_socket).await
    }

    fn find_vms(&self, marker: &str) -> Vec<(u32, String)> {
        find_mentioning(marker)
    }

    fn find_named(&self, name: &str) -> Vec<u32> {
        find_by_name(name)
    }

    async fn kill(&self, pid: u32) {
        // Only QEMU processes: a recycled pid of anything else is left alone.
        if !comm(pid).is_some_and(|c| c.starts_with("qemu-system")) {
            return;
        }
        let group = process::vm_name(pid);
        // SAFETY: kill(2) on a QEMU process this agent found by its command line.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
        for _ in 0..500 {
            if process::has_exited(pid) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Its group (named after its capsule) goes with it: a VM found at start-up that no
        // record accounts for was not in any group the start-up collection could remove.
        if let (Some(c), Some(name)) = (&self.cgroups, group) {
            c.remove(&name).await;
        }
    }
}

/// Whether process `pid` has closed all its files (it is exiting: the kernel drops its file
/// table before it tears down its namespaces and becomes a zombie).
fn files_closed(pid: u32) -> bool {
    match std::fs::read_dir(format!("/proc/{pid}/fd")) {
        Ok(mut fds) => fds.next().is_none(),
        Err(_) => true,
    }
}

/// `binary`'s absolute path: itself when it names a file, else the first match on `PATH`.
fn find_binary(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        return std::fs::canonicalize(binary).ok();
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
        .and_then(|p| std::fs::canonicalize(p).ok())
}

/// The probe's answer is cached per host boot: KVM does not change while the host runs.
async fn cached_probe(binary: &str, kernel: &Path, initramfs: &Path, cache_dir: &Path) -> Accel {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_dir.join("accel-probe.json");
    if let Ok(text) = std::fs::read_to_string(&cache) {
        if let Ok((id, accel)) = serde_json::from_str::<(String, Accel)>(&text) {
            if id == boot_id.trim() {
                info!(accel = accel.as_str(), "accelerator from this boot's probe");
                return accel;
            }
        }
    }
    let accel = probe_kvm(binary, kernel, initramfs).await;
    if let Ok(text) = serde_json::to_string(&(boot_id.trim(), accel)) {
        let _ = std::fs::write(&cache, text);
    }
    accel
}

/// Boots the guest kernel under KVM with `WRENN_PROBE=1` (its /init prints a marker and powers
/// off). KVM is usable only when the marker appears within the bound.
pub async fn probe_kvm(binary: &str, kernel: &Path, initramfs: &Path) -> Accel {
    if !Path::new("/dev/kvm").exists() {
        info!("no /dev/kvm: guests run under TCG");
        return Accel::Tcg;
    }
    let (Some(k), Some(i)) = (kernel.to_str(), initramfs.to_str()) else {
        return Accel::Tcg;
    };
    let child = tokio::process::Command::new(binary)
        .args([
            "-accel",
            "kvm",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args([
            "-M", "microvm", "-m", "256M", "-serial", "stdio", "-kernel", k, "-initrd", i,
        ])
        .args(["-append", &format!("{BASE_CMDLINE} WRENN_PROBE=1")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn();
    let Ok(mut child) = child else {
        return Accel::Tcg;
    };
    let Some(stdout) = child.stdout.take() else {
        return Accel::Tcg;
    };
    let mut lines = BufReader::new(stdout).lines();
    let seen = tokio::time::timeout(KVM_PROBE_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("WRENN-PROBE-OK") {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = child.kill().await;
    if seen {
        info!("KVM probe booted a guest: using KVM");
        Accel::Kvm
    } else {
        warn!("KVM probe did not finish within {KVM_PROBE_TIMEOUT:?}: guests run under TCG");
        Accel::Tcg
    }
}

/// A one-line description of a VM's state for logs: run state and the vCPU's instruction pointer.
async fn diagnose(qmp_socket: &Path) -> String {
    let mut qmp = match super::qmp::Qmp::connect(qmp_socket).await {
        Ok(q) => q,
        Err(e) => return format!("qmp unavailable: {e}"),
    };
    let status = qmp
        .execute("query-status", None)
        .await
        .map(|v| v.to_string())
        .unwrap_or_else(|e| e.to_string());
    let regs = qmp
        .execute(
            "human-monitor-command",
            Some(serde_json::json!({"command-line": "info registers"})),
        )
        .await
        .ok()
        .and_then(|v| {
            v.as_str()
                .map(|s| s.lines().take(3).collect::<Vec<_>>().join(" "))
        })
        .unwrap_or_default();
    format!("{status} {regs}")
}

/// Measures the host's TSC frequency in kHz.
///
/// Under TCG the guest reads the host's TSC, and a guest kernel that must calibrate it against
/// the PIT fails when the host is busy ("Unable to calibrate against PIT"; microvm has no HPET
/// or PM timer to fall back on) and then hangs before printing anything. Measured here: 9 of 12
/// boots hung with three starting at once, none of 16 with six at once once the frequency is
/// passed as `tsc_early_khz`.
pub async fn host_tsc_khz() -> Option<u64> {
    #[cfg(target_arch = "x86_64")]
    {
        let read = || {
            // SAFETY: RDTSC has no memory effects; every x86_64 CPU implements it.
            unsafe { core::arch::x86_64::_rdtsc() }
        };
        let t0 = std::time::Instant::now();
        let c0 = read();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let c1 = read();
        let micros = t0.elapsed().as_micros() as u64;
        if micros == 0 || c1 <= c0 {
            return None;
        }
        let khz = (c1 - c0) * 1000 / micros;
        // Round to 10 kHz: the measurement is not more precise than that.
        Some((khz + 5) / 10 * 10)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}
