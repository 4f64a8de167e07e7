//! Hosts: the `/v1/hosts*` API (records, registration tokens, tags), the agents' side of it
//! (registration, token refresh, heartbeats, capsule events) and liveness.
//!
//! Invariants:
//! - Registration tokens are single use, valid 1 h, stored as SHA-256. Refresh tokens are valid
//!   60 days and rotate: each use revokes the presented token before the new one is issued,
//!   so a token can be used once; a revoked, expired or unknown one answers 401.
//! - A host token (JWT) names its host; URLs naming another host answer 403.
//! - A host silent for [`HostConfig::unreachable_after`] becomes `unreachable` and its
//!   capsules that were running (or on their way) become `missing`; its next heartbeat brings it
//!   back `online` and reconciles them against what the agent really runs.

pub mod copies;
pub mod pki;
pub mod pool;

use std::net::SocketAddr;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use wrenn_api::id::{new_id, prefix};
use wrenn_api::*;

use crate::accounts::secrets::{random_hex, sha256_hex};
use crate::accounts::SessionUser;
use crate::audit::{AuditLog, Record};
use crate::clock::Clock;
use crate::store::{HostSpecs, Store};
use pki::Pki;

pub type Result<T> = std::result::Result<T, ApiError>;

/// Registration tokens are valid this long.
pub const REGISTRATION_TTL: Duration = Duration::hours(1);
/// Refresh tokens are valid this long.
pub const REFRESH_TTL: Duration = Duration::days(60);
/// Capsule states that hold (or are about to hold) a VM on their host.
pub const ACTIVE_STATES: [CapsuleStatus; 6] = [
    CapsuleStatus::Pending,
    CapsuleStatus::Starting,
    CapsuleStatus::Running,
    CapsuleStatus::Pausing,
    CapsuleStatus::Resuming,
    CapsuleStatus::Missing,
];

#[derive(Debug, Clone)]
pub struct HostConfig {
    /// How often agents send heartbeats.
    pub heartbeat_interval: std::time::Duration,
    /// The agent embedded in this process (`wrenn up`): always alive, never deleted.
    pub embedded: Option<String>,
}

impl HostConfig {
    /// A host silent this long is unreachable (three heartbeats missed).
    pub fn unreachable_after(&self) -> Duration {
        Duration::from_std(self.heartbeat_interval * 3).unwrap_or(Duration::seconds(90))
    }
}

/// What happens to hosts' capsules and connections as hosts come and go; implemented by the
/// capsule side (the capsule service).
#[async_trait::async_trait]
pub trait HostEvents: Send + Sync {
    /// A host registered, refreshed its credentials or came back: (re)connect to it.
    async fn host_online(&self, host: &Host);
    /// A host became unreachable: its running capsules are `missing`.
    async fn host_down(&self, host: &Host);
    /// A host answered again: reconcile its capsules with what it runs.
    async fn host_back(&self, host: &Host);
    /// A host is being deleted: destroy (or, when it cannot be reached, forget) its capsules.
    async fn host_deleted(&self, host: &Host, capsule_ids: &[String]);
    /// An agent reported something that happened to one of its capsules.
    async fn capsule_event(&self, host_id: &str, event: &SandboxEvent);
}

pub struct HostService {
    store: Store,
    pki: Arc<Pki>,
    clock: Arc<dyn Clock>,
    config: HostConfig,
    events: Arc<dyn HostEvents>,
    audit: AuditLog,
}

fn forbidden(m: &str) -> ApiError {
    ApiError::forbidden(m)
}

fn host_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("host {id} not found"))
}

/// Tags: 1–64 of letters, digits, `.`, `_`, `-`, `:`, `=`.
fn validate_tag(t: &str) -> Result<String> {
    let t = t.trim();
    if t.is_empty()
        || t.len() > 64
        || !t
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '='))
    {
        return Err(ApiError::invalid(
            "tags are 1 to 64 of letters, digits and . _ - : =",
        ));
    }
    Ok(t.to_string())
}

fn optional_text(v: Option<String>, what: &str) -> Result<Option<String>> {
    match v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty()) {
        Some(s) if s.chars().count() > 64 || s.chars().any(char::is_control) => Err(
            ApiError::invalid(format!("{what} must be at most 64 printable characters")),
        ),
        other => Ok(other),
    }
}

