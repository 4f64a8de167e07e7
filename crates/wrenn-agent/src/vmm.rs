//! Virtual machine monitors. [`Vmm`] is what the capsule manager needs from one; [`qemu`] is the
//! driver for QEMU's `microvm` machine (KVM when usable, TCG otherwise).

mod jail;
mod migration;
mod process;
pub mod qemu;
pub mod qmp;
mod ram;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::error::Result;

/// The CPU accelerator a VMM runs guests with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything needed to boot one VM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub id: String,
    /// The capsule's own directory (sockets, logs, pid file).
    pub dir: PathBuf,
    /// Network namespace the VMM runs in (it opens `tap0` there).
    pub netns: String,
    /// The uid and gid the VMM runs as (the slot's: `net::Slot::vm_uid`; it owns `tap0`).
    pub uid: u32,
    pub vcpus: u32,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub disk: PathBuf,
    /// QMP control socket (a short path: unix socket paths are limited to 108 bytes).
    pub qmp_socket: PathBuf,
    /// Host end of the serial lifeline to envd (a unix socket QEMU listens on).
    pub lifeline_socket: PathBuf,
    /// `KEY=value` words appended to the kernel command line; they reach the guest's /init as
    /// environment variables.
    pub guest_env: Vec<(String, String)>,
    pub memory: Memory,
}

/// Where guest RAM lives. The RAM region has the same name in every case, so a state saved
/// from one kind restores into another (as long as the RAM travels in the state).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Memory {
    /// Private anonymous memory (a cold boot, a resume).
    Anonymous,
    /// A file written through (`share=on`): a template VM, whose RAM stays in the file when
    /// it is saved with `ignore_shared`.
    SharedFile(PathBuf),
    /// A template's RAM file mapped copy-on-write (`share=off`): pages stay shared between
    /// capsules until one writes them.
    PrivateFile(PathBuf),
}

/// A VM's resource use at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// CPU time used since it started, in seconds.
    pub cpu_seconds: f64,
    /// Memory it holds, in bytes.
    pub memory_bytes: i64,
}

/// A VM process the VMM started (or re-adopted after an agent restart).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VmProcess {
    pub pid: u32,
    /// Start time of the process (clock ticks after host boot): with `pid`, its identity.
    #[serde(default)]
    pub start_time: u64,
    pub qmp_socket: PathBuf,
    pub console_log: PathBuf,
    /// Host end of the serial lifeline; `None` for VMs started before it existed.
    #[serde(default)]
    pub lifeline_socket: Option<PathBuf>,
    /// The cgroup the VM runs in (removed once it has stopped); `None` when unconfined.
    #[serde(default)]
    pub cgroup: Option<String>,
    /// The uid it runs as (`None`: a VM started before VMs had their own).
    #[serde(default)]
    pub uid: Option<u32>,
}

#[async_trait]
pub trait Vmm: Send + Sync {
    /// e.g. `qemu 7.2.19`
    fn version(&self) -> &str;
    fn accel(&self) -> Accel;
    /// What a saved state restores under besides the kernel: the version (with the CPU model),
    /// the accelerator, and under TCG the TSC rate guests calibrated against, under KVM the
    /// host CPU's model and flags.
    fn machine(&self) -> &str;
    /// Starts the VM; returns once the process runs (not once the guest is ready).
    async fn boot(&self, cfg: &VmConfig) -> Result<VmProcess>;
    /// True while the VM process lives.
    fn is_alive(&self, vm: &VmProcess) -> bool;
    /// What the VM has used so far (its cgroup's accounting where it has one, else its
    /// process's); `None` once it is gone.
    fn usage(&self, vm: &VmProcess) -> Option<Usage>;
    /// Stops the VM and waits until its process is gone.
    async fn stop(&self, vm: &VmProcess) -> Result<()>;
    /// Freezes the guest and writes its whole state (devices and RAM) to `state`, flushing
    /// its disk first. The file appears under its name only once complete and on disk. On
    /// error the guest is left frozen: [`Vmm::thaw`] resumes it.
    /// With `ignore_shared`, RAM in a shared file is left out of the state (it stays in the
    /// file).
    async fn save(&self, vm: &VmProcess, state: &Path, ignore_shared: bool) -> Result<()>;
    /// A live snapshot: freezes the guest, moves its disk (now `disk`) onto `new_disk`, an
    /// empty overlay on `disk` the caller made (the current file becomes read-only: the
    /// snapshot's disk), writes the whole state to `state`, and lets the guest run on. Once the
    /// disk has moved it stays moved, even if saving fails; `new_disk` exists afterwards
    /// exactly when it moved.
    async fn snapshot(
        &self,
        vm: &VmProcess,
        disk: &Path,
        new_disk: &Path,
        state: &Path,
    ) -> Result<()>;
    /// Resumes a guest frozen by [`Vmm::save`], or left by an agent that died while saving
    /// it: a save still running inside the VMM is cancelled first (it would freeze the guest
    /// again when it completed). Harmless on a running guest.
    async fn thaw(&self, vm: &VmProcess) -> Result<()>;
    /// Starts a VM from a state [`Vmm::save`] wrote, with the same configuration; returns
    /// once the guest runs again.
    /// With `ignore_shared`, RAM comes from `cfg.memory`'s file instead of the state.
    async fn restore(&self, cfg: &VmConfig, state: &Path, ignore_shared: bool)
        -> Result<VmProcess>;
    /// Loads a whole state [`Vmm::save`] wrote (devices and RAM) into a VM whose RAM is the
    /// shared file of `cfg.memory`, and writes the devices again to `state_out` without the
    /// RAM, which stays in the file; the guest never runs meanwhile, and the VM exits after.
    /// The file and `state_out` then restore like a template snapshot (`ignore_shared`).
    async fn split_memory(&self, cfg: &VmConfig, state_in: &Path, state_out: &Path) -> Result<()>;
    /// Asks the VMM to exit cleanly (disk images closed); kills it if it will not.
    async fn shutdown(&self, vm: &VmProcess) -> Result<()>;
    /// One line about a VM's state for an error message (run state, where the vCPU is).
    async fn diagnose(&self, vm: &VmProcess) -> String;
    /// Live VMs of this VMM whose command line mentions `marker` (e.g. an agent's capsules
    /// directory), as (pid, VM name): what crash recovery checks against its records.
    fn find_vms(&self, marker: &str) -> Vec<(u32, String)>;
    /// Live VMs whose name is `name`.
    fn find_named(&self, name: &str) -> Vec<u32>;
    /// Kills a VM process found by [`Vmm::find_vms`] or [`Vmm::find_named`] and waits (up to
    /// 5 s) until it is gone, so the files it held are free.
    async fn kill(&self, pid: u32);
}
