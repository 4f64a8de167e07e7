//! [`ControlPlane`]: the whole control plane of one replica, started from a [`Config`] and
//! stopped as one.
//!
//! Start-up wires the services together (store, host pool, events, capsules, accounts, hosts,
//! channels, stats), reconciles the database with the hosts it can reach, and serves the API.
//! The long-lived background tasks — the periodic ones ([`Tasks::every`]) and the notification
//! delivery loop — live in one [`JoinSet`] under one [`CancellationToken`], so
//! [`ControlPlane::shutdown`] stops them all and waits for them, for at most
//! [`SHUTDOWN_GRACE`] (as for the server's in-flight requests). Work a request started in the
//! background (a capsule booting, pausing, resuming) finishes on its own: the host holds the
//! truth, and the next start reconciles with it.

use std::future::{Future, IntoFuture};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_host::{Host, HostCapacity, TlsMaterial};

use crate::accounts::limits::AuthLimits;
use crate::accounts::mail::Mailer;
use crate::accounts::oauth::ProviderConfig;
use crate::accounts::{AccountConfig, AccountService};
use crate::audit::AuditLog;
use crate::bootstrap::Bootstrap;
use crate::builds::{BuildConfig, BuildService};
use crate::capsules::{CapsuleService, Emitter};
use crate::channels::{ChannelConfig, ChannelService, Sealer};
use crate::clock::SystemClock;
use crate::events::EventBus;
use crate::hosts::pki::Pki;
use crate::hosts::pool::{HostPool, Overcommit};
use crate::hosts::{HostConfig, HostService};
use crate::http::limits::{RateLimiter, RateLimits, StreamSlots};
use crate::http::proxy::{Proxy, ProxySettings};
use crate::stats::StatsService;
use crate::store::{Store, StoreError};
use crate::AppState;

mod periodic;
use periodic::{housekeeping, keep_capsules_truthful, sample_stats, watch_hosts, Tasks};

/// How long a shutdown waits for background tasks before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Everything a control plane is told; `wrenn server` and `wrenn up` fill it from their flags.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the SQLite database (unless `database_url`), the outbox and keys live.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// URL clients use (default `http://<listen>`).
    pub public_url: Option<String>,
    /// Domain of port proxy links, `{port}-{capsule}.{domain}` (default: the public URL's host
    /// and port, as the SDK assumes without `WRENN_PROXY_DOMAIN`).
    pub proxy_domain: Option<String>,
    pub admin_email: String,
    pub admin_password: Option<String>,
    /// `postgres://…`; SQLite under the data dir when unset.
    pub database_url: Option<String>,
    /// Redis for the event bus shared by replicas; in-process events when unset.
    pub redis_url: Option<String>,
    pub stats_interval: Duration,
    pub heartbeat_interval: Duration,
    pub reconcile_interval: Duration,
    /// How often WebSocket and SSE streams re-check that their caller may still use them.
    pub stream_recheck_interval: Duration,
    /// Requests a second per API key and per session (0: no limit), and their burst.
    pub rate_limit_per_sec: u32,
    pub rate_limit_burst: u32,
    /// WebSocket and SSE streams a team may hold open on one replica.
    pub team_max_streams: usize,
    /// What a team may hold unless a platform admin set its own limits.
    pub team_quota: wrenn_api::quota::QuotaFigures,
    pub overcommit: Overcommit,
    pub smtp_url: Option<String>,
    pub smtp_from: String,
    /// Where OAuth flows end (default: the public URL).
    pub oauth_redirect_url: Option<String>,
    pub github: Option<GithubApp>,
    pub secure_cookies: bool,
    pub auth_ip_limit: u32,
    pub auth_email_limit: u32,
    /// 64 hex: the key sealing channel secrets (generated into the data dir when unset).
    pub encryption_key: Option<String>,
    pub telegram_api_url: String,
    pub channel_retry_delays: Vec<Duration>,
    pub channel_allow_private_targets: bool,
    /// Template builds running at once (later ones wait `pending`).
    pub build_concurrency: usize,
    /// Built-in templates to build on start (`python`, `node`, `code-runner-beta`).
    pub builtin_templates: Vec<String>,
    /// A PEM bundle build guests trust besides their own CAs.
    pub guest_ca_bundle: Option<PathBuf>,
}