impl HostService {
    pub fn new(
        store: Store,
        pki: Arc<Pki>,
        clock: Arc<dyn Clock>,
        config: HostConfig,
        events: Arc<dyn HostEvents>,
    ) -> Self {
        Self {
            audit: AuditLog::new(store.clone()),
            store,
            pki,
            clock,
            config,
            events,
        }
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    async fn role(&self, u: &SessionUser, team_id: &str) -> Result<Option<Role>> {
        Ok(self.store.role_in_team(team_id, &u.user_id).await?)
    }

    /// The host if `u` may see it (admins: all; others: BYOC hosts of their teams). Others'
    /// hosts are "not found".
    async fn visible(&self, u: &SessionUser, id: &str) -> Result<Host> {
        let h = self
            .store
            .host(id)
            .await?
            .ok_or_else(|| host_not_found(id))?;
        if u.is_admin {
            return Ok(h);
        }
        match &h.team_id {
            Some(t) if self.role(u, t).await?.is_some() => Ok(h),
            _ => Err(host_not_found(id)),
        }
    }

    /// The host if `u` may change it: admins, or owners/admins of a BYOC host's team.
    async fn manageable(&self, u: &SessionUser, id: &str) -> Result<Host> {
        let h = self.visible(u, id).await?;
        if u.is_admin {
            return Ok(h);
        }
        let t = h.team_id.clone().unwrap_or_default();
        match self.role(u, &t).await? {
            Some(r) if r >= Role::Admin => Ok(h),
            _ => Err(forbidden(
                "only platform admins and the team's owner or admins manage this host",
            )),
        }
    }

    async fn new_registration_token(&self, host_id: &str) -> Result<String> {
        let token = random_hex(32);
        let now = self.now();
        self.store
            .put_host_token(
                &sha256_hex(&token),
                host_id,
                "registration",
                now + REGISTRATION_TTL,
                now,
            )
            .await?;
        Ok(token)
    }

    pub async fn create(
        &self,
        u: &SessionUser,
        req: CreateHostRequest,
    ) -> Result<CreateHostResponse> {
        let team_id = match req.kind.as_str() {
            "regular" => {
                if !u.is_admin {
                    return Err(forbidden("only platform admins create regular hosts"));
                }
                if req.team_id.is_some() {
                    return Err(ApiError::invalid(
                        "regular hosts belong to no team: omit team_id",
                    ));
                }
                None
            }
            "byoc" => {
                let t = req
                    .team_id
                    .clone()
                    .ok_or_else(|| ApiError::invalid("team_id is required for BYOC hosts"))?;
                let role = self.role(u, &t).await?;
                let team = self.store.team(&t).await?;
                let Some(team) = team.filter(|_| u.is_admin || role.is_some()) else {
                    return Err(ApiError::not_found(format!("team {t} not found")));
                };
                if !u.is_admin && role < Some(Role::Admin) {
                    return Err(forbidden("only the team's owner or admins add BYOC hosts"));
                }
                if !team.byoc {
                    return Err(ApiError::invalid(
                        "BYOC is not enabled for this team (a platform admin enables it)",
                    ));
                }
                Some(t)
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "type must be regular or byoc, not {other:?}"
                )))
            }
        };
        let now = self.now();
        let host = Host {
            id: new_id(prefix::HOST),
            kind: req.kind,
            team_id,
            provider: optional_text(req.provider, "provider")?,
            availability_zone: optional_text(req.availability_zone, "availability_zone")?,
            arch: None,
            cpu_cores: None,
            memory_mb: None,
            disk_gb: None,
            address: None,
            status: HostStatus::Pending,
            last_heartbeat_at: None,
            created_by: u.user_id.clone(),
            created_at: now,
            updated_at: now,
        };
        self.store.insert_host(&host).await?;
        let registration_token = self.new_registration_token(&host.id).await?;
        tracing::info!(host_id = %host.id, kind = %host.kind, "host created");
        self.audit_host(u, &host, "create", &[]).await;
        Ok(CreateHostResponse {
            host,
            registration_token,
        })
    }

    pub async fn list(&self, u: &SessionUser) -> Result<Vec<Host>> {
        if u.is_admin {
            return Ok(self.store.hosts(None).await?);
        }
        if u.role.is_none() {
            return Ok(vec![]);
        }
        Ok(self.store.hosts(Some(&u.team_id)).await?)
    }

    pub async fn get(&self, u: &SessionUser, id: &str) -> Result<Host> {
        self.visible(u, id).await
    }

    /// Capsules that keep a host from being deleted.
    async fn blocking_capsules(&self, id: &str) -> Result<Vec<String>> {
        Ok(self
            .store
            .capsules_on_host(id, &ACTIVE_STATES)
            .await?
            .into_iter()
            .map(|r| r.capsule.id)
            .collect())
    }

    pub async fn delete_preview(&self, u: &SessionUser, id: &str) -> Result<HostDeletePreview> {
        let host = self.manageable(u, id).await?;
        let mut sandbox_ids = self.blocking_capsules(id).await?;
        sandbox_ids.extend(
            self.store
                .capsules_on_host(id, &[CapsuleStatus::Paused])
                .await?
                .into_iter()
                .map(|r| r.capsule.id),
        );
        Ok(HostDeletePreview { host, sandbox_ids })
    }

    /// Deletes a host. Without `force`, a host with active capsules is refused with their ids
    /// (`Err(Ok(ids))`); with it they are destroyed first.
    pub async fn delete(
        &self,
        u: &SessionUser,
        id: &str,
        force: bool,
    ) -> std::result::Result<(), DeleteError> {
        let host = self.manageable(u, id).await?;
        if self.config.embedded.as_deref() == Some(id) {
            return Err(
                ApiError::invalid("the host embedded in `wrenn up` cannot be deleted").into(),
            );
        }
        let active = self.blocking_capsules(id).await?;
        if !active.is_empty() && !force {
            return Err(DeleteError::HasCapsules(active));
        }
        let mut all = active;
        all.extend(
            self.store
                .capsules_on_host(id, &[CapsuleStatus::Paused])
                .await?
                .into_iter()
                .map(|r| r.capsule.id),
        );
        self.events.host_deleted(&host, &all).await;
        self.store.delete_host(id).await?;
        tracing::info!(host_id = id, capsules = all.len(), "host deleted");
        self.audit_host(u, &host, "delete", &all).await;
        Ok(())
    }

    /// A host entry: in its team's log (BYOC) or the platform's (regular hosts).
    async fn audit_host(&self, u: &SessionUser, host: &Host, action: &str, capsules: &[String]) {
        let mut r = Record::new(&crate::accounts::user_actor(u), "host", &host.id, action)
            .team(host.team_id.as_deref())
            .meta("type", host.kind.as_str());
        if host.team_id.is_none() {
            r = r.admin();
        }
        if !capsules.is_empty() {
            r = r.meta("capsules_destroyed", capsules.len() as u64);
        }
        self.audit.record(r).await;
    }

    pub async fn regenerate_token(&self, u: &SessionUser, id: &str) -> Result<CreateHostResponse> {
        let host = self.manageable(u, id).await?;
        if host.status != HostStatus::Pending {
            return Err(ApiError::invalid_state(format!(
                "host {id} is {}: registration tokens are only for pending hosts",
                host.status.as_str()
            )));
        }
        let registration_token = self.new_registration_token(id).await?;
        Ok(CreateHostResponse {
            host,
            registration_token,
        })
    }

    pub async fn tags(&self, u: &SessionUser, id: &str) -> Result<Vec<String>> {
        self.visible(u, id).await?;
        Ok(self.store.host_tags(id).await?)
    }

    pub async fn add_tag(&self, u: &SessionUser, id: &str, tag: &str) -> Result<()> {
        self.manageable(u, id).await?;
        self.store.add_host_tag(id, &validate_tag(tag)?).await?;
        Ok(())
    }

    pub async fn remove_tag(&self, u: &SessionUser, id: &str, tag: &str) -> Result<()> {
        self.manageable(u, id).await?;
        if !self.store.remove_host_tag(id, tag).await? {
            return Err(ApiError::not_found(format!("host {id} has no tag {tag:?}")));
        }
        Ok(())
    }

    // ---- the agents' side ---------------------------------------------------------------

    fn tls_for(&self, host_id: &str, address: &str) -> Result<HostTls> {
        let ip = address
            .parse::<SocketAddr>()
            .map_err(|_| ApiError::invalid("address must be ip:port"))?
            .ip();
        let issued = self
            .pki
            .issue_host_cert(host_id, ip)
            .map_err(ApiError::internal)?;
        Ok(HostTls {
            ca_cert: self.pki.ca_cert_pem().to_string(),
            cert: issued.cert_pem,
            key: issued.key_pem,
        })
    }

    async fn new_refresh_token(&self, host_id: &str) -> Result<String> {
        let token = random_hex(32);
        let now = self.now();
        self.store
            .put_host_token(
                &sha256_hex(&token),
                host_id,
                "refresh",
                now + REFRESH_TTL,
                now,
            )
            .await?;
        Ok(token)
    }

    pub async fn register(&self, req: RegisterHostRequest) -> Result<RegisterHostResponse> {
        // Canonical `ip:port`, so one address cannot be registered twice under two spellings.
        let address = match req.address.trim().parse::<SocketAddr>() {
            Ok(a) => a.to_string(),
            Err(_) => {
                return Err(ApiError::invalid(
                    "address must be ip:port (for example 10.0.0.5:7443)",
                ))
            }
        };
        for (v, what) in [
            (req.cpu_cores, "cpu_cores"),
            (req.memory_mb, "memory_mb"),
            (req.disk_gb, "disk_gb"),
        ] {
            if v.is_some_and(|n| n < 0) {
                return Err(ApiError::invalid(format!("{what} must not be negative")));
            }
        }
        let arch = optional_text(req.arch, "arch")?;
        let now = self.now();
        let bad = || ApiError::unauthorized("invalid, used or expired registration token");
        let (host_id, expires_at) = self
            .store
            .take_registration_token(&sha256_hex(req.token.trim()))
            .await?
            .ok_or_else(bad)?;
        if expires_at <= now {
            return Err(bad());
        }
        let tls = self.tls_for(&host_id, &address)?;
        // One host per address: a host registered at another's address would receive that
        // host's traffic were certificates ever checked by address alone.
        let registered = self
            .store
            .register_host(
                &host_id,
                &HostSpecs {
                    address: address.clone(),
                    arch,
                    cpu_cores: req.cpu_cores,
                    memory_mb: req.memory_mb,
                    disk_gb: req.disk_gb,
                },
                now,
            )
            .await?;
        if !registered {
            return Err(ApiError::new(
                ErrorCode::Conflict,
                format!("address {address} belongs to another host: delete that host, then create a new registration token for this one"),
            ));
        }
        let refresh_token = self.new_refresh_token(&host_id).await?;
        let host = self
            .store
            .host(&host_id)
            .await?
            .ok_or_else(|| host_not_found(&host_id))?;
        tracing::info!(host_id, address = ?host.address, "host registered");
        self.events.host_online(&host).await;
        Ok(RegisterHostResponse {
            token: self.pki.host_token(&host_id, now),
            refresh_token,
            host,
            tls,
        })
    }

    pub async fn refresh(&self, refresh_token: &str) -> Result<RefreshHostTokenResponse> {
        let now = self.now();
        let host_id = self
            .store
            .revoke_refresh_token(&sha256_hex(refresh_token.trim()), now)
            .await?
            .ok_or_else(|| ApiError::unauthorized("invalid, expired or revoked refresh token"))?;
        let host = self
            .store
            .host(&host_id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("this host no longer exists"))?;
        let tls = self.tls_for(&host_id, host.address.as_deref().unwrap_or_default())?;
        let refresh_token = self.new_refresh_token(&host_id).await?;
        tracing::info!(host_id, "host credentials refreshed");
        self.events.host_online(&host).await;
        Ok(RefreshHostTokenResponse {
            token: self.pki.host_token(&host_id, now),
            refresh_token,
            host,
            tls,
        })
    }

    /// The host a host token names; 401 for a bad token, 404 once the host is deleted.
    pub async fn authenticate(&self, token: &str) -> Result<Host> {
        let id = self
            .pki
            .verify_host_token(token, self.now())
            .ok_or_else(|| ApiError::unauthorized("invalid or expired host token"))?;
        self.store
            .host(&id)
            .await?
            .ok_or_else(|| host_not_found(&id))
    }

    pub async fn heartbeat(&self, host: &Host, path_id: &str) -> Result<()> {
        if host.id != path_id {
            return Err(forbidden("the host token is for another host"));
        }
        let now = self.now();
        self.store.record_heartbeat(&host.id, now).await?;
        if self
            .store
            .set_host_status(
                &host.id,
                HostStatus::Online,
                &[HostStatus::Unreachable, HostStatus::Offline],
                now,
            )
            .await?
        {
            tracing::info!(host_id = %host.id, "host is back");
            self.events.host_back(host).await;
        }
        Ok(())
    }

    pub async fn capsule_event(&self, host: &Host, ev: SandboxEvent) -> Result<()> {
        if ev.host_id != host.id {
            return Err(forbidden("the host token is for another host"));
        }
        if ev.event.trim().is_empty() || ev.sandbox_id.trim().is_empty() {
            return Err(ApiError::invalid("event and sandbox_id are required"));
        }
        self.events.capsule_event(&host.id, &ev).await;
        Ok(())
    }

    /// Records that the embedded agent is alive (it shares this process).
    pub async fn embedded_heartbeat(&self) -> Result<()> {
        if let Some(id) = &self.config.embedded {
            self.store.record_heartbeat(id, self.now()).await?;
        }
        Ok(())
    }

    /// One liveness pass: online hosts silent too long become unreachable.
    pub async fn monitor(&self) -> Result<()> {
        let skip: Vec<String> = self.config.embedded.iter().cloned().collect();
        let now = self.now();
        let limit = now - self.config.unreachable_after();
        for h in self.store.hosts(None).await? {
            if !h.status.serves() || skip.contains(&h.id) {
                continue;
            }
            if h.last_heartbeat_at.is_none_or(|t| t < limit)
                && self
                    .store
                    .set_host_status(
                        &h.id,
                        HostStatus::Unreachable,
                        &[HostStatus::Online, HostStatus::Draining],
                        now,
                    )
                    .await?
            {
                tracing::warn!(host_id = %h.id, last_heartbeat = ?h.last_heartbeat_at, "host unreachable (host.down)");
                self.events.host_down(&h).await;
            }
        }
        Ok(())
    }
}

