//! Destroy, pause and resume of existing capsules.

use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_host::{CapsuleInfo, HostError, Phase};

use super::{lock, running, CapsuleManager, CapsuleRecord, SAVED_STATE};
use crate::error::Result;
use crate::net;

impl CapsuleManager {
    /// Destroys a capsule and everything it holds. Returns false when it did not exist.
    pub(crate) async fn destroy_capsule(&self, id: &str) -> Result<bool> {
        let Some(entry) = lock(&self.capsules).get(id).cloned() else {
            return Ok(false);
        };
        let mut state = entry.state.lock().await;
        let Some(record) = state.take() else {
            return Ok(false);
        };
        self.teardown(&record).await;
        lock(&self.capsules).remove(id);
        lock(&self.metrics).remove(id);
        drop(state);
        if let Some(snap) = &record.snapshot {
            self.collect_snapshot(snap).await;
        }
        info!(capsule_id = id, "capsule destroyed");
        Ok(true)
    }

    /// Saves a running capsule (processes, memory, open files, disk) to files in its directory,
    /// then stops its VM and removes its network slot; the slot's number (so its host-reachable
    /// address) stays reserved for the resume. On failure the capsule runs on, or, when even
    /// resuming its frozen VM fails, it is destroyed and the error says so.
    pub(crate) async fn pause_capsule(&self, id: &str) -> Result<()> {
        let entry = self.entry(id)?;
        let mut state = entry.state.lock().await;
        let (record, vm) = running(&mut state, id)?;
        // The saved state takes up to the guest's memory.
        self.ensure_disk_room(u64::from(record.memory_mb), "pausing this capsule")?;
        let started = Instant::now();
        record.phase = Phase::Pausing;
        self.persist(record)?;
        let saved = self.capsule_dir(id).join(SAVED_STATE);
        if let Err(e) = self.vmm.save(&vm, &saved, false).await {
            let _ = std::fs::remove_file(&saved);
            match self.vmm.thaw(&vm).await {
                Ok(()) => {
                    warn!(capsule_id = id, error = %e, "pause failed; the capsule runs on");
                    record.phase = Phase::Running;
                    self.persist(record)?;
                    return Err(e);
                }
                Err(thaw) => {
                    warn!(capsule_id = id, error = %e, thaw = %thaw, "pause failed and the VM cannot run on; destroying it");
                    if let Some(r) = state.take() {
                        self.teardown(&r).await;
                    }
                    lock(&self.capsules).remove(id);
                    return Err(HostError::Vmm(format!(
                        "pause failed ({e}) and the frozen VM could not be resumed ({thaw}); the capsule was destroyed"
                    )));
                }
            }
        }
        let saved_ms = started.elapsed().as_millis() as u64;
        record.vm_gone.cancel();
        record.vm_gone = CancellationToken::new();
        if let Err(e) = self.vmm.shutdown(&vm).await {
            warn!(capsule_id = id, error = %e, "stopping the saved VM failed");
        }
        net::destroy(&record.slot).await;
        record.vm = None;
        record.phase = Phase::Paused;
        self.persist(record)?;
        self.save_metrics(id);
        info!(
            capsule_id = id,
            saved_ms,
            ms = started.elapsed().as_millis() as u64,
            state_bytes = std::fs::metadata(&saved).map(|m| m.len()).unwrap_or(0),
            "capsule paused"
        );
        Ok(())
    }

    /// Restores a paused capsule into the same network slot and returns once envd answers
    /// (its clock set, its entropy reseeded). On failure it stays paused, files intact.
    pub(crate) async fn resume_capsule(&self, id: &str) -> Result<CapsuleInfo> {
        self.ensure_disk_room(super::MIN_DISK_ROOM_MB, "resuming a capsule")?;
        let entry = self.entry(id)?;
        let mut state = entry.state.lock().await;
        let record = state
            .as_mut()
            .filter(|r| r.phase == Phase::Paused)
            .ok_or_else(|| HostError::InvalidState(format!("capsule {id} is not paused")))?;
        let _turn = self.starts.acquire().await;
        let started = Instant::now();
        let saved = self.capsule_dir(id).join(SAVED_STATE);
        if !saved.exists() {
            return Err(HostError::Vmm(format!(
                "capsule {id} has no saved state to resume from"
            )));
        }
        record.phase = Phase::Resuming;
        self.persist(record)?;
        match self.restore_vm(record, &saved).await {
            Ok(()) => {
                record.phase = Phase::Running;
                self.persist(record)?;
                let _ = std::fs::remove_file(&saved);
                info!(
                    capsule_id = id,
                    ms = started.elapsed().as_millis() as u64,
                    "capsule resumed"
                );
                Ok(self.info(record))
            }
            Err(e) => {
                warn!(capsule_id = id, error = %e, "resume failed; the capsule stays paused");
                record.vm_gone.cancel();
                record.vm_gone = CancellationToken::new();
                if let Some(vm) = record.vm.take() {
                    let _ = self.vmm.stop(&vm).await;
                }
                net::destroy(&record.slot).await;
                record.phase = Phase::Paused;
                self.persist(record)?;
                Err(e)
            }
        }
    }

    pub(super) async fn restore_vm(
        &self,
        record: &mut CapsuleRecord,
        saved: &std::path::Path,
    ) -> Result<()> {
        self.make_slot(record).await?;
        let cfg = self.vm_config(record);
        let vm = self.vmm.restore(&cfg, saved, false).await?;
        record.vm = Some(vm.clone());
        self.persist(record)?;
        let deadline = Instant::now() + self.cfg.boot_timeout;
        self.wait_for_envd(record, &vm, deadline).await?;
        // Its memory holds its token already.
        Ok(self.envd_for(record).restored(None).await?)
    }
}
