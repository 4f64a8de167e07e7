//! Copying a snapshot (a built template) from this host to another, file by file through the
//! control plane: this host describes what it holds ([`CapsuleManager::manifest_of`]) and
//! streams it out, or receives the files of a transfer into `<data>/transfers/<transfer>/`,
//! each kept only when its size and SHA-256 match the manifest, and installs them as the
//! snapshot in one rename. A transfer that is never installed is removed after
//! [`STALE_TRANSFER`] without a write (or by the control plane's `abort_transfer`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tracing::{info, warn};
use wrenn_host::{ByteStream, FileDigest, HostError, SnapshotManifest, SnapshotMeta};

use super::snapshot::{valid_snapshot_id, SNAPSHOT_FILES};
use super::{free_mb, CapsuleManager};
use crate::error::Result;

/// A transfer untouched this long is abandoned (its copier is gone) and removed.
const STALE_TRANSFER: Duration = Duration::from_secs(3600);
/// Free space a received file must leave on the data filesystem.
const KEEP_FREE_MB: u64 = 1024;
/// Chunks a file is streamed in.
const CHUNK: usize = 256 * 1024;

fn known_file(name: &str) -> Result<()> {
    if SNAPSHOT_FILES.contains(&name) {
        Ok(())
    } else {
        Err(HostError::InvalidRequest(format!(
            "a snapshot has no file {name:?}"
        )))
    }
}

impl CapsuleManager {
    fn transfer_dir(&self, transfer: &str) -> Result<PathBuf> {
        // Transfer ids become directory names, like snapshot ids.
        valid_snapshot_id(transfer)?;
        Ok(self.cfg.data_dir.join("transfers").join(transfer))
    }

    pub(crate) fn holds(&self, snapshot_id: &str) -> Result<bool> {
        valid_snapshot_id(snapshot_id)?;
        let dir = self.snapshot_dir(snapshot_id);
        Ok(dir.join("meta.json").exists() && !dir.join("deleted").exists())
    }

