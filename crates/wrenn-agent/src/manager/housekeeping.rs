//! Per-shape template snapshots (`<images>/snapshots/<key>/`: one per template and vcpus /
//! memory / disk shape, see `create`) are made on first use and would otherwise pile up:
//! every capsule using one holds a marker in its `users/` (written under the snapshot's lock,
//! removed when the capsule is destroyed), and a snapshot without users whose last use (the
//! `users/` directory's modification time) is older than the idle limit is removed, under the
//! same lock, so a create can never pick one that is going. Several agents may share the images
//! directory: markers are per capsule, so none removes what another's capsules use. Snapshots
//! made before markers existed (no `users/`) are never removed automatically: a capsule paused
//! since then may still sit on one.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};
use wrenn_host::ShapeSnapshot;

use super::CapsuleManager;

/// How often unused per-shape template snapshots are looked for.
const COLLECT_EVERY: Duration = Duration::from_secs(600);

/// Bytes a directory's files take on disk (allocated blocks: `ram` files are sparse).
fn allocated_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.blocks() * 512)
        .sum()
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).ok()?.modified().ok()
}

impl CapsuleManager {
    fn shape_snapshot_dirs(&self) -> Vec<PathBuf> {
        let root = self.cfg.images_dir().join("snapshots");
        std::fs::read_dir(root)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            // Published ones only: `<key>.tmp` is being made, `<key>.lock` is its lock.
            .filter(|p| p.extension().is_none() && p.join("state").exists())
            .collect()
    }

    /// What the per-shape template snapshots on this host hold, and what they were made from.
    pub(crate) fn shape_snapshots(&self) -> Vec<ShapeSnapshot> {
        let images: Vec<(String, PathBuf)> = crate::images::TEMPLATES
            .iter()
            .filter_map(|r| Some((r.name.to_string(), self.images.rootfs_path(r.name)?)))
            .collect();
        let data_snapshots = self.cfg.data_dir.join("snapshots");
        self.shape_snapshot_dirs()
            .into_iter()
            .map(|dir| {
                let source =
                    PathBuf::from(std::fs::read_to_string(dir.join("source")).unwrap_or_default());
                let users = dir.join("users");
                ShapeSnapshot {
                    key: dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    image: images
                        .iter()
                        .find(|(_, p)| *p == source)
                        .map(|(n, _)| n.clone()),
                    // A built base template's disk: `<data>/snapshots/<id>/disk.qcow2`.
                    snapshot_id: source
                        .parent()
                        .filter(|p| p.parent() == Some(data_snapshots.as_path()))
                        .and_then(|p| p.file_name())
                        .map(|n| n.to_string_lossy().into_owned()),
                    bytes: allocated_bytes(&dir),
                    users: std::fs::read_dir(&users).map(|d| d.count()).unwrap_or(0) as u32,
                    last_used: modified(&users)
                        .or_else(|| modified(&dir))
                        .map(chrono::DateTime::<chrono::Utc>::from),
                }
            })
            .collect()
    }

    /// Collects unused per-shape template snapshots (see [`Self::collect_shape_snapshots`]) at
    /// most every [`COLLECT_EVERY`].
    pub(super) async fn collect_shape_snapshots_now_and_then(&self) {
        let Some(idle) = self.cfg.shape_snapshot_idle else {
            return;
        };
        {
            let mut at = super::lock(&self.collected_at);
            if at.is_some_and(|t| t.elapsed() < COLLECT_EVERY) {
                return;
            }
            *at = Some(std::time::Instant::now());
        }
        self.collect_shape_snapshots(idle).await;
    }

    /// Removes the per-shape template snapshots no capsule has used for `idle`; the removed
    /// directories.
    pub async fn collect_shape_snapshots(&self, idle: Duration) -> Vec<PathBuf> {
        let mut removed = Vec::new();
        for dir in self.shape_snapshot_dirs() {
            let users = dir.join("users");
            let Some(last_used) = modified(&users) else {
                continue; // made before markers existed: its users are unknown
            };
            let old = SystemTime::now()
                .duration_since(last_used)
                .is_ok_and(|age| age >= idle);
            if !old {
                continue;
            }
            let lock_path = dir.with_extension("lock");
            // Busy (a create is using or making it): next time.
            let Some(_lock) = crate::images::DirLock::try_acquire(&lock_path) else {
                continue;
            };
            if std::fs::read_dir(&users)
                .map(|mut d| d.next().is_some())
                .unwrap_or(true)
            {
                continue;
            }
            let trash = dir.with_extension(format!("gc-{:08x}", rand::random::<u32>()));
            if let Err(e) = std::fs::rename(&dir, &trash) {
                warn!(dir = %dir.display(), error = %e, "cannot collect a template snapshot");
                continue;
            }
            drop(_lock);
            // Gigabytes: removed beside the reaper pass this runs in, not within it.
            tokio::spawn(async move {
                let _ = tokio::fs::remove_dir_all(trash).await;
            });
            info!(dir = %dir.display(), "unused template snapshot removed");
            removed.push(dir);
        }
        // Half-removed ones (an agent stopped mid-way).
        let root = self.cfg.images_dir().join("snapshots");
        for e in std::fs::read_dir(&root).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.contains(".gc-") {
                let _ = tokio::fs::remove_dir_all(e.path()).await;
            }
        }
        removed
    }
}
