//! Network slots of capsules, with their egress policies (`crate::egress`) in place before the
//! VM starts, changed on request, and their domains resolved again every minute.

use std::sync::Arc;

use tracing::{info, warn};
use wrenn_api::NetworkPolicy;
use wrenn_host::{HostError, Phase};

use super::{lock, CapsuleManager, CapsuleRecord, Entry};
use crate::egress;
use crate::error::Result;
use crate::net;

impl CapsuleManager {
    /// Makes the capsule's network slot with its egress policy already enforced (the guest
    /// never runs a moment without it). On failure nothing of the slot is left.
    pub(super) async fn make_slot(&self, record: &CapsuleRecord) -> Result<()> {
        net::create(&record.slot).await?;
        if let Err(e) = self.enforce(record, &record.network).await {
            net::destroy(&record.slot).await;
            return Err(e);
        }
        Ok(())
    }

    /// Resolves `policy` and installs it in the capsule's slot (which must exist).
    async fn enforce(&self, record: &CapsuleRecord, policy: &NetworkPolicy) -> Result<()> {
        let resolved = egress::resolve(policy, &record.id).await;
        if egress::is_open(&resolved) && !lock(&self.egress).contains_key(&record.id) {
            // A new slot has no table to remove: the default policy costs nothing.
            return Ok(());
        }
        egress::apply(&record.slot, &resolved).await?;
        let mut applied = lock(&self.egress);
        if egress::is_open(&resolved) {
            applied.remove(&record.id);
        } else {
            applied.insert(record.id.clone(), resolved);
        }
        Ok(())
    }

    /// Replaces a capsule's policy: in its slot at once while it runs, in its record (what a
    /// resume applies) either way.
    pub(crate) async fn change_network(&self, id: &str, policy: &NetworkPolicy) -> Result<()> {
        let policy = policy.validate().map_err(HostError::InvalidRequest)?;
        let entry = self.entry(id)?;
        let mut state = entry.state.lock().await;
        let record = state
            .as_mut()
            .ok_or_else(|| HostError::NotFound(format!("capsule {id} not found on this host")))?;
        if record.phase == Phase::Running && record.vm.is_some() {
            self.enforce(record, &policy).await?;
        }
        record.network = policy;
        self.persist(record)?;
        info!(
            capsule_id = id,
            internet = record.network.internet,
            allow_out = record.network.allow_out.len(),
            deny_out = record.network.deny_out.len(),
            "egress policy applied"
        );
        Ok(())
    }

    /// Resolves the domains of every running capsule's policy again and updates the slots
    /// whose addresses changed; forgets capsules that no longer run.
    pub(super) async fn refresh_egress(&self) {
        let entries: Vec<(String, Arc<Entry>)> = lock(&self.capsules)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut live = std::collections::HashSet::new();
        for (id, entry) in entries {
            // A capsule mid-operation is skipped: its policy is applied by that operation.
            let Ok(state) = entry.state.try_lock() else {
                live.insert(id);
                continue;
            };
            let Some(record) = state.as_ref().filter(|r| r.phase == Phase::Running) else {
                continue;
            };
            live.insert(id.clone());
            if !record.network.names_domains() {
                continue;
            }
            let resolved = egress::resolve(&record.network, &id).await;
            if lock(&self.egress).get(&id) == Some(&resolved) {
                continue;
            }
            if let Err(e) = self.enforce(record, &record.network).await {
                warn!(capsule_id = %id, error = %e, "cannot refresh an egress policy");
            }
        }
        lock(&self.egress).retain(|id, _| live.contains(id));
    }
}
