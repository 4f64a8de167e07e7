//! What a previous run of the agent left (re-adopted or removed), and VMs that died under
//! their capsules.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use tracing::{info, warn};
use wrenn_host::{DeadCapsule, Phase};

use super::sampling::Sampler;
use super::{lock, tail, CapsuleManager, CapsuleRecord, Entry, SAVED_STATE};
use crate::net::{self, Slot};

/// Health checks of a VM found running after a restart before it is given up on.
const RECOVERY_HEALTH_ATTEMPTS: u32 = 4;
/// How long one of them may take.
const RECOVERY_HEALTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

impl CapsuleManager {
    /// Removes what interrupted snapshot builds left: half-written user snapshots and memory
    /// splits, and template snapshot builds nobody holds the lock of any more (with their VMs).
    pub(super) async fn remove_interrupted_snapshots(&self) {
        if let Ok(rd) = std::fs::read_dir(self.cfg.data_dir.join("snapshots")) {
            for p in rd.flatten().map(|e| e.path()) {
                if p.extension().is_some_and(|x| x == "tmp") {
                    warn!(dir = %p.display(), "removing an interrupted snapshot");
                    let _ = tokio::fs::remove_dir_all(&p).await;
                    continue;
                }
                // A memory split cut short (`split_snapshot_memory`), with its frozen VM.
                let split = p.join("memory.tmp");
                if split.exists() {
                    let Some(_lock) = crate::images::DirLock::try_acquire(&p.join("memory.lock"))
                    else {
                        continue; // another agent is splitting it right now
                    };
                    for (pid, _) in self.vmm.find_vms(&split.to_string_lossy()) {
                        self.vmm.kill(pid).await;
                    }
                    warn!(dir = %split.display(), "removing an interrupted memory split");
                    let _ = tokio::fs::remove_dir_all(&split).await;
                }
            }
        }
        let root = self.cfg.images_dir().join("snapshots");
        let Ok(rd) = std::fs::read_dir(&root) else {
            return;
        };
        for p in rd.flatten().map(|e| e.path()) {
            if p.extension().is_none_or(|x| x != "tmp") {
                continue;
            }
            let Some(key) = p.file_stem().map(|s| s.to_string_lossy().to_string()) else {
                continue;
            };
            let Some(_lock) =
                crate::images::DirLock::try_acquire(&root.join(format!("{key}.lock")))
            else {
                continue; // another agent is building it right now
            };
            for pid in self.vmm.find_named(&format!("tpl-{key}")) {
                self.vmm.kill(pid).await;
            }
            warn!(dir = %p.display(), "removing an interrupted template snapshot build");
            let _ = tokio::fs::remove_dir_all(&p).await;
        }
    }

    /// Moves a capsule directory the agent cannot make sense of to `<data>/quarantine/`, with
    /// the reason in the log: its disks may hold a user's data.
    fn quarantine(&self, dir: &std::path::Path, why: &str) {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let to = self.cfg.data_dir.join("quarantine").join(format!(
            "{name}-{}",
            chrono::Utc::now().format("%Y%m%dT%H%M%S")
        ));
        let moved = std::fs::create_dir_all(self.cfg.data_dir.join("quarantine"))
            .and_then(|()| std::fs::rename(dir, &to));
        match moved {
            Ok(()) => {
                tracing::error!(dir = %dir.display(), kept_at = %to.display(), why, "capsule directory quarantined")
            }
            Err(e) => {
                tracing::error!(dir = %dir.display(), why, error = %e, "capsule directory cannot be quarantined; left in place")
            }
        }
    }

