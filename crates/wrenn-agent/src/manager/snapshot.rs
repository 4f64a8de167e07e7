//! User snapshots: live snapshots of running capsules, self-contained on this host, and
//! capsules restored from them.

use std::path::PathBuf;
use std::time::Instant;

use tracing::{info, warn};
use wrenn_host::{HostError, SnapshotMeta};

use super::{lock, running, CapsuleManager, CapsuleRecord};
use crate::error::Result;

/// Snapshot ids become directory names: letters, digits and dashes only.
pub(super) fn valid_snapshot_id(id: &str) -> Result<()> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(HostError::InvalidRequest(format!("bad snapshot id {id:?}")));
    }
    Ok(())
}

impl CapsuleManager {
    pub(super) async fn restore_from_user_snapshot(
        &self,
        record: &mut CapsuleRecord,
        meta: &SnapshotMeta,
    ) -> Result<()> {
        std::fs::create_dir_all(self.capsule_dir(&record.id))?;
        let dir = self.snapshot_dir(&meta.id);
        // Its envd answers to the token of the capsule it was taken from, until it takes ours.
        record.envd_token = std::fs::read_to_string(dir.join(ENVD_TOKEN_FILE))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        self.persist(record)?;
        let mut cfg = self.vm_config(record);
        crate::disk::create_overlay_on_snapshot(&dir.join("disk.qcow2"), &cfg.disk, meta.disk_mb)
            .await?;
        self.make_slot(record).await?;
        let mut state = dir.join("state");
        if self.cfg.template_snapshots {
            match self.split_snapshot_memory(record, meta).await {
                Ok(split) => {
                    cfg.memory = crate::vmm::Memory::PrivateFile(split.join("ram"));
                    state = split.join("state");
                }
                Err(e) => {
                    warn!(capsule_id = %record.id, snapshot_id = %meta.id, error = %e, "restoring the whole saved state instead")
                }
            }
        }
        let shared = matches!(cfg.memory, crate::vmm::Memory::PrivateFile(_));
        let vm = self.vmm.restore(&cfg, &state, shared).await?;
        self.adopt_restored(record, vm).await
    }

    /// The snapshot's memory as a file of its own (`<snapshot>/memory/{ram,state}`), made on
    /// the first restore: capsules then map the RAM copy-on-write, like a template snapshot's,
    /// instead of each reading the whole saved state (a 1 GiB guest: seconds). Made in the
    /// capsule's own network slot before its VM starts, under a lock, published by a rename.
    async fn split_snapshot_memory(
        &self,
        record: &CapsuleRecord,
        meta: &SnapshotMeta,
    ) -> Result<PathBuf> {
        let dir = self.snapshot_dir(&meta.id);
        let split = dir.join("memory");
        if split.join("state").exists() {
            return Ok(split);
        }
        let _lock = crate::images::DirLock::acquire(dir.join("memory.lock")).await?;
        if split.join("state").exists() {
            return Ok(split);
        }
        // The RAM file takes up to the guest's memory.
        if super::free_mb(&dir) < u64::from(meta.memory_mb) + 1024 {
            return Err(HostError::InvalidState(format!(
                "not enough disk space to split off {} MiB of memory",
                meta.memory_mb
            )));
        }
        let tmp = dir.join("memory.tmp");
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        std::fs::create_dir_all(&tmp)?;
        let started = Instant::now();
        let name = format!("split-{}", record.id);
        let mut cfg = self.vm_config(record);
        cfg.id = name.clone();
        cfg.dir = tmp.clone();
        cfg.disk = tmp.join("disk.qcow2");
        cfg.qmp_socket = self.cfg.run_dir().join(format!("{name}.qmp"));
        cfg.lifeline_socket = self.cfg.run_dir().join(format!("{name}.life"));
        cfg.memory = crate::vmm::Memory::SharedFile(tmp.join("ram"));
        let made = async {
            // QEMU opens a disk; the guest never runs, so nothing is written to it.
            crate::disk::create_overlay_on_snapshot(
                &dir.join("disk.qcow2"),
                &cfg.disk,
                meta.disk_mb,
            )
            .await?;
            self.vmm
                .split_memory(&cfg, &dir.join("state"), &tmp.join("state"))
                .await?;
            for f in ["disk.qcow2", "console.log", "qemu.log"] {
                let _ = std::fs::remove_file(tmp.join(f));
            }
            // The RAM was written through a shared mapping: on disk before it is published.
            tokio::fs::File::open(tmp.join("ram"))
                .await?
                .sync_all()
                .await?;
            std::fs::rename(&tmp, &split)?;
            std::fs::File::open(&dir)?.sync_all()?;
            Ok::<_, HostError>(())
        }
        .await;
        let _ = std::fs::remove_file(&cfg.qmp_socket);
        let _ = std::fs::remove_file(&cfg.lifeline_socket);
        match made {
            Ok(()) => {
                info!(snapshot_id = %meta.id, ms = started.elapsed().as_millis() as u64, "snapshot memory split into a shared file");
                Ok(split)
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                Err(e)
            }
        }
    }