/// A GitHub OAuth app.
#[derive(Debug, Clone)]
pub struct GithubApp {
    pub client_id: String,
    pub client_secret: String,
    /// Web and API base URLs (GitHub Enterprise, or a stand-in in tests).
    pub url: String,
    pub api_url: String,
}

/// The host agent running in this process (`wrenn up`).
pub struct EmbeddedHost {
    pub host: Arc<dyn Host>,
    pub capacity: HostCapacity,
}

/// Why a control plane could not start.
#[derive(Debug, Error)]
pub enum StartError {
    #[error("{0}")]
    Config(String),
    #[error("{what}")]
    Store {
        what: &'static str,
        source: StoreError,
    },
    #[error("{what}: {detail}")]
    Service { what: String, detail: String },
    #[error("cannot listen on {addr}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

fn store_err(what: &'static str) -> impl FnOnce(StoreError) -> StartError {
    move |source| StartError::Store { what, source }
}

fn service_err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> StartError + '_ {
    move |e| StartError::Service {
        what: what.to_string(),
        detail: e.to_string(),
    }
}

/// A running control plane.
pub struct ControlPlane {
    base_url: String,
    local_addr: SocketAddr,
    bootstrap: Option<Bootstrap>,
    tasks: Tasks,
    events: Arc<EventBus>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl ControlPlane {
    /// Opens the database, connects to the hosts, starts the background tasks and serves the
    /// API on `config.listen`. With `embedded`, that host is a regular host of its own.
    pub async fn start(
        config: Config,
        embedded: Option<EmbeddedHost>,
    ) -> Result<ControlPlane, StartError> {
        let c = config;
        check(&c)?;
        let started = chrono::Utc::now();
        let store = match &c.database_url {
            Some(url) => Store::connect(url).await,
            None => Store::open_sqlite(&c.data_dir.join("wrenn.db")).await,
        }
        .map_err(store_err("cannot open the database"))?;
        // One key seals every secret at rest: channel configs and the platform's own keys.
        let sealer = Arc::new(platform_sealer(&c)?);
        let store = store.seal_secrets_with(sealer.clone());
        info!(backend = ?store.backend(), "database ready");
        let mut tasks = Tasks {
            set: JoinSet::new(),
            cancel: CancellationToken::new(),
        };
        // Hosts: the platform CA issues our client certificate for calling agents.
        let pki = Arc::new(
            Pki::load(&store)
                .await
                .map_err(store_err("host credentials"))?,
        );
        let (pool, embedded_id) = connect_hosts(&c, &store, &pki, embedded).await?;
        let events = Arc::new(match &c.redis_url {
            Some(url) => EventBus::redis(url).await.map_err(service_err(&format!(
                "cannot use Redis at {url} for events"
            )))?,
            None => EventBus::local(),
        });
        let capsules = Arc::new(
            CapsuleService::new(store.clone(), pool.clone(), events.clone())
                .with_quota_defaults(c.team_quota),
        );
        // In the background: a host that answers slowly never holds up the API. The passes
        // that judge capsules (the liveness monitor, which would mark those of hosts not heard
        // from yet `missing` under the reconcile's feet; the reaper; the reconciler) wait for
        // it. Capsules changed from now on are this run's and the reconcile leaves them alone.
        let reconciled = Arc::new(AtomicBool::new(false));
        {
            let (capsules, reconciled) = (capsules.clone(), reconciled.clone());
            tasks.spawn(async move {
                if let Err(e) = capsules.reconcile(started).await {
                    warn!(error = %e.message, "start-up reconcile failed");
                }
                reconciled.store(true, Ordering::SeqCst);
                info!("start-up reconcile done");
            });
        }
        let replica = replica_id(&c.data_dir)?;
        store
            .ensure_platform_team()
            .await
            .map_err(store_err("platform team"))?;
        let builds = BuildService::new(
            store.clone(),
            capsules.clone(),
            pool,
            Emitter::new(store.clone(), events.clone()),
            BuildConfig {
                dir: c.data_dir.join("builds"),
                replica: replica.clone(),
                concurrency: c.build_concurrency,
                guest_ca_bundle: c.guest_ca_bundle.clone(),
            },
            tasks.cancel.child_token(),
        );
        builds
            .recover()
            .await
            .map_err(|e| service_err("interrupted builds")(e.message))?;
        let followers = builds.clone();
        tasks.every(Duration::from_secs(60), "build-followers", move || {
            followers.prune_followers();
            std::future::ready(Ok::<(), std::convert::Infallible>(()))
        });
        keep_capsules_truthful(
            &mut tasks,
            &capsules,
            c.reconcile_interval,
            &store,
            replica.clone(),
            reconciled.clone(),
        );
        let stats = Arc::new(StatsService::new(store.clone(), c.stats_interval));
        sample_stats(&mut tasks, &stats, &store, replica.clone());

        let base_url = c.public_url.clone().unwrap_or_else(|| local_url(c.listen));
        let bootstrap = crate::bootstrap::ensure(
            &store,
            &c.data_dir,
            &base_url,
            &c.admin_email,
            c.admin_password.as_deref(),
        )
        .await
        .map_err(store_err("bootstrap admin"))?;
        let accounts = Arc::new(account_service(&c, &store, &base_url, capsules.clone())?);
        housekeeping(&mut tasks, &accounts, &store);
        let hosts = Arc::new(HostService::new(
            store.clone(),
            pki,
            Arc::new(SystemClock),
            HostConfig {
                heartbeat_interval: c.heartbeat_interval,
                embedded: embedded_id,
            },
            capsules.clone(),
        ));
        watch_hosts(&mut tasks, &hosts, c.heartbeat_interval, reconciled);
        let channels = Arc::new(channel_service(&c, &store, sealer));
        let proxy = Arc::new(Proxy::new(ProxySettings::new(
            &base_url,
            c.proxy_domain.as_deref(),
        )));
        let idle = proxy.clone();
        tasks.every(
            Duration::from_secs(10),
            "proxy-idle-connections",
            move || {
                idle.expire_idle();
                std::future::ready(Ok::<(), std::convert::Infallible>(()))
            },
        );
        let queue = events
            .work_queue(crate::channels::QUEUE_GROUP, channels.max_handling())
            .await
            .map_err(service_err("notification queue"))?;
        tasks.spawn(channels.clone().run(queue, events.closed()));

        let rate_limits = RateLimits {
            per_sec: c.rate_limit_per_sec,
            burst: c.rate_limit_burst,
        };
        // With Redis the buckets are shared by every replica.
        let limiter = Arc::new(match &c.redis_url {
            Some(url) => RateLimiter::redis(url, rate_limits)
                .await
                .map_err(service_err(&format!(
                    "cannot use Redis at {url} for rate limits"
                )))?,
            None => RateLimiter::local(rate_limits),
        });
        let state = AppState {
            audit: AuditLog::new(store.clone()),
            store,
            capsules,
            builds: builds.clone(),
            stats,
            key_usage: Default::default(),
            accounts,
            hosts,
            events: events.clone(),
            channels,
            proxy: proxy.clone(),
            stream_recheck: c.stream_recheck_interval,
            limiter,
            streams: Arc::new(StreamSlots::new(c.team_max_streams)),
        };
        let (server, local_addr) = serve(c.listen, state, tasks.cancel.clone()).await?;
        // After the API serves: `minimal` is ready now, the others build in the background.
        if !c.builtin_templates.is_empty() {
            tasks.spawn(builds.ensure_builtins(c.builtin_templates.clone()));
        }
        Ok(ControlPlane {
            base_url,
            local_addr,
            bootstrap,
            tasks,
            events,
            server,
        })
    }

    /// The URL clients use.
    pub fn base_url(&self) -> &str {
        &self.base_url
    }

    /// Where the API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// What the first start created (admin, team, API key), as `bootstrap.json` holds it.
    pub fn bootstrap(&self) -> Option<&Bootstrap> {
        self.bootstrap.as_ref()
    }

    /// Serves until `signal` completes, then shuts down.
    pub async fn serve_until(self, signal: impl Future<Output = ()>) -> std::io::Result<()> {
        signal.await;
        self.shutdown().await
    }

    /// Stops serving (open event streams end), stops every background task and waits for
    /// them, aborting those that do not end within [`SHUTDOWN_GRACE`].
    pub async fn shutdown(mut self) -> std::io::Result<()> {
        // Event streams never end by themselves: end them so the shutdown does not wait.
        self.events.close();
        self.tasks.cancel.cancel();
        let served = match tokio::time::timeout(SHUTDOWN_GRACE, &mut self.server).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(std::io::Error::other(e)),
            Err(_) => {
                warn!("requests still in flight after the grace period; closing them");
                self.server.abort();
                Ok(())
            }
        };
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while self.tasks.set.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("background tasks did not stop in time; aborting them");
            self.tasks.set.abort_all();
        }
        served
    }
}

