//! Template files on every host: a capsule from a built template may be placed on a host that
//! does not hold the template's snapshot yet; before it boots there, the control plane copies
//! the files to it from a host that does, streaming each file from one agent to the other
//! (nothing is stored here) and letting the receiver check every file's size and SHA-256
//! against the holder's manifest before it installs the snapshot in one rename.
//!
//! Only shared hosts serve copies: a tenant's (BYOC) host receives them like any other but
//! is never a source, since it could lie about the bytes and the digests alike.
//!
//! Placement prefers hosts that hold the template (`HostPool::place` with `prefer`), so a copy
//! is made only when none of them has room, or when the capsule's team runs on hosts of its
//! own (BYOC). Copies are recorded in `template_copies`; deleting a template deletes them on
//! their hosts too (capsules running from a copy keep it until they are gone, as on the host
//! that made it), and copies whose host could not be reached then are deleted by a later
//! reconcile pass.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::{info, warn};
use wrenn_host::{Host, HostError};

use super::pool::{HostHandle, HostPool};
use crate::store::Store;

/// Deadline of a manifest: the holder hashes the files the first time (gigabytes).
const MANIFEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Deadline of the short calls (holds, install, abort).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);
/// A file may take this long plus a second per [`SLOWEST_RATE`] bytes.
const FILE_TIMEOUT_BASE: Duration = Duration::from_secs(60);
const SLOWEST_RATE: u64 = 4 << 20;

/// What a create needs on its host before it boots: the template's snapshot.
#[derive(Debug, Clone)]
pub struct CopyPlan {
    pub snapshot_id: String,
    /// Hosts known to hold it (the one that made it first).
    pub holders: Vec<String>,
    /// Copy the saved memory too (a snapshot template); a base template needs its disk only.
    pub with_memory: bool,
}

/// Held while a snapshot is copied to a host.
type Gate = Arc<tokio::sync::Mutex<()>>;

/// Makes templates' snapshots present on the hosts capsules are placed on.
pub struct TemplateCopies {
    store: Store,
    pool: Arc<HostPool>,
    /// One copy of a snapshot to a host at a time; later creates wait for it and find it there.
    gates: Mutex<HashMap<(String, String), Gate>>,
}

async fn deadline<T>(
    limit: Duration,
    what: &str,
    call: impl std::future::Future<Output = Result<T, HostError>>,
) -> Result<T, HostError> {
    tokio::time::timeout(limit, call)
        .await
        .map_err(|_| HostError::Unreachable(format!("{what} took longer than {limit:?}")))?
}

impl TemplateCopies {
    pub fn new(store: Store, pool: Arc<HostPool>) -> Self {
        Self {
            store,
            pool,
            gates: Mutex::new(HashMap::new()),
        }
    }

    fn gate(&self, host_id: &str, snapshot_id: &str) -> Gate {
        self.gates
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((host_id.to_string(), snapshot_id.to_string()))
            .or_default()
            .clone()
    }

    /// Makes `dest` hold the plan's snapshot, copying it from a reachable holder if needed.
    pub async fn ensure(&self, dest: &HostHandle, plan: &CopyPlan) -> Result<(), HostError> {
        let id = &plan.snapshot_id;
        let gate = self.gate(dest.host_id(), id);
        let _one_at_a_time = gate.lock().await;
        let origin = plan.holders.first().map(String::as_str);
        let recorded = plan.holders.iter().any(|h| h == dest.host_id());
        let holds = deadline(
            CALL_TIMEOUT,
            "holds_snapshot",
            dest.holds_snapshot(id.clone()),
        )
        .await?;
        if holds {
            // A copy installed whose record was lost (a crash, a failed write): recorded now,
            // so that deleting the template deletes it too.
            if !recorded && origin != Some(dest.host_id()) {
                self.record(id, dest.host_id(), 0).await;
            }
            return Ok(());
        }
        if recorded && origin != Some(dest.host_id()) {
            // The host lost its copy (its data directory was wiped): copied again below.
            warn!(snapshot_id = %id, host_id = dest.host_id(), "a recorded template copy is missing");
            let _ = self.store.remove_template_copy(id, dest.host_id()).await;
        }
        let mut last = None;
        for holder in plan.holders.iter().filter(|h| *h != dest.host_id()) {
            // A tenant's (BYOC) host may hold a copy, but never serves one: it could lie
            // about the bytes and their digests alike.
            match self.store.host(holder).await {
                Ok(Some(h)) if h.team_id.is_none() => {}
                _ => continue,
            }
            let source = match self.pool.online(holder).await {
                Ok(s) => s,
                Err(e) => {
                    last = Some(HostError::Unreachable(e.message));
                    continue;
                }
            };
            let started = std::time::Instant::now();
            match copy_snapshot(&*source, &**dest, id, plan.with_memory).await {
                Ok(bytes) => {
                    info!(
                        snapshot_id = %id,
                        from = holder,
                        to = dest.host_id(),
                        ms = started.elapsed().as_millis() as u64,
                        "template files copied"
                    );
                    self.record(id, dest.host_id(), bytes).await;
                    return Ok(());
                }
                Err(e) => {
                    warn!(snapshot_id = %id, from = holder, to = dest.host_id(), error = %e, "copying template files failed");
                    last = Some(e);
                }
            }
        }
        Err(match last {
            Some(e) => HostError::Unreachable(format!(
                "the template's files could not be copied to host {}: {e}",
                dest.host_id()
            )),
            None => HostError::NotFound(format!("no host holds snapshot {id}")),
        })
    }