    pub(super) fn snapshot_dir(&self, id: &str) -> PathBuf {
        self.cfg.data_dir.join("snapshots").join(id)
    }

    pub(super) fn snapshot_meta(&self, id: &str) -> Result<SnapshotMeta> {
        valid_snapshot_id(id)?;
        let bytes = std::fs::read(self.snapshot_dir(id).join("meta.json"))
            .map_err(|e| HostError::NotFound(format!("snapshot {id} is not on this host ({e})")))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| HostError::Vmm(format!("snapshot {id}: unreadable metadata: {e}")))
    }

    /// A live snapshot of a running capsule: the guest freezes for as long as saving its
    /// memory takes (its disk moves onto a new overlay meanwhile) and runs on; then the frozen
    /// disk layers are flattened into the snapshot, which depends on nothing afterwards.
    pub(crate) async fn take_snapshot(&self, id: &str, snapshot_id: &str) -> Result<SnapshotMeta> {
        valid_snapshot_id(snapshot_id)?;
        let final_dir = self.snapshot_dir(snapshot_id);
        if final_dir.exists() {
            return Err(HostError::AlreadyExists(format!(
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
            let (record, vm) = running(&mut state, id)?;
            let frozen = self.vm_config(record).disk;
            let next = self
                .capsule_dir(id)
                .join(format!("disk-{:08x}.qcow2", rand::random::<u32>()));
            // The new overlay is recorded before the VM moves onto it: a crash at any point
            // leaves a record naming a disk that holds every write (before the move the empty
            // overlay shows its backing file, which still takes the writes; after it, it takes
            // them itself).
            crate::disk::create_overlay_on_live(&frozen, &next).await?;
            record.disk = Some(next.clone());
            if let Err(e) = self.persist(record) {
                let _ = std::fs::remove_file(&next);
                record.disk = Some(frozen.clone());
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(e);
            }
            let result = self
                .vmm
                .snapshot(&vm, &frozen, &next, &tmp.join("state"))
                .await;
            if !next.exists() {
                // It did not move: the frozen layer is still its disk.
                record.disk = Some(frozen.clone());
                self.persist(record)?;
            }
            if let Err(e) = result {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                return Err(e);
            }
            // The saved envd holds this capsule's token: whoever restores it needs it once.
            if let Some(token) = &record.envd_token {
                if let Err(e) =
                    super::write_private(&tmp.join(ENVD_TOKEN_FILE), token.as_bytes(), true)
                {
                    let _ = tokio::fs::remove_dir_all(&tmp).await;
                    return Err(e.into());
                }
            }
            let meta = SnapshotMeta {
                id: snapshot_id.to_string(),
                vcpus: record.vcpus,
                memory_mb: record.memory_mb,
                disk_mb: 0,
                size_bytes: 0,
                machine: Some(self.machine_name()),
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
            // Every file a copy of the snapshot carries (the token too), so a copy's bytes
            // and the snapshot's size agree.
            meta.size_bytes = SNAPSHOT_FILES
                .iter()
                .map(|f| std::fs::metadata(tmp.join(f)).map(|m| m.len()).unwrap_or(0))
                .sum();
            let json = serde_json::to_vec_pretty(&meta).map_err(|e| HostError::Io(e.into()))?;
            std::fs::write(tmp.join("meta.json"), json)?;
            std::fs::rename(&tmp, &final_dir)?;
            Ok::<_, HostError>(())
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
    pub(crate) async fn remove_snapshot(&self, snapshot_id: &str) -> Result<()> {
        valid_snapshot_id(snapshot_id)?;
        let dir = self.snapshot_dir(snapshot_id);
        if !dir.exists() {
            return Ok(());
        }
        std::fs::write(dir.join("deleted"), b"")?;
        self.collect_snapshot(snapshot_id).await;
        Ok(())
    }

    /// Collects every snapshot marked deleted (see [`Self::collect_snapshot`]).
    pub(super) async fn collect_deleted_snapshots(&self) {
        let Ok(dirs) = std::fs::read_dir(self.cfg.data_dir.join("snapshots")) else {
            return;
        };
        let deleted: Vec<String> = dirs
            .flatten()
            .filter(|d| d.path().join("deleted").exists())
            .filter_map(|d| d.file_name().to_str().map(str::to_string))
            .collect();
        for id in deleted {
            self.collect_snapshot(&id).await;
        }
    }

    /// Removes a deleted snapshot's files once no capsule on this host uses them.
    pub(super) async fn collect_snapshot(&self, snapshot_id: &str) {
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
        self.remove_derived_snapshots(&dir.join("disk.qcow2"));
    }
}

impl CapsuleManager {
    /// Removes the per-shape template snapshots made from `source` (a deleted built template's
    /// disk). No capsule uses them: every capsule made from them names that template's
    /// snapshot, which is only deleted once the last of them is gone.
    fn remove_derived_snapshots(&self, source: &std::path::Path) {
        let root = self.cfg.images_dir().join("snapshots");
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return;
        };
        let source = source.to_string_lossy();
        for d in dirs.flatten() {
            let made_from = std::fs::read_to_string(d.path().join("source")).unwrap_or_default();
            if made_from == source {
                info!(dir = %d.path().display(), "removing a template snapshot of a deleted template");
                let _ = std::fs::remove_dir_all(d.path());
            }
        }
    }
}

/// Files of a user snapshot (besides `meta.json`, written per copy).
pub(super) const SNAPSHOT_FILES: &[&str] = &["state", "disk.qcow2", ENVD_TOKEN_FILE];
/// The token the snapshot's envd holds (that of the capsule it was taken from; root only).
/// Absent in snapshots from before tokens and in disk-only ones.
pub(super) const ENVD_TOKEN_FILE: &str = "envd-token";

impl CapsuleManager {
    /// The cache directory of templates made under `key` on this host as it boots today: the
    /// key plus the kernel, the initramfs (envd), the VMM, the accelerator and every base
    /// image, since a memory snapshot only restores under what made it.
    fn cache_dir(&self, key: &str) -> Result<PathBuf> {
        if key.is_empty() || key.len() > 128 || !key.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(HostError::InvalidRequest(format!(
                "bad template cache key {key:?}"
            )));
        }
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        // File names, not paths: they carry the digests of what they were built from, and the
        // cache stays valid when the images directory moves.
        let name = |p: &std::path::Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let mut parts = vec![
            key.to_string(),
            name(&self.boot.initramfs),
            self.boot.kernel.version.clone(),
            self.vmm.version().to_string(),
            self.vmm.accel().as_str().to_string(),
        ];
        for r in crate::images::TEMPLATES {
            if let Some(p) = self.images.rootfs_path(r.name) {
                parts.push(name(&p));
            }
        }
        for p in parts {
            h.update(p.as_bytes());
            h.update([0]);
        }
        Ok(self
            .cfg
            .images_dir()
            .join("templates")
            .join(hex::encode(&h.finalize()[..16])))
    }

    /// Keeps a user snapshot's files in the template cache (hard links where the filesystem
    /// allows, copies elsewhere). An existing entry stays as it is.
    pub(crate) async fn keep_in_cache(&self, snapshot_id: &str, key: &str) -> Result<()> {
        let meta = self.snapshot_meta(snapshot_id)?;
        let dir = self.cache_dir(key)?;
        if dir.join("meta.json").exists() {
            return Ok(());
        }
        let src = self.snapshot_dir(snapshot_id);
        let tmp = dir.with_extension(format!("tmp-{:08x}", rand::random::<u32>()));
        let result = link_files(&src, &tmp, &meta).await;
        let result = match result {
            Ok(()) => std::fs::rename(&tmp, &dir).map_err(HostError::from),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
        }
        // Another agent sharing the images directory may have cached it first.
        if dir.join("meta.json").exists() {
            info!(snapshot_id, key, "template cached");
            return Ok(());
        }
        result
    }

    /// The cached template made under `key`, linked in as user snapshot `snapshot_id`.
    pub(crate) async fn adopt_from_cache(
        &self,
        key: &str,
        snapshot_id: &str,
    ) -> Result<Option<SnapshotMeta>> {
        valid_snapshot_id(snapshot_id)?;
        let dir = self.cache_dir(key)?;
        let Ok(bytes) = std::fs::read(dir.join("meta.json")) else {
            return Ok(None);
        };
        let mut meta: SnapshotMeta = serde_json::from_slice(&bytes)
            .map_err(|e| HostError::Vmm(format!("cached template {key}: {e}")))?;
        meta.id = snapshot_id.to_string();
        // The cache key matched this host's VMM, accelerator and kernel; on this host the rest
        // of the machine is the same too.
        if meta.machine.is_none() {
            meta.machine = Some(self.machine_name());
        }
        let final_dir = self.snapshot_dir(snapshot_id);
        if final_dir.exists() {
            return Err(HostError::AlreadyExists(format!(
                "snapshot {snapshot_id} exists"
            )));
        }
        let tmp = final_dir.with_extension("tmp");
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        if let Err(e) = link_files(&dir, &tmp, &meta).await {
            let _ = tokio::fs::remove_dir_all(&tmp).await;
            return Err(e);
        }
        std::fs::rename(&tmp, &final_dir)?;
        info!(snapshot_id, key, "template adopted from the cache");
        Ok(Some(meta))
    }
}

/// Makes `to` hold `from`'s snapshot files (linked, else copied) and `meta` as its meta.json.
async fn link_files(
    from: &std::path::Path,
    to: &std::path::Path,
    meta: &SnapshotMeta,
) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for f in SNAPSHOT_FILES {
        let (a, b) = (from.join(f), to.join(f));
        if *f == ENVD_TOKEN_FILE && !a.exists() {
            continue;
        }
        if std::fs::hard_link(&a, &b).is_err() {
            tokio::fs::copy(&a, &b).await?;
        }
    }
    let json = serde_json::to_vec_pretty(meta).map_err(|e| HostError::Io(e.into()))?;
    std::fs::write(to.join("meta.json"), json)?;
    Ok(())
}

impl CapsuleManager {
    /// Pulls an OCI image and stores it as a disk-only user snapshot (see `oci`). Nothing is
    /// left behind when it fails.
    pub(crate) async fn import_oci(
        &self,
        reference: &str,
        credentials: Option<&wrenn_host::RegistryCredentials>,
        snapshot_id: &str,
        disk_mb: u64,
    ) -> Result<wrenn_host::ImportedImage> {
        valid_snapshot_id(snapshot_id)?;
        if !(512..=1024 * 1024).contains(&disk_mb) {
            return Err(HostError::InvalidRequest(format!(
                "bad disk size {disk_mb} MiB"
            )));
        }
        let final_dir = self.snapshot_dir(snapshot_id);
        if final_dir.exists() {
            return Err(HostError::AlreadyExists(format!(
                "snapshot {snapshot_id} exists"
            )));
        }
        let work = self.cfg.data_dir.join("imports").join(snapshot_id);
        let tmp = final_dir.with_extension("tmp");
        let _ = tokio::fs::remove_dir_all(&work).await;
        let _ = tokio::fs::remove_dir_all(&tmp).await;
        std::fs::create_dir_all(&work)?;
        std::fs::create_dir_all(&tmp)?;
        let started = Instant::now();
        let mut notes = Vec::new();
        let made = async {
            let root = work.join("rootfs");
            let config = crate::oci::pull(reference, credentials, &work, &root, &mut notes).await?;
            let defaults = crate::oci::defaults(&config, &root);
            crate::oci::make_disk(&root, &defaults, disk_mb, &tmp.join("disk.qcow2")).await?;
            let meta = SnapshotMeta {
                id: snapshot_id.to_string(),
                vcpus: 1,
                memory_mb: 512,
                disk_mb,
                size_bytes: std::fs::metadata(tmp.join("disk.qcow2"))?.len(),
                machine: None,
            };
            let json = serde_json::to_vec_pretty(&meta).map_err(|e| HostError::Io(e.into()))?;
            std::fs::write(tmp.join("meta.json"), json)?;
            std::fs::rename(&tmp, &final_dir)?;
            Ok::<_, HostError>(meta)
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        match made {
            Ok(meta) => {
                notes.push(format!(
                    "disk of {disk_mb} MiB made in {} ms ({} MiB allocated)",
                    started.elapsed().as_millis(),
                    meta.size_bytes >> 20
                ));
                info!(
                    snapshot_id,
                    reference,
                    ms = started.elapsed().as_millis() as u64,
                    "OCI image imported"
                );
                Ok(wrenn_host::ImportedImage { meta, notes })
            }
            Err(e) => {
                let _ = tokio::fs::remove_dir_all(&tmp).await;
                Err(e)
            }
        }
    }
}
