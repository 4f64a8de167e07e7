//! Starting one VM's QEMU: its descriptors (sockets, RAM), its jail (`vmm::jail`), its
//! cgroup, and the wait until it runs.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::super::jail::{self, Jail, JailSpec};
use super::super::process::comm;
use super::super::ram;
use super::super::{Accel, Memory, VmConfig, VmProcess};
use super::{process_start_time, with_qemu_log, QemuVmm, VM_NICE};
use crate::cgroup::Limits;
use crate::error::{HostError, Result};

/// Moves the just-started QEMU `pid` (all its threads) into its cgroup, in the background.
///
/// Right after exec rather than before it: a process's first move into a v1 cgroup after the
/// host was idle waits ~10 ms for an RCU grace period, which every create would otherwise pay
/// on top; here it overlaps QEMU's own start, before the guest runs anything (a restore waits
/// for its state, a boot is still in its firmware). A VM that cannot be confined is killed.
fn join_cgroup(id: &str, procs: Vec<std::path::PathBuf>, pid: u32, start_time: u64) {
    let id = id.to_string();
    tokio::task::spawn_blocking(move || {
        for p in procs {
            if let Err(e) = std::fs::write(&p, pid.to_string()) {
                tracing::error!(capsule_id = %id, cgroup = %p.display(), error = %e, "cannot put the VM in its cgroup; killing it");
                if process_start_time(pid) == Some(start_time) {
                    // SAFETY: kill(2) on a pid whose start time proves it is this VM's QEMU.
                    unsafe {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
                return;
            }
        }
    });
}

/// The descriptors one VM starts with (their numbers go on its command line).
pub(super) struct VmFds {
    pub(super) qmp: RawFd,
    pub(super) lifeline: RawFd,
    pub(super) memory: Option<RawFd>,
}

impl QemuVmm {
    pub(super) async fn spawn(&self, cfg: &VmConfig, incoming: bool) -> Result<VmProcess> {
        let uid = cfg.uid;
        // Its control sockets: bound here (a previous QEMU of this capsule may have left the
        // paths), listened on by QEMU.
        let bind = |path: &Path| -> Result<UnixListener> {
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path)
                .map_err(|e| HostError::Vmm(format!("cannot listen on {}: {e}", path.display())))
        };
        let qmp = bind(&cfg.qmp_socket)?;
        let lifeline = bind(&cfg.lifeline_socket)?;
        // Its RAM file, if any, as a descriptor (see `ram`).
        let (memory, lent): (Option<OwnedFd>, Option<PathBuf>) = match &cfg.memory {
            Memory::Anonymous => (None, None),
            Memory::PrivateFile(p) => {
                let sealed = self.ram.get(p).await?;
                (Some(sealed.try_clone()?), None)
            }
            Memory::SharedFile(p) => (Some(ram::lend(p, uid, uid)?.into()), Some(p.clone())),
        };
        let started = self
            .start_jailed(cfg, incoming, &qmp, &lifeline, memory.as_ref())
            .await;
        drop((qmp, lifeline, memory));
        match started {
            Ok(vm) => {
                if let Some(p) = lent {
                    self.lent
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(vm.pid, p);
                }
                Ok(vm)
            }
            Err(e) => {
                if let Some(p) = lent {
                    ram::give_back(&p);
                }
                Err(e)
            }
        }
    }

    /// Starts QEMU in its jail and its cgroup (see `jail`), with the descriptors given.
    async fn start_jailed(
        &self,
        cfg: &VmConfig,
        incoming: bool,
        qmp: &UnixListener,
        lifeline: &UnixListener,
        memory: Option<&OwnedFd>,
    ) -> Result<VmProcess> {
        let uid = cfg.uid;
        let console = cfg.dir.join("console.log");
        // The files it writes are its own; everything else it sees is read-only.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&console)?;
        for f in [&cfg.disk, &console] {
            std::os::unix::fs::chown(f, Some(uid), Some(uid))?;
        }
        let mut read_only = vec![
            cfg.kernel.clone(),
            cfg.initramfs.clone(),
            self.binary_path.clone(),
        ];
        read_only.extend(crate::disk::backing_chain(&cfg.disk)?);
        let mut devices: Vec<PathBuf> = jail::DEVICES.iter().map(PathBuf::from).collect();
        if self.accel == Accel::Kvm {
            devices.push("/dev/kvm".into());
        }
        let fds = VmFds {
            qmp: qmp.as_raw_fd(),
            lifeline: lifeline.as_raw_fd(),
            memory: memory.map(|m| m.as_raw_fd()),
        };
        let jail = Jail::prepare(&JailSpec {
            uid,
            gid: uid,
            groups: Vec::new(),
            netns: cfg.netns.clone(),
            root: self.jail_root.clone(),
            read_only,
            read_write: vec![cfg.disk.clone(), console],
            devices,
            fds: [fds.qmp, fds.lifeline]
                .into_iter()
                .chain(fds.memory)
                .collect(),
            nice: VM_NICE,
        })
        .map_err(|e| HostError::Vmm(format!("cannot prepare the VM's jail: {e}")))?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(cfg.dir.join("qemu.log"))?;
        let group = match &self.cgroups {
            Some(c) => {
                let g = c
                    .prepare(&cfg.id, Limits::for_vm(cfg.memory_mb, cfg.vcpus))
                    .map_err(|e| HostError::Vmm(format!("cannot make the VM's cgroup: {e}")))?;
                Some(g)
            }
            None => None,
        };
        let mut child = tokio::process::Command::new(&self.binary_path);
        child
            .args(self.args(cfg, incoming, &fds)?)
            .env_clear()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: `Jail::enter` runs in the forked child before exec; it makes only system
        // calls on memory prepared before the fork (see its documentation).
        unsafe {
            child.pre_exec(move || jail.enter());
        }
        let mut child = match child.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let (Some(c), Some(_)) = (&self.cgroups, &group) {
                    c.remove(&cfg.id).await;
                }
                return Err(with_qemu_log(
                    cfg,
                    HostError::Vmm(format!("cannot start {}: {e}", self.binary)),
                ));
            }
        };
        let started = async {
            let pid = child
                .id()
                .ok_or_else(|| HostError::Vmm("qemu exited at once".into()))?;
            // The spawn returned after the exec: a QEMU that cannot start at all exits at
            // once; wait for its name so that is reported here, with its log.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !comm(pid).is_some_and(|c| c.starts_with("qemu-system")) {
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(cfg.dir.join("qemu.log")).unwrap_or_default();
                    return Err(HostError::Vmm(format!(
                        "qemu exited at start ({status}): {}",
                        log.trim()
                    )));
                }
                if std::time::Instant::now() > deadline {
                    let _ = child.kill().await;
                    return Err(HostError::Vmm("qemu did not start within 5 s".into()));
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            let start_time = process_start_time(pid)
                .ok_or_else(|| HostError::Vmm("qemu vanished right after starting".into()))?;
            Ok((pid, start_time))
        }
        .await;
        let (pid, start_time) = match started {
            Ok(p) => p,
            Err(e) => {
                if let (Some(c), Some(_)) = (&self.cgroups, &group) {
                    c.remove(&cfg.id).await;
                }
                return Err(e);
            }
        };
        if let Some(g) = &group {
            join_cgroup(&cfg.id, g.procs(), pid, start_time);
        }
        // Reap the process whenever it exits so it never lingers as a zombie.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        Ok(VmProcess {
            pid,
            start_time,
            qmp_socket: cfg.qmp_socket.clone(),
            console_log: cfg.dir.join("console.log"),
            lifeline_socket: Some(cfg.lifeline_socket.clone()),
            cgroup: group.map(|_| cfg.id.clone()),
            uid: Some(uid),
        })
    }
}