    async fn record(&self, snapshot_id: &str, host_id: &str, bytes: u64) {
        if let Err(e) = self
            .store
            .add_template_copy(snapshot_id, host_id, bytes)
            .await
        {
            warn!(snapshot_id, host_id, error = %e, "cannot record a template copy");
        }
    }

    /// Deletes the copies of `snapshot_id` (its template is gone); a host that cannot be
    /// reached now keeps its row for [`Self::collect_orphans`].
    pub async fn delete_all(&self, snapshot_id: &str) {
        let hosts = match self.store.template_copies(snapshot_id).await {
            Ok(h) => h,
            Err(e) => {
                warn!(snapshot_id, error = %e, "cannot list template copies");
                return;
            }
        };
        for host_id in hosts {
            self.delete_one(snapshot_id, &host_id).await;
        }
    }

    /// Deletes copies left by templates deleted while their host was away.
    pub async fn collect_orphans(&self) -> Result<(), String> {
        let orphans = self
            .store
            .orphaned_template_copies()
            .await
            .map_err(|e| e.to_string())?;
        for (snapshot_id, host_id) in orphans {
            self.delete_one(&snapshot_id, &host_id).await;
        }
        Ok(())
    }

    async fn delete_one(&self, snapshot_id: &str, host_id: &str) {
        let gone = match self.pool.online(host_id).await.ok() {
            Some(h) => match deadline(
                CALL_TIMEOUT,
                "delete_snapshot",
                h.delete_snapshot(snapshot_id.to_string()),
            )
            .await
            {
                Ok(()) => true,
                Err(e) => {
                    warn!(snapshot_id, host_id, error = %e, "template copy stays for now");
                    false
                }
            },
            // A host deleted from the platform took its files with it.
            None => matches!(self.store.host(host_id).await, Ok(None)),
        };
        if gone {
            if let Err(e) = self.store.remove_template_copy(snapshot_id, host_id).await {
                warn!(snapshot_id, host_id, error = %e, "cannot forget a deleted template copy");
            }
        }
    }
}

/// Copies snapshot `snapshot_id` from `from` to `to` (only its disk unless `with_memory`);
/// the bytes copied. Whatever fails, `to` keeps nothing of it.
pub async fn copy_snapshot(
    from: &dyn Host,
    to: &dyn Host,
    snapshot_id: &str,
    with_memory: bool,
) -> Result<u64, HostError> {
    let mut manifest = deadline(
        MANIFEST_TIMEOUT,
        "snapshot_manifest",
        from.snapshot_manifest(snapshot_id.to_string()),
    )
    .await?;
    if !with_memory {
        manifest.files.retain(|f| f.name != "state");
    } else {
        // Checked before any byte moves (the receiver checks again before it installs).
        let theirs = deadline(CALL_TIMEOUT, "machine", to.machine()).await?;
        if manifest.meta.machine.as_deref() != Some(theirs.as_str()) {
            return Err(HostError::InvalidRequest(format!(
                "the template's memory was saved under {}; the host runs {theirs}",
                manifest
                    .meta
                    .machine
                    .as_deref()
                    .unwrap_or("an unrecorded machine")
            )));
        }
    }
    let transfer = format!("xfer-{:016x}", rand::random::<u64>());
    let copied = async {
        for f in &manifest.files {
            let limit = FILE_TIMEOUT_BASE + Duration::from_secs(f.size / SLOWEST_RATE);
            let body = deadline(
                CALL_TIMEOUT,
                "read_snapshot_file",
                from.read_snapshot_file(snapshot_id, &f.name),
            )
            .await?;
            deadline(limit, &f.name, to.write_snapshot_file(&transfer, f, body)).await?;
        }
        deadline(
            CALL_TIMEOUT,
            "install_snapshot",
            to.install_snapshot(transfer.clone(), manifest.clone()),
        )
        .await?;
        Ok(manifest.files.iter().map(|f| f.size).sum())
    }
    .await;
    if copied.is_err() {
        if let Err(e) = deadline(
            CALL_TIMEOUT,
            "abort_transfer",
            to.abort_transfer(transfer.clone()),
        )
        .await
        {
            // The receiving agent removes abandoned transfers itself after an hour.
            warn!(snapshot_id, transfer, error = %e, "cannot drop a failed transfer");
        }
    }
    copied
}
