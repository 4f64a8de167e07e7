//! The hosts this control plane can reach, and where a new capsule goes.
//!
//! Every capsule row names its host; [`HostPool::client_for`] turns that into a client (503
//! `host_unavailable` when the host is gone or unreachable). [`HostPool::place`] picks the host
//! for a new capsule: online, connected, with room for its vCPUs and memory (reserved by the
//! capsules holding a VM there, against the host's capacity times an overcommit factor), least
//! loaded first; a team with BYOC hosts of its own uses only those.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use wrenn_agent::rpc::client::RemoteAgent;
use wrenn_agent::rpc::TlsMaterial;
use wrenn_api::{ApiError, CapsuleSpec, ErrorCode, Host};

use crate::host::{HostClient, RemoteHost};
use crate::store::{CapsuleRow, Store};

/// How far reservations may exceed a host's cores and memory. Guests share their template's
/// memory copy-on-write and idle ones use a fraction of a core, so reserving exactly what
/// exists would leave most of a host unused.
#[derive(Debug, Clone, Copy)]
pub struct Overcommit {
    pub cpu: f64,
    pub memory: f64,
}

impl Default for Overcommit {
    fn default() -> Self {
        Self {
            cpu: 16.0,
            memory: 2.0,
        }
    }
}

pub struct HostPool {
    store: Store,
    /// The control plane's client certificate for agents (`None`: no remote hosts, `wrenn up`
    /// before the CA exists).
    tls: Option<TlsMaterial>,
    clients: RwLock<HashMap<String, Arc<dyn HostClient>>>,
    overcommit: Overcommit,
}

fn unavailable(host_id: &str) -> ApiError {
    ApiError::new(
        ErrorCode::HostUnavailable,
        format!("the capsule's host {host_id} is not reachable right now; try again later"),
    )
}

impl HostPool {
    pub fn new(store: Store, tls: Option<TlsMaterial>, overcommit: Overcommit) -> Self {
        Self {
            store,
            tls,
            clients: RwLock::new(HashMap::new()),
            overcommit,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<dyn HostClient>>> {
        self.clients.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<dyn HostClient>>> {
        self.clients.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a host reached another way (the agent embedded in this process).
    pub fn add(&self, client: Arc<dyn HostClient>) {
        self.write().insert(client.host_id().to_string(), client);
    }

    /// A client for a registered remote host (replaced if its address changed).
    pub fn connect(&self, host: &Host) {
        let (Some(address), Some(tls)) = (host.address.as_deref(), &self.tls) else {
            return;
        };
        if let Some(existing) = self.read().get(&host.id) {
            if existing.address() == Some(address) || existing.address().is_none() {
                return;
            }
        }
        match RemoteAgent::new(address, tls) {
            Ok(agent) => {
                tracing::info!(host_id = %host.id, address, "connected to host agent");
                self.write()
                    .insert(host.id.clone(), Arc::new(RemoteHost::new(&host.id, agent)));
            }
            Err(e) => {
                tracing::warn!(host_id = %host.id, address, error = %e, "cannot connect to host agent")
            }
        }
    }

    pub fn remove(&self, host_id: &str) {
        self.write().remove(host_id);
    }

    pub fn get(&self, host_id: &str) -> Option<Arc<dyn HostClient>> {
        self.read().get(host_id).cloned()
    }

    pub fn all(&self) -> Vec<Arc<dyn HostClient>> {
        self.read().values().cloned().collect()
    }

    /// The host of a capsule, if it is online and connected.
    pub async fn client_for(&self, row: &CapsuleRow) -> Result<Arc<dyn HostClient>, ApiError> {
        let id = row.host_id.as_deref().unwrap_or_default();
        self.online(id).await
    }

    /// Host `id`, if online (or draining) and connected.
    pub async fn online(&self, id: &str) -> Result<Arc<dyn HostClient>, ApiError> {
        let client = self.get(id).ok_or_else(|| unavailable(id))?;
        match self.store.host(id).await?.map(|h| h.status) {
            Some(s) if s == "online" || s == "draining" => Ok(client),
            _ => Err(unavailable(id)),
        }
    }

    /// Any online host (to ask what every host has: the platform templates).
    pub async fn any(&self) -> Result<Arc<dyn HostClient>, ApiError> {
        let mut hosts = self.store.hosts(None).await?;
        hosts.sort_by_key(|h| h.team_id.is_some());
        for h in hosts.iter().filter(|h| h.status == "online") {
            if let Some(c) = self.get(&h.id) {
                return Ok(c);
            }
        }
        Err(no_hosts())
    }

    /// The host a new capsule of `team_id` with `spec` goes to.
    pub async fn place(
        &self,
        team_id: &str,
        spec: &CapsuleSpec,
    ) -> Result<Arc<dyn HostClient>, ApiError> {
        let hosts: Vec<Host> = self
            .store
            .hosts(None)
            .await?
            .into_iter()
            .filter(|h| h.status == "online" && self.get(&h.id).is_some())
            .collect();
        let own: Vec<&Host> = hosts
            .iter()
            .filter(|h| h.team_id.as_deref() == Some(team_id))
            .collect();
        let byoc = self.store.team(team_id).await?.is_some_and(|t| t.byoc) && !own.is_empty();
        let candidates: Vec<&Host> = if byoc {
            own
        } else {
            hosts.iter().filter(|h| h.team_id.is_none()).collect()
        };
        let reserved = self.store.reserved_by_host().await?;
        let mut best: Option<(f64, &Host)> = None;
        for h in candidates {
            let (cpus, mem) = reserved.get(&h.id).copied().unwrap_or((0, 0));
            let cap_cpu = h.cpu_cores.unwrap_or(1).max(1) as f64 * self.overcommit.cpu;
            let cap_mem = h.memory_mb.unwrap_or(0).max(0) as f64 * self.overcommit.memory;
            let cpu_after = (cpus + i64::from(spec.vcpus)) as f64;
            let mem_after = (mem + i64::from(spec.memory_mb)) as f64;
            if cpu_after > cap_cpu || mem_after > cap_mem {
                continue;
            }
            let load = (cpu_after / cap_cpu).max(mem_after / cap_mem);
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, h));
            }
        }
        let (_, h) = best.ok_or_else(no_hosts)?;
        self.get(&h.id).ok_or_else(no_hosts)
    }
}

fn no_hosts() -> ApiError {
    ApiError::new(
        ErrorCode::NoHostsAvailable,
        "no host has room for this capsule right now; try again later or ask for fewer resources",
    )
}