/// Why a host delete was refused.
pub enum DeleteError {
    Api(ApiError),
    /// Capsules are still active on it.
    HasCapsules(Vec<String>),
}

impl From<ApiError> for DeleteError {
    fn from(e: ApiError) -> Self {
        DeleteError::Api(e)
    }
}

impl From<crate::store::StoreError> for DeleteError {
    fn from(e: crate::store::StoreError) -> Self {
        DeleteError::Api(e.into())
    }
}

/// The id of the agent embedded in `wrenn up` (kept in `<data>/embedded-host-id`), with its
/// host record created or refreshed as a regular, online host.
pub async fn ensure_embedded_host(
    store: &Store,
    data_dir: &std::path::Path,
    capacity: &wrenn_host::HostCapacity,
) -> std::result::Result<String, crate::store::StoreError> {
    let file = data_dir.join("embedded-host-id");
    let id = match std::fs::read_to_string(&file) {
        Ok(s) if wrenn_api::id::is_valid(prefix::HOST, s.trim()) => s.trim().to_string(),
        _ => {
            let id = new_id(prefix::HOST);
            std::fs::write(&file, &id).map_err(|e| {
                crate::store::StoreError::Config(format!("cannot write {}: {e}", file.display()))
            })?;
            id
        }
    };
    // Versions before hosts had records called the embedded agent `host-local`.
    store.rename_host_refs("host-local", &id).await?;
    let now = Utc::now();
    let specs = HostSpecs {
        address: String::new(),
        arch: Some(std::env::consts::ARCH.to_string()),
        cpu_cores: Some(i64::from(capacity.cpus)),
        memory_mb: i64::try_from(capacity.memory_mb).ok(),
        disk_gb: i64::try_from(capacity.disk_free_mb / 1024).ok(),
    };
    if store.host(&id).await?.is_none() {
        store
            .insert_host(&Host {
                id: id.clone(),
                kind: "regular".into(),
                team_id: None,
                provider: Some("embedded".into()),
                availability_zone: None,
                arch: None,
                cpu_cores: None,
                memory_mb: None,
                disk_gb: None,
                address: None,
                status: HostStatus::Online,
                last_heartbeat_at: Some(now),
                created_by: "system".into(),
                created_at: now,
                updated_at: now,
            })
            .await?;
    }
    store.register_host(&id, &specs, now).await?;
    Ok(id)
}
