//! The hosts this control plane can reach, and where a new capsule goes.
//!
//! Every capsule row names its host; [`HostPool::client_for`] turns that into a client (503
//! `host_unavailable` when the host is gone or unreachable). [`HostPool::place`] picks the host
//! for a new capsule: online, connected, with room for its vCPUs and memory (reserved by the
//! capsules holding a VM there, against the host's capacity times an overcommit factor), least
//! loaded first; a team with BYOC hosts of its own uses only those.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use wrenn_api::{ApiError, CapsuleSpec, ErrorCode, Host as HostRecord, HostStatus};
use wrenn_host::{Host, RemoteHost, TlsMaterial};

use crate::store::{CapsuleRow, Store};

/// A connected host: its id, and the [`Host`] that reaches it (dereferences to it).
#[derive(Clone)]
pub struct HostHandle {
    id: Arc<str>,
    /// Where a remote agent listens (`None` for the agent in this process).
    address: Option<Arc<str>>,
    host: Arc<dyn Host>,
}

impl HostHandle {
    pub fn host_id(&self) -> &str {
        &self.id
    }
}

impl std::ops::Deref for HostHandle {
    type Target = dyn Host;

    fn deref(&self) -> &(dyn Host + 'static) {
        self.host.as_ref()
    }
}

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
    clients: RwLock<HashMap<String, HostHandle>>,
    overcommit: Overcommit,
    /// Whether each host was up, and when that was read.
    status: Mutex<HashMap<String, (bool, Instant)>>,
}