    /// The snapshot's files with their digests. Snapshots never change, so it is computed
    /// once and kept beside them (`manifest.json`).
    pub(crate) async fn manifest_of(&self, snapshot_id: &str) -> Result<SnapshotManifest> {
        if !self.holds(snapshot_id)? {
            return Err(HostError::NotFound(format!(
                "snapshot {snapshot_id} is not on this host"
            )));
        }
        let dir = self.snapshot_dir(snapshot_id);
        let meta = self.snapshot_meta(snapshot_id)?;
        if let Ok(bytes) = std::fs::read(dir.join("manifest.json")) {
            if let Ok(m) = serde_json::from_slice::<SnapshotManifest>(&bytes) {
                return Ok(SnapshotManifest { meta, ..m });
            }
        }
        let mut files = Vec::new();
        for name in SNAPSHOT_FILES {
            let path = dir.join(name);
            if path.exists() {
                files.push(digest_file(path, name).await?);
            }
        }
        let manifest = SnapshotManifest { meta, files };
        let json = serde_json::to_vec_pretty(&manifest).map_err(|e| HostError::Io(e.into()))?;
        let tmp = dir.join(format!("manifest.json.tmp-{:08x}", rand::random::<u32>()));
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, dir.join("manifest.json"))?;
        Ok(manifest)
    }

    pub(crate) async fn open_snapshot_file(
        &self,
        snapshot_id: &str,
        file: &str,
    ) -> Result<ByteStream> {
        known_file(file)?;
        if !self.holds(snapshot_id)? {
            return Err(HostError::NotFound(format!(
                "snapshot {snapshot_id} is not on this host"
            )));
        }
        let f = tokio::fs::File::open(self.snapshot_dir(snapshot_id).join(file))
            .await
            .map_err(|e| HostError::NotFound(format!("snapshot {snapshot_id}: {file}: {e}")))?;
        Ok(Box::pin(
            tokio_util::io::ReaderStream::with_capacity(f, CHUNK)
                .map(|r| r.map_err(HostError::from)),
        ))
    }

    /// Receives one file of a transfer: written beside its final name, hashed as it comes,
    /// and renamed only when it has exactly the digest's size and SHA-256.
    pub(crate) async fn receive_snapshot_file(
        &self,
        transfer: &str,
        digest: &FileDigest,
        mut body: ByteStream,
    ) -> Result<()> {
        known_file(&digest.name)?;
        let dir = self.transfer_dir(transfer)?;
        std::fs::create_dir_all(&dir)?;
        if free_mb(&dir) < (digest.size >> 20) + KEEP_FREE_MB {
            return Err(HostError::InvalidState(format!(
                "not enough disk space for {} of {} MiB",
                digest.name,
                digest.size >> 20
            )));
        }
        let part = dir.join(format!("{}.part", digest.name));
        let received = async {
            let mut f = tokio::fs::File::create(&part).await?;
            let mut h = Sha256::new();
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk?;
                size += chunk.len() as u64;
                if size > digest.size {
                    return Err(HostError::InvalidRequest(format!(
                        "{} is larger than its {} bytes",
                        digest.name, digest.size
                    )));
                }
                h.update(&chunk);
                f.write_all(&chunk).await?;
            }
            f.sync_all().await?;
            let sha = hex::encode(h.finalize());
            if size != digest.size || sha != digest.sha256 {
                return Err(HostError::InvalidRequest(format!(
                    "{} arrived as {size} bytes with SHA-256 {sha}, expected {} bytes with {}",
                    digest.name, digest.size, digest.sha256
                )));
            }
            std::fs::rename(&part, dir.join(&digest.name))?;
            Ok(())
        }
        .await;
        if received.is_err() {
            let _ = tokio::fs::remove_file(&part).await;
        }
        received
    }

    /// Makes a transfer's files the snapshot its manifest names (see `Host::install_snapshot`).
    pub(crate) async fn install_transfer(
        &self,
        transfer: &str,
        manifest: &SnapshotManifest,
    ) -> Result<SnapshotMeta> {
        let dir = self.transfer_dir(transfer)?;
        let id = &manifest.meta.id;
        if self.holds(id)? {
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return self.snapshot_meta(id);
        }
        let installed = async {
            let ours = self.machine_name();
            if manifest.files.iter().any(|f| f.name == "state")
                && manifest.meta.machine.as_deref() != Some(ours.as_str())
            {
                return Err(HostError::InvalidRequest(format!(
                    "snapshot {id}'s memory was saved under {}; this host runs {ours}",
                    manifest
                        .meta
                        .machine
                        .as_deref()
                        .unwrap_or("an unrecorded machine")
                )));
            }
            if !manifest.files.iter().any(|f| f.name == "disk.qcow2") {
                return Err(HostError::InvalidRequest(format!(
                    "snapshot {id}: the manifest has no disk"
                )));
            }
            for f in &manifest.files {
                known_file(&f.name)?;
                let len = std::fs::metadata(dir.join(&f.name)).map(|m| m.len()).ok();
                if len != Some(f.size) {
                    return Err(HostError::InvalidRequest(format!(
                        "snapshot {id}: {} has not arrived",
                        f.name
                    )));
                }
            }
            let json =
                serde_json::to_vec_pretty(&manifest.meta).map_err(|e| HostError::Io(e.into()))?;
            std::fs::write(dir.join("meta.json"), json)?;
            std::fs::File::open(dir.join("meta.json"))?.sync_all()?;
            let final_dir = self.snapshot_dir(id);
            std::fs::create_dir_all(final_dir.parent().unwrap_or(Path::new("/")))?;
            match std::fs::rename(&dir, &final_dir) {
                Ok(()) => {
                    if let Some(parent) = final_dir.parent() {
                        std::fs::File::open(parent)?.sync_all()?;
                    }
                    Ok(manifest.meta.clone())
                }
                // Another transfer of the same snapshot finished first.
                Err(_) if self.holds(id)? => self.snapshot_meta(id),
                Err(e) => Err(e.into()),
            }
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        if installed.is_ok() {
            info!(snapshot_id = %id, transfer, "snapshot copied to this host");
        }
        installed
    }

    pub(crate) async fn drop_transfer(&self, transfer: &str) -> Result<()> {
        let dir = self.transfer_dir(transfer)?;
        let _ = tokio::fs::remove_dir_all(&dir).await;
        Ok(())
    }

    /// Removes transfers nobody has written to for [`STALE_TRANSFER`] (their copier died).
    pub(super) async fn collect_stale_transfers(&self) {
        let Ok(dirs) = std::fs::read_dir(self.cfg.data_dir.join("transfers")) else {
            return;
        };
        for d in dirs.flatten() {
            let path = d.path();
            let newest = std::fs::read_dir(&path)
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.metadata().ok()?.modified().ok())
                .chain(d.metadata().ok().and_then(|m| m.modified().ok()))
                .max();
            let stale = newest
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_none_or(|age| age > STALE_TRANSFER);
            if stale {
                warn!(path = %path.display(), "removing an abandoned snapshot transfer");
                let _ = tokio::fs::remove_dir_all(&path).await;
            }
        }
    }
}

/// Size and SHA-256 of a file (read on a blocking thread: snapshots are gigabytes).
async fn digest_file(path: PathBuf, name: &str) -> Result<FileDigest> {
    let name = name.to_string();
    tokio::task::spawn_blocking(move || {
        use std::io::Read;
        let mut f = std::fs::File::open(&path)?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut size = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            size += n as u64;
            h.update(&buf[..n]);
        }
        Ok(FileDigest {
            name,
            size,
            sha256: hex::encode(h.finalize()),
        })
    })
    .await
    .map_err(|e| HostError::Vmm(format!("digest task: {e}")))?
}
