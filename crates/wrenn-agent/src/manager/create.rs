//! Creating capsules: every create is a restore of a template snapshot (made once per
//! template and shape by cold-booting it), or a cold boot when no snapshot can be made.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use envd_client::{EnvdClient, EnvdHealth};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_api::CapsuleSpec;
use wrenn_host::{CapsuleInfo, HostError, Phase, UserSnapshot};

use super::{lock, tail, CapsuleManager, CapsuleRecord, Entry};
use crate::error::Result;
use crate::net::{self, Slot};
use crate::vmm::{VmConfig, VmProcess};

/// A template snapshot: `ram` (guest memory, mapped copy-on-write by every capsule), `state`
/// (devices, without RAM), `disk.qcow2` (the disk at that instant; capsules' overlays sit on it).
/// Never changed once published; capsules' disks depend on it.
pub(super) struct TemplateSnapshot {
    dir: PathBuf,
    disk_mb: u64,
}

impl TemplateSnapshot {
    pub(super) fn ram(&self) -> PathBuf {
        self.dir.join("ram")
    }
    pub(super) fn state(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub(super) fn disk(&self) -> PathBuf {
        self.dir.join("disk.qcow2")
    }
}

/// Marks template snapshot `dir` as used by capsule `id` (a file in its `users/`).
fn use_template_snapshot(dir: &std::path::Path, id: &str) -> Result<()> {
    let users = dir.join("users");
    std::fs::create_dir_all(&users)?;
    std::fs::write(users.join(id), b"")?;
    Ok(())
}

/// Capsule `id` no longer uses template snapshot `dir`. The `users/` directory's modification
/// time is thereby the snapshot's last use.
pub(super) fn release_template_snapshot(dir: &std::path::Path, id: &str) {
    let _ = std::fs::remove_file(dir.join("users").join(id));
}

impl CapsuleManager {
    /// Boots a capsule and returns once envd answers. On any failure nothing is left behind.
    pub(crate) async fn create_capsule(
        &self,
        id: &str,
        spec: &CapsuleSpec,
        from: Option<&UserSnapshot>,
    ) -> Result<CapsuleInfo> {
        self.ensure_disk_room(super::MIN_DISK_ROOM_MB, "a new capsule")?;
        let rootfs = match from {
            // A built base template: its disk, booted like an image.
            Some(s) if s.disk_only => {
                self.snapshot_meta(&s.id)?;
                self.snapshot_dir(&s.id).join("disk.qcow2")
            }
            Some(_) => PathBuf::new(),
            None => self.images.rootfs_path(&spec.template).ok_or_else(|| {
                HostError::InvalidRequest(format!(
                    "template {:?} is not available on this host",
                    spec.template
                ))
            })?,
        };
        let from_meta = match from {
            Some(s) if !s.disk_only => Some(self.snapshot_meta(&s.id)?),
            _ => None,
        };
        let entry = Arc::new(Entry {
            state: tokio::sync::Mutex::new(None),
        });
        // Held for the whole boot so a concurrent destroy waits for a definite outcome.
        let mut state = entry.state.lock().await;
        {
            let mut map = lock(&self.capsules);
            if map.contains_key(id) {
                return Err(HostError::InvalidState(format!(
                    "capsule {id} already exists"
                )));
            }
            map.insert(id.to_string(), entry.clone());
        }
        let slot = match self.allocate_slot() {
            Some(s) => s,
            None => {
                lock(&self.capsules).remove(id);
                return Err(HostError::InvalidState(
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
            template_snapshot: None,
            envd_token: None,
            network: spec.network.clone(),
        };
        // Waits for its turn with the record unpublished: a destroy meanwhile waits on `state`.
        let _turn = self.starts.acquire().await;
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
    pub(super) fn vm_config(&self, record: &CapsuleRecord) -> VmConfig {
        let dir = self.capsule_dir(&record.id);
        VmConfig {
            id: record.id.clone(),
            disk: record
                .disk
                .clone()
                .unwrap_or_else(|| dir.join("disk.qcow2")),
            dir,
            netns: record.slot.netns.clone(),
            uid: record.slot.vm_uid(),
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
    pub(super) async fn boot_vm(
        &self,
        record: &mut CapsuleRecord,
        rootfs: &std::path::Path,
    ) -> Result<()> {
        std::fs::create_dir_all(self.capsule_dir(&record.id))?;
        self.persist(record)?;
        if !self.cfg.template_snapshots {
            return self.cold_boot(record, rootfs).await;
        }
        match self.template_snapshot(record, rootfs).await {
            Ok(snap) => {
                record.template_snapshot = Some(snap.dir.clone());
                self.persist(record)?;
                self.restore_from_template(record, &snap).await
            }
            Err(e) => {
                warn!(capsule_id = %record.id, error = %e, "no template snapshot; cold-booting");
                self.cold_boot(record, rootfs).await
            }
        }
    }

    pub(super) async fn restore_from_template(
        &self,
        record: &mut CapsuleRecord,
        snap: &TemplateSnapshot,
    ) -> Result<()> {
        let mut cfg = self.vm_config(record);
        cfg.memory = crate::vmm::Memory::PrivateFile(snap.ram());
        crate::disk::create_overlay_on_snapshot(&snap.disk(), &cfg.disk, snap.disk_mb).await?;
        self.make_slot(record).await?;
        let vm = self.vmm.restore(&cfg, &snap.state(), true).await?;
        self.adopt_restored(record, vm).await
    }

    /// Records a VM just restored for a new capsule, waits for its envd and tells it it was
    /// restored (clock, entropy).
    pub(super) async fn adopt_restored(
        &self,
        record: &mut CapsuleRecord,
        vm: VmProcess,
    ) -> Result<()> {
        record.vm = Some(vm.clone());
        self.persist(record)?;
        let deadline = Instant::now() + self.cfg.boot_timeout;
        // Reached with the token the snapshot's envd holds (the record has it), which then
        // takes this capsule's own: capsules from one snapshot share no token.
        let health = self.wait_for_envd(record, &vm, deadline).await?;
        let token = health.takes_token().then(super::new_envd_token);
        self.envd_for(record).restored(token.as_deref()).await?;
        if token.is_some() {
            record.envd_token = token;
        }
        record.envd_version = Some(health.envd_version);
        record.kernel_version = Some(health.kernel_version);
        self.persist(record)?;
        Ok(())
    }

    /// The snapshot every capsule of this template and shape is restored from: made once, by
    /// cold-booting the template with its RAM in a file, waiting for envd, and saving the
    /// device state without the RAM (which stays in the file). Shared by agents using the same
    /// images directory (built under a lock, published by a rename).
    pub(super) async fn template_snapshot(
        &self,
        record: &CapsuleRecord,
        rootfs: &std::path::Path,
    ) -> Result<TemplateSnapshot> {
        let base_mb = crate::disk::base_size_mb(rootfs).await?;
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
        std::fs::create_dir_all(&root)?;
        // Under the lock: the collector (`housekeeping`) removes a snapshot only under it and
        // only without users, so one found here stays until this capsule lets go of it.
        let _lock = crate::images::DirLock::acquire(root.join(format!("{key}.lock"))).await?;
        if snap.state().exists() {
            use_template_snapshot(&snap.dir, &record.id)?;
            return Ok(snap);
        }
        let slot = self
            .allocate_slot()
            .ok_or_else(|| HostError::InvalidState("no free network slot on this host".into()))?;
        let tmp = root.join(format!("{key}.tmp"));
        let started = Instant::now();
        let result = self
            .build_template_snapshot(record, rootfs, &slot, &tmp, disk_mb)
            .await;
        net::destroy(&slot).await;
        lock(&self.slots).remove(&slot.index);
        match result {
            Ok(()) => {
                // What it was made from: removed with it when that goes (a built template).
                std::fs::write(tmp.join("source"), rootfs.to_string_lossy().as_bytes())?;
                std::fs::rename(&tmp, &snap.dir)?;
                use_template_snapshot(&snap.dir, &record.id)?;
                info!(template = %record.template, key, ms = started.elapsed().as_millis() as u64, "template snapshot ready");
                Ok(snap)
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                Err(e)
            }
        }
    }

    pub(super) async fn build_template_snapshot(
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
        cfg.uid = slot.vm_uid();
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
                        return Err(HostError::Envd(format!(
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

    pub(super) async fn cold_boot(
        &self,
        record: &mut CapsuleRecord,
        rootfs: &std::path::Path,
    ) -> Result<()> {
        let mut cfg = self.vm_config(record);
        // The envd in the initramfs is this build's: it takes a token from its first boot.
        let token = super::new_envd_token();
        cfg.guest_env
            .push((envd_proto::TOKEN_ENV.to_string(), token.clone()));
        record.envd_token = Some(token);
        crate::disk::create_overlay(rootfs, &cfg.disk, record.disk_size_mb).await?;
        self.make_slot(record).await?;
        let vm = self.vmm.boot(&cfg).await?;
        record.vm = Some(vm.clone());
        self.persist(record)?;
        let deadline = Instant::now() + self.cfg.boot_timeout;
        let health = match self.wait_for_envd(record, &vm, deadline).await {
            Err(HostError::Envd(msg)) => {
                let state = self.vmm.diagnose(&vm).await;
                return Err(HostError::Envd(format!("{msg}; vm: {state}")));
            }
            other => other?,
        };
        record.envd_version = Some(health.envd_version);
        record.kernel_version = Some(health.kernel_version);
        self.persist(record)?;
        Ok(())
    }

    pub(super) async fn wait_for_envd(
        &self,
        record: &CapsuleRecord,
        vm: &VmProcess,
        deadline: Instant,
    ) -> Result<EnvdHealth> {
        // Without the lifeline: a guest still booting is not a broken network to repair.
        let client = self.envd_for(record).with_lifeline(None);
        let started = Instant::now();
        let mut last_err = String::new();
        while Instant::now() < deadline {
            if !self.vmm.is_alive(vm) {
                let qemu_log = vm.console_log.with_file_name("qemu.log");
                return Err(HostError::Vmm(format!(
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
        Err(HostError::Envd(format!(
            "envd did not answer within {:?} ({last_err}); console: {}",
            started.elapsed(),
            tail(&vm.console_log)
        )))
    }
}