/// The pool of hosts: the embedded one (recorded as a regular host) and every registered
/// agent that may be reachable.
async fn connect_hosts(
    c: &Config,
    store: &Store,
    pki: &Pki,
    embedded: Option<EmbeddedHost>,
) -> Result<(Arc<HostPool>, Option<String>), StartError> {
    let pool = Arc::new(host_pool(store, pki, c.overcommit)?);
    let embedded_id = match embedded {
        Some(e) => {
            let id = crate::hosts::ensure_embedded_host(store, &c.data_dir, &e.capacity)
                .await
                .map_err(store_err("cannot record the embedded host"))?;
            pool.add(&id, e.host);
            Some(id)
        }
        None => None,
    };
    for h in store
        .hosts(None)
        .await
        .map_err(store_err("cannot read hosts"))?
    {
        if h.status.serves() || h.status == wrenn_api::HostStatus::Unreachable {
            pool.connect(&h);
        }
    }
    Ok((pool, embedded_id))
}

/// Serves the API on `listen` until `stop` is cancelled.
async fn serve(
    listen: SocketAddr,
    state: AppState,
    stop: CancellationToken,
) -> Result<(tokio::task::JoinHandle<std::io::Result<()>>, SocketAddr), StartError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: listen,
        source,
    })?;
    let app = crate::http::router(state);
    // Small writes leave at once: proxied streams (SSE, WebSocket frames, an app's headers
    // then its body) would otherwise wait on Nagle for the client's delayed acknowledgement.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = tokio::spawn(
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .into_future(),
    );
    Ok((server, local_addr))
}