    /// Re-adopts live VMs from a previous agent run and removes whatever dead ones left.
    pub(super) async fn recover(&self) {
        self.remove_interrupted_snapshots().await;
        let Ok(rd) = std::fs::read_dir(self.cfg.capsules_dir()) else {
            return;
        };
        for dir in rd.flatten().map(|e| e.path()) {
            let record: CapsuleRecord = match std::fs::read(dir.join("state.json")) {
                Ok(bytes) => match serde_json::from_slice(&bytes) {
                    Ok(r) => r,
                    Err(e) => {
                        // A record that cannot be read may still sit beside a user's disk:
                        // kept aside for a human, never deleted.
                        self.quarantine(&dir, &format!("unreadable state.json: {e}"));
                        continue;
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    // A create that stopped before its first record: nothing of a user's yet.
                    warn!(dir = %dir.display(), "capsule directory without state; removing");
                    let _ = tokio::fs::remove_dir_all(&dir).await;
                    continue;
                }
                Err(e) => {
                    self.quarantine(&dir, &format!("state.json cannot be read: {e}"));
                    continue;
                }
            };
            lock(&self.slots).insert(record.slot.index);
            match self.recover_one(record.clone(), &dir).await {
                Some(r) => {
                    info!(capsule_id = %r.id, phase = ?r.phase, "re-adopted capsule");
                    if let Some(rings) =
                        crate::metrics::Rings::load(&self.capsule_dir(&r.id).join("metrics.json"))
                    {
                        lock(&self.metrics).insert(
                            r.id.clone(),
                            Sampler {
                                rings,
                                last_cpu: None,
                            },
                        );
                    }
                    let entry = Arc::new(Entry {
                        state: tokio::sync::Mutex::new(Some(r.clone())),
                    });
                    lock(&self.capsules).insert(r.id.clone(), entry);
                }
                None => {
                    warn!(capsule_id = %record.id, phase = ?record.phase, "capsule did not survive; cleaning up");
                    self.teardown(&record).await;
                }
            }
        }
        // VMs no record accounts for: started by a create or resume the crash cut short before
        // it could record them. Each holds its capsule's disk; none may outlive this moment.
        let adopted: HashMap<String, u32> = {
            let entries: Vec<_> = lock(&self.capsules)
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let mut m = HashMap::new();
            for (id, e) in entries {
                if let Some(pid) = e
                    .state
                    .lock()
                    .await
                    .as_ref()
                    .and_then(|r| r.vm.as_ref())
                    .map(|v| v.pid)
                {
                    m.insert(id, pid);
                }
            }
            m
        };
        let capsules_dir = self.cfg.capsules_dir().to_string_lossy().to_string();
        for (pid, name) in self.vmm.find_vms(&capsules_dir) {
            if adopted.get(&name) != Some(&pid) {
                warn!(capsule_id = %name, pid, "killing a VM no capsule record accounts for");
                // Its disk lock goes with it: `kill` waits, so a resume right after start
                // finds the disk free.
                self.vmm.kill(pid).await;
            }
        }
        // Namespaces no capsule owns are leftovers of a crash between slot creation and persist.
        let owned: BTreeSet<u32> = lock(&self.slots).clone();
        for index in net::existing_slots(self.cfg.slot_base, self.cfg.max_slots) {
            if !owned.contains(&index) {
                net::destroy(&Slot::new(self.cfg.slot_base, index)).await;
            }
        }
    }

    /// Decides what one capsule found at start-up is now: running, paused, or lost (`None`).
    /// A crash in the middle of a pause or resume lands on whichever side is whole.
    pub(super) async fn recover_one(
        &self,
        mut record: CapsuleRecord,
        dir: &std::path::Path,
    ) -> Option<CapsuleRecord> {
        let saved = dir.join(SAVED_STATE);
        let alive = record.vm.as_ref().is_some_and(|vm| self.vmm.is_alive(vm));
        // A live guest on a busy host may miss one answer: a VM is only given up on after
        // several attempts (each bounded), never on one slow reply.
        let healthy = |r: &CapsuleRecord| {
            let client = self.envd_for(r);
            async move {
                for attempt in 0..RECOVERY_HEALTH_ATTEMPTS {
                    if attempt > 0 {
                        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                    }
                    let answer =
                        tokio::time::timeout(RECOVERY_HEALTH_TIMEOUT, client.health()).await;
                    if matches!(answer, Ok(Ok(_))) {
                        return true;
                    }
                }
                false
            }
        };
        let to_paused = |mut r: CapsuleRecord| async move {
            if let Some(vm) = r.vm.take() {
                let _ = self.vmm.stop(&vm).await;
            }
            net::destroy(&r.slot).await;
            r.phase = Phase::Paused;
            self.persist(&r).ok()?;
            Some(r)
        };
        match record.phase {
            Phase::Running => {
                if !alive || record.envd_version.is_none() {
                    return None;
                }
                // Frozen by a pause or live snapshot the crash interrupted, or about to be (a
                // save QEMU carries on alone freezes the guest when it completes): it runs on.
                let vm = record.vm.clone()?;
                self.vmm.thaw(&vm).await.ok()?;
                if !healthy(&record).await {
                    return None;
                }
                // A saved state left by a crash right after a resume is stale.
                let _ = std::fs::remove_file(&saved);
                Some(record)
            }
            Phase::Pausing if saved.exists() => to_paused(record).await,
            Phase::Pausing => {
                // Crashed while saving: the frozen VM, if it lives, simply runs on.
                let vm = record.vm.clone().filter(|_| alive)?;
                self.vmm.thaw(&vm).await.ok()?;
                record.phase = Phase::Running;
                if !healthy(&record).await {
                    return None;
                }
                self.persist(&record).ok()?;
                Some(record)
            }
            Phase::Paused if saved.exists() => to_paused(record).await,
            Phase::Paused => None,
            Phase::Resuming => {
                if alive && healthy(&record).await {
                    record.phase = Phase::Running;
                    self.persist(&record).ok()?;
                    let _ = self.envd_for(&record).restored(None).await;
                    let _ = std::fs::remove_file(&saved);
                    return Some(record);
                }
                if saved.exists() {
                    return to_paused(record).await;
                }
                None
            }
        }
    }

    /// Finds running capsules whose VM died under them (killed, crashed, out of memory),
    /// removes what is left of each, and reports them with the reason.
    pub(crate) async fn reap_dead_vms(&self) -> Vec<DeadCapsule> {
        // Deleted snapshots whose collection was put off (a capsule was busy at that moment)
        // are retried on every pass, so none outlives its capsules for long.
        self.collect_deleted_snapshots().await;
        self.collect_stale_transfers().await;
        self.collect_shape_snapshots_now_and_then().await;
        let entries: Vec<(String, Arc<Entry>)> = lock(&self.capsules)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut dead = Vec::new();
        for (id, entry) in entries {
            // A capsule mid-operation is that operation's to judge.
            let Ok(mut state) = entry.state.try_lock() else {
                continue;
            };
            let gone = state.as_ref().is_some_and(|r| {
                r.phase == Phase::Running && r.vm.as_ref().is_some_and(|vm| !self.vmm.is_alive(vm))
            });
            if !gone {
                continue;
            }
            let Some(record) = state.take() else { continue };
            let vm = record.vm.as_ref();
            let console = vm.map(|v| tail(&v.console_log)).unwrap_or_default();
            let qemu = vm
                .map(|v| tail(&v.console_log.with_file_name("qemu.log")))
                .unwrap_or_default();
            let reason = format!(
                "the VM exited unexpectedly (qemu: {}; console: {})",
                if qemu.is_empty() { "no message" } else { &qemu },
                if console.is_empty() {
                    "empty"
                } else {
                    &console
                }
            );
            warn!(capsule_id = %id, %reason, "VM died");
            self.teardown(&record).await;
            lock(&self.capsules).remove(&id);
            lock(&self.metrics).remove(&id);
            drop(state);
            if let Some(snap) = &record.snapshot {
                self.collect_snapshot(snap).await;
            }
            dead.push(DeadCapsule { id, reason });
        }
        dead
    }
}