/// How long a host's status read from the database is trusted.
const STATUS_TTL: Duration = Duration::from_secs(1);

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
            status: Mutex::new(HashMap::new()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, HostHandle>> {
        self.clients.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, HostHandle>> {
        self.clients.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a host reached another way (the agent embedded in this process).
    pub fn add(&self, id: &str, host: Arc<dyn Host>) {
        let handle = HostHandle {
            id: id.into(),
            address: None,
            host,
        };
        self.write().insert(id.to_string(), handle);
    }

    /// A client for a registered remote host (replaced if its address changed).
    pub fn connect(&self, host: &HostRecord) {
        let (Some(address), Some(tls)) = (host.address.as_deref(), &self.tls) else {
            return;
        };
        if let Some(existing) = self.read().get(&host.id) {
            if existing.address.as_deref().is_none_or(|a| a == address) {
                return;
            }
        }
        match RemoteHost::new(&host.id, address, tls) {
            Ok(remote) => {
                tracing::info!(host_id = %host.id, address, "connected to host agent");
                let handle = HostHandle {
                    id: host.id.as_str().into(),
                    address: Some(address.into()),
                    host: Arc::new(remote),
                };
                self.write().insert(host.id.clone(), handle);
            }
            Err(e) => {
                tracing::warn!(host_id = %host.id, address, error = %e, "cannot connect to host agent")
            }
        }
    }

    pub fn get(&self, host_id: &str) -> Option<HostHandle> {
        self.read().get(host_id).cloned()
    }

    /// Every connected host, by id (a stable order for passes over them and their logs).
    pub fn all(&self) -> Vec<HostHandle> {
        let mut all: Vec<HostHandle> = self.read().values().cloned().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// The host of a capsule, if it is online and connected.
    pub async fn client_for(&self, row: &CapsuleRow) -> Result<HostHandle, ApiError> {
        let id = row.host_id.as_deref().unwrap_or_default();
        self.online(id).await
    }

    /// Host `id`, if online (or draining) and connected. The status is read from the
    /// database at most once per [`STATUS_TTL`] per host, so the request path of an exec costs
    /// no extra query while liveness changes (made by any replica) still show within a second.
    pub async fn online(&self, id: &str) -> Result<HostHandle, ApiError> {
        let client = match self.get(id) {
            Some(c) => c,
            None => {
                // Registered through another replica since this one started.
                if let Some(h) = self.store.host(id).await? {
                    self.ensure_connected(&h);
                }
                self.get(id).ok_or_else(|| unavailable(id))?
            }
        };
        let cached = self
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .filter(|(_, at)| at.elapsed() < STATUS_TTL)
            .map(|(up, _)| *up);
        let up = match cached {
            Some(up) => up,
            None => {
                let up = self
                    .store
                    .host(id)
                    .await?
                    .is_some_and(|h| h.status.serves());
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.to_string(), (up, Instant::now()));
                up
            }
        };
        if up {
            Ok(client)
        } else {
            Err(unavailable(id))
        }
    }

    /// Connects to `h` if it serves and this replica has no client for it yet (a host
    /// registered through another replica: the database is what replicas share).
    fn ensure_connected(&self, h: &HostRecord) {
        if h.status.serves() && self.get(&h.id).is_none() {
            self.connect(h);
        }
    }

    /// Forgets what is known of a host's status (it just changed).
    pub fn status_changed(&self, id: &str) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Any online host (to ask what every host has: the platform templates).
    pub async fn any(&self) -> Result<HostHandle, ApiError> {
        let mut hosts = self.store.hosts(None).await?;
        hosts.sort_by_key(|h| h.team_id.is_some());
        for h in hosts.iter().filter(|h| h.status == HostStatus::Online) {
            self.ensure_connected(h);
            if let Some(c) = self.get(&h.id) {
                return Ok(c);
            }
        }
        Err(no_hosts())
    }

    /// Names of the base images the hosts boot (`minimal`), as an online host reports them.
    pub async fn base_image_names(&self) -> Result<Vec<String>, ApiError> {
        self.any()
            .await?
            .templates()
            .await
            .map_err(crate::error::from_host)
    }

    /// The host a new capsule of `team_id` with `spec` goes to; among those with room, hosts
    /// in `prefer` (holding its template) first.
    pub async fn place(
        &self,
        team_id: &str,
        spec: &CapsuleSpec,
        prefer: &[String],
    ) -> Result<HostHandle, ApiError> {
        let hosts: Vec<HostRecord> = self
            .store
            .hosts(None)
            .await?
            .into_iter()
            .filter(|h| {
                self.ensure_connected(h);
                self.get(&h.id).is_some()
            })
            .collect();
        let byoc = self.store.team(team_id).await?.is_some_and(|t| t.byoc);
        let reserved = self.store.reserved_by_host().await?;
        let id = choose(
            &hosts,
            &reserved,
            team_id,
            byoc,
            spec,
            self.overcommit,
            prefer,
        )
        .ok_or_else(no_hosts)?;
        self.get(&id).ok_or_else(no_hosts)
    }
}

/// Placement: among `hosts` (connected ones), the online host with room for `spec` that is least
/// loaded afterwards, a host in `prefer` (it holds the capsule's template: no copy needed) over
/// any other. A BYOC team with hosts of its own uses only those; everyone else the shared
/// (regular) hosts. `reserved` is (vCPUs, MiB) per host.
pub fn choose(
    hosts: &[HostRecord],
    reserved: &HashMap<String, (i64, i64)>,
    team_id: &str,
    team_byoc: bool,
    spec: &CapsuleSpec,
    overcommit: Overcommit,
    prefer: &[String],
) -> Option<String> {
    let own: Vec<&HostRecord> = hosts
        .iter()
        .filter(|h| h.team_id.as_deref() == Some(team_id))
        .collect();
    let candidates: Vec<&HostRecord> = if team_byoc && !own.is_empty() {
        own
    } else {
        hosts.iter().filter(|h| h.team_id.is_none()).collect()
    };
    let mut best: Option<((bool, f64), &HostRecord)> = None;
    for h in candidates
        .into_iter()
        .filter(|h| h.status == HostStatus::Online)
    {
        let (cpus, mem) = reserved.get(&h.id).copied().unwrap_or((0, 0));
        let cap_cpu = h.cpu_cores.unwrap_or(1).max(1) as f64 * overcommit.cpu;
        let cap_mem = h.memory_mb.unwrap_or(0).max(0) as f64 * overcommit.memory;
        let cpu_after = (cpus + i64::from(spec.vcpus)) as f64;
        let mem_after = (mem + i64::from(spec.memory_mb)) as f64;
        if cpu_after > cap_cpu || mem_after > cap_mem {
            continue;
        }
        let load = (cpu_after / cap_cpu).max(mem_after / cap_mem);
        let rank = (!prefer.contains(&h.id), load);
        if best.is_none_or(|(r, _)| rank < r) {
            best = Some((rank, h));
        }
    }
    best.map(|(_, h)| h.id.clone())
}

fn no_hosts() -> ApiError {
    ApiError::new(
        ErrorCode::NoHostsAvailable,
        "no host has room for this capsule right now; try again later or ask for fewer resources",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: &str, team: Option<&str>, status: &str, cores: i64, mem: i64) -> HostRecord {
        let now = chrono::Utc::now();
        HostRecord {
            id: id.into(),
            kind: if team.is_some() { "byoc" } else { "regular" }.into(),
            team_id: team.map(Into::into),
            provider: None,
            availability_zone: None,
            arch: None,
            cpu_cores: Some(cores),
            memory_mb: Some(mem),
            disk_gb: None,
            address: None,
            status: HostStatus::parse(status).unwrap(),
            last_heartbeat_at: None,
            created_by: "t".into(),
            created_at: now,
            updated_at: now,
        }
    }

    fn spec(vcpus: u32, memory_mb: u32) -> CapsuleSpec {
        CapsuleSpec {
            template: "minimal".into(),
            vcpus,
            memory_mb,
            disk_size_mb: 1024,
            timeout_sec: 0,
            network: Default::default(),
        }
    }

    const EXACT: Overcommit = Overcommit {
        cpu: 1.0,
        memory: 1.0,
    };

    #[test]
    fn a_host_holding_the_template_wins_while_it_has_room() {
        let hosts = [
            host("a", None, "online", 4, 4096),
            host("b", None, "online", 4, 4096),
        ];
        let mut reserved = HashMap::new();
        reserved.insert("a".to_string(), (2, 1024));
        let holders = ["a".to_string()];
        // Busier, but it holds the template: no copy.
        assert_eq!(
            choose(
                &hosts,
                &reserved,
                "t",
                false,
                &spec(1, 512),
                EXACT,
                &holders
            )
            .as_deref(),
            Some("a")
        );
        // Full: the other host gets the capsule (and a copy of the template).
        reserved.insert("a".to_string(), (4, 1024));
        assert_eq!(
            choose(
                &hosts,
                &reserved,
                "t",
                false,
                &spec(1, 512),
                EXACT,
                &holders
            )
            .as_deref(),
            Some("b")
        );
    }

    #[test]
    fn least_loaded_host_with_room_wins() {
        let hosts = [
            host("a", None, "online", 4, 4096),
            host("b", None, "online", 4, 4096),
        ];
        let mut reserved = HashMap::new();
        reserved.insert("a".to_string(), (2, 1024));
        assert_eq!(
            choose(&hosts, &reserved, "t", false, &spec(1, 512), EXACT, &[]).as_deref(),
            Some("b")
        );
        reserved.insert("b".to_string(), (3, 3584));
        assert_eq!(
            choose(&hosts, &reserved, "t", false, &spec(1, 512), EXACT, &[]).as_deref(),
            Some("a")
        );
        // Nobody has room for 3 more vCPUs… unless overcommitted.
        assert_eq!(
            choose(&hosts, &reserved, "t", false, &spec(3, 512), EXACT, &[]),
            None
        );
        let loose = Overcommit {
            cpu: 2.0,
            memory: 1.0,
        };
        assert_eq!(
            choose(&hosts, &reserved, "t", false, &spec(3, 512), loose, &[]).as_deref(),
            Some("a")
        );
    }

    #[test]
    fn only_online_hosts_take_capsules() {
        let hosts = [
            host("a", None, "unreachable", 8, 8192),
            host("b", None, "draining", 8, 8192),
            host("c", None, "pending", 8, 8192),
        ];
        assert_eq!(
            choose(
                &hosts,
                &HashMap::new(),
                "t",
                false,
                &spec(1, 512),
                EXACT,
                &[]
            ),
            None
        );
    }

    #[test]
    fn byoc_teams_use_their_own_hosts_and_others_never_do() {
        let hosts = [
            host("shared", None, "online", 64, 65536),
            host("mine", Some("t1"), "online", 2, 2048),
            host("theirs", Some("t2"), "online", 64, 65536),
        ];
        let none = HashMap::new();
        assert_eq!(
            choose(&hosts, &none, "t1", true, &spec(1, 512), EXACT, &[]).as_deref(),
            Some("mine")
        );
        // Full own hosts: no spill-over onto shared ones.
        let mut full = HashMap::new();
        full.insert("mine".to_string(), (2, 2048));
        assert_eq!(
            choose(&hosts, &full, "t1", true, &spec(1, 512), EXACT, &[]),
            None
        );
        // Other teams, and a BYOC team without hosts of its own, use the shared hosts only.
        assert_eq!(
            choose(&hosts, &none, "t3", false, &spec(1, 512), EXACT, &[]).as_deref(),
            Some("shared")
        );
        assert_eq!(
            choose(&hosts, &none, "t3", true, &spec(1, 512), EXACT, &[]).as_deref(),
            Some("shared")
        );
        assert_eq!(
            choose(&hosts, &none, "t1", false, &spec(1, 512), EXACT, &[]).as_deref(),
            Some("shared")
        );
    }
}