/// The URL of a control plane without a public one. On loopback it is `localhost`, not the
/// address: the SDK builds port-proxy URLs from it (`8888-cl-….localhost:8080`), and every
/// `*.localhost` name resolves to loopback (RFC 6761; libnss-myhostname), `*.127.0.0.1` none.
fn local_url(listen: SocketAddr) -> String {
    if listen.ip().is_loopback() {
        format!("http://localhost:{}", listen.port())
    } else {
        format!("http://{listen}")
    }
}

/// What a configuration must hold before anything starts.
fn check(c: &Config) -> Result<(), StartError> {
    if !(c.overcommit.cpu >= 1.0 && c.overcommit.memory >= 1.0) {
        return Err(StartError::Config(
            "overcommit factors must be at least 1".into(),
        ));
    }
    for (what, d) in [
        ("stats interval", c.stats_interval),
        ("heartbeat interval", c.heartbeat_interval),
        ("reconcile interval", c.reconcile_interval),
        ("stream recheck interval", c.stream_recheck_interval),
    ] {
        if d.is_zero() {
            return Err(StartError::Config(format!("the {what} must be positive")));
        }
    }
    if c.team_max_streams == 0 {
        return Err(StartError::Config(
            "a team must be allowed at least one stream".into(),
        ));
    }
    if c.rate_limit_per_sec > 0 && c.rate_limit_burst == 0 {
        return Err(StartError::Config(
            "the rate limit's burst must be at least 1".into(),
        ));
    }
    if c.build_concurrency == 0 {
        return Err(StartError::Config(
            "build concurrency must be at least 1".into(),
        ));
    }
    for name in &c.builtin_templates {
        if !crate::builds::builtin::is_builtin(name) {
            return Err(StartError::Config(format!(
                "{name:?} is not a built-in template (python, node, code-runner-beta)"
            )));
        }
    }
    if let Some(p) = &c.guest_ca_bundle {
        if std::fs::metadata(p).map(|m| !m.is_file()).unwrap_or(true) {
            return Err(StartError::Config(format!(
                "guest CA bundle {} is not a readable file",
                p.display()
            )));
        }
    }
    Ok(())
}

