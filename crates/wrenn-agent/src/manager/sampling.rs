//! Metrics: every running capsule's VMM process sampled every 500 ms into its rings (and its
//! console log kept bounded, `crate::console`).

use std::sync::Arc;
use std::time::Instant;

use tracing::warn;
use wrenn_api::{MetricPoint, MetricsRange};
use wrenn_host::{HostError, Phase};

use super::{lock, CapsuleManager, Entry};
use crate::error::Result;

/// One capsule's metric rings and the last CPU reading they are computed from.
#[derive(Default)]
pub(super) struct Sampler {
    pub(super) rings: crate::metrics::Rings,
    /// CPU seconds used and when they were read.
    pub(super) last_cpu: Option<(f64, Instant)>,
}

impl CapsuleManager {
    /// Takes one metrics sample of every running capsule (skipping any that is mid-operation).
    pub(super) fn sample_metrics(&self) {
        let entries: Vec<(String, Arc<Entry>)> = lock(&self.capsules)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let now = Instant::now();
        let unix = chrono::Utc::now().timestamp();
        for (id, entry) in entries {
            let Ok(state) = entry.state.try_lock() else {
                continue;
            };
            let Some(r) = state.as_ref().filter(|r| r.phase == Phase::Running) else {
                continue;
            };
            let Some(vm) = &r.vm else { continue };
            let Some(usage) = self.vmm.usage(vm) else {
                continue;
            };
            // The guest decides how much it prints: its console log is kept a bounded ring.
            crate::console::bound(&vm.console_log);
            let disk = crate::metrics::allocated_disk_bytes(&self.capsule_dir(&id));
            let vcpus = f64::from(r.vcpus.max(1));
            drop(state);
            let mut all = lock(&self.metrics);
            let s = all.entry(id).or_default();
            let cpu_pct = match s.last_cpu {
                Some((used0, at)) if usage.cpu_seconds >= used0 => {
                    let secs = now.duration_since(at).as_secs_f64().max(1e-3);
                    ((usage.cpu_seconds - used0) / secs / vcpus * 100.0).clamp(0.0, 100.0)
                }
                _ => 0.0,
            };
            s.last_cpu = Some((usage.cpu_seconds, now));
            s.rings.push(MetricPoint {
                timestamp_unix: unix,
                cpu_pct,
                mem_bytes: usage.memory_bytes,
                disk_bytes: disk,
            });
        }
    }

    /// Metric points of a capsule on this host (running, or paused: the points kept at pause).
    pub(crate) fn metric_points(&self, id: &str, range: MetricsRange) -> Result<Vec<MetricPoint>> {
        let tier = crate::metrics::Tier::for_range(range);
        if !lock(&self.capsules).contains_key(id) {
            return Err(HostError::NotFound(format!(
                "capsule {id} not found on this host"
            )));
        }
        let now = chrono::Utc::now().timestamp();
        Ok(lock(&self.metrics)
            .get(id)
            .map(|s| s.rings.query(tier, range.seconds(), now))
            .unwrap_or_default())
    }

    /// Saves a capsule's rings beside it (at pause), so they survive an agent restart.
    pub(super) fn save_metrics(&self, id: &str) {
        let rings = lock(&self.metrics).get(id).map(|s| s.rings.clone());
        if let Some(rings) = rings {
            if let Err(e) = rings.save(&self.capsule_dir(id).join("metrics.json")) {
                warn!(capsule_id = id, error = %e, "cannot save metrics");
            }
        }
        // The next CPU reading comes from a new VMM process.
        if let Some(s) = lock(&self.metrics).get_mut(id) {
            s.last_cpu = None;
        }
    }
}
