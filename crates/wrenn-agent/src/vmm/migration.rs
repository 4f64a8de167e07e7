//! Saving and loading a VM's state by QEMU migration: into and out of a file the agent opens
//! and hands QEMU as a descriptor (QMP `getfd`, `fd:` URIs), so QEMU needs no path to it and
//! spawns no helper; the agent makes a saved state durable and names it.

use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use super::qmp::Qmp;
use crate::error::{HostError, Result};

/// Freezes the guest and writes its state to `state` (see [`Vmm::save`]), over an open QMP
/// connection (QEMU serves one at a time).
pub(super) async fn save_with(qmp: &mut Qmp, state: &Path, ignore_shared: bool) -> Result<()> {
    // `stop` drains and flushes every disk: the overlay is complete on the host from here.
    qmp.execute("stop", None).await?;
    set_ignore_shared(qmp, ignore_shared).await?;
    // The default cap is 32 MiB/s; the state goes to a local file.
    qmp.execute(
        "migrate-set-parameters",
        Some(serde_json::json!({ "max-bandwidth": 1u64 << 40 })),
    )
    .await?;
    // QEMU writes into a descriptor the agent opened (no path, no helper process: the VMM
    // may spawn nothing); the agent makes it durable and gives it its name, so the final name
    // only ever holds a whole state that is on disk. The sync runs in the agent's cgroup, not
    // under the VM's disk bandwidth limit.
    let tmp = state.with_extension("partial");
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::File::create(&tmp)?;
    let sent = async {
        qmp.pass_fd(STATE_FD, file.as_fd()).await?;
        qmp.execute(
            "migrate",
            Some(serde_json::json!({ "uri": format!("fd:{STATE_FD}") })),
        )
        .await?;
        wait_migration(qmp, "saving the guest").await
    }
    .await;
    if let Err(e) = sent {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let state = state.to_path_buf();
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, &state)?;
        if let Some(dir) = state.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    })
    .await
    .map_err(|e| HostError::Vmm(format!("saving the guest's state: {e}")))??;
    Ok(())
}

/// The name under which a migration's file descriptor is handed to QEMU.
const STATE_FD: &str = "wrenn-state";

async fn set_ignore_shared(qmp: &mut Qmp, on: bool) -> Result<()> {
    qmp.execute(
        "migrate-set-capabilities",
        Some(serde_json::json!({
            "capabilities": [{ "capability": "x-ignore-shared", "state": on }]
        })),
    )
    .await?;
    Ok(())
}

/// Loads `state` into the VM behind `qmp` (started with `-incoming defer`); it stays frozen.
pub(super) async fn load_with(qmp: &mut Qmp, state: &Path, ignore_shared: bool) -> Result<()> {
    set_ignore_shared(qmp, ignore_shared).await?;
    let file = std::fs::File::open(state)?;
    qmp.pass_fd(STATE_FD, file.as_fd()).await?;
    qmp.execute(
        "migrate-incoming",
        Some(serde_json::json!({ "uri": format!("fd:{STATE_FD}") })),
    )
    .await?;
    wait_migration(qmp, "loading the saved guest").await
}

/// How long writing or loading a guest's state may take (a large, busy guest under TCG).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(300);

/// Polls `query-migrate` until the migration ends; `Err` with QEMU's reason when it fails.
async fn wait_migration(qmp: &mut Qmp, what: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + MIGRATION_TIMEOUT;
    loop {
        let info = qmp.execute("query-migrate", None).await?;
        match info.get("status").and_then(|s| s.as_str()) {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => {
                let why = info
                    .get("error-desc")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given");
                return Err(HostError::Vmm(format!("{what} failed: {why}")));
            }
            _ => {}
        }
        if std::time::Instant::now() > deadline {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(HostError::Vmm(format!(
                "{what} did not finish within {MIGRATION_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