fn host_pool(store: &Store, pki: &Pki, overcommit: Overcommit) -> Result<HostPool, StartError> {
    let client_cert = pki
        .issue_client_cert()
        .map_err(service_err("client certificate"))?;
    Ok(HostPool::new(
        store.clone(),
        Some(TlsMaterial {
            ca_cert: pki.ca_cert_pem().to_string(),
            cert: client_cert.cert_pem,
            key: client_cert.key_pem,
        }),
        overcommit,
    ))
}

fn account_service(
    c: &Config,
    store: &Store,
    base_url: &str,
    capsules: Arc<CapsuleService>,
) -> Result<AccountService, StartError> {
    let mailer = Mailer::new(
        c.smtp_url.as_deref(),
        &c.smtp_from,
        c.data_dir.join("outbox"),
    )
    .map_err(service_err("mail settings"))?;
    info!(mail = %mailer.describe(), "mail ready");
    let github = c.github.as_ref().map(|g| {
        ProviderConfig::github(
            g.client_id.clone(),
            g.client_secret.clone(),
            &g.url,
            &g.api_url,
        )
    });
    Ok(AccountService::new(
        store.clone(),
        capsules,
        mailer,
        Arc::new(SystemClock),
        AccountConfig {
            oauth_redirect_url: c
                .oauth_redirect_url
                .clone()
                .unwrap_or_else(|| base_url.to_string()),
            public_url: base_url.to_string(),
            github,
            secure_cookies: c.secure_cookies,
        },
        AuthLimits::new(c.auth_ip_limit, c.auth_email_limit),
    ))
}

/// The key that seals secrets at rest (channel configs, the host CA, token keys): one every
/// replica shares.
fn platform_sealer(c: &Config) -> Result<Sealer, StartError> {
    Ok(match &c.encryption_key {
        Some(k) => Sealer::from_hex(k).map_err(service_err("WRENN_ENCRYPTION_KEY"))?,
        None => {
            if c.redis_url.is_some() {
                // Replicas: a key of each one's own would make every other's deliveries fail.
                return Err(StartError::Config("with REDIS_URL (several control-plane replicas) set WRENN_ENCRYPTION_KEY: the 64-hex key every replica shares to seal secrets at rest (e.g. `openssl rand -hex 32`)".into()));
            }
            if c.database_url.is_some() {
                warn!("WRENN_ENCRYPTION_KEY is not set: secrets are sealed with a key kept in the data dir; another replica on this database would need the same key");
            }
            Sealer::load_or_create(&c.data_dir).map_err(service_err("encryption key"))?
        }
    })
}

/// Notification channels: configs sealed with the platform's key.
fn channel_service(c: &Config, store: &Store, sealer: Arc<Sealer>) -> ChannelService {
    ChannelService::new(
        store.clone(),
        sealer,
        ChannelConfig {
            telegram_api_url: c.telegram_api_url.clone(),
            retry_delays: c.channel_retry_delays.clone(),
            allow_private_targets: c.channel_allow_private_targets,
        },
    )
}

/// This replica's name in leases: kept in `<data>/replica-id`, so a restarted control plane
/// takes its own lease back at once instead of waiting for it to lapse.
fn replica_id(data_dir: &Path) -> Result<String, StartError> {
    let path = data_dir.join("replica-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = wrenn_api::id::new_id("cp-");
            std::fs::write(&path, &id)
                .map_err(service_err(&format!("cannot write {}", path.display())))?;
            Ok(id)
        }
    }
}
