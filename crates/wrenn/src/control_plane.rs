//! The control plane: the public API, accounts, hosts and the loops that keep capsules and
//! hosts truthful. Run by `wrenn server`, and by `wrenn up` with its embedded agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use tracing::info;
use wrenn_agent::rpc::TlsMaterial;
use wrenn_agent::CapsuleManager;
use wrenn_server::accounts::limits::AuthLimits;
use wrenn_server::accounts::mail::Mailer;
use wrenn_server::accounts::oauth::ProviderConfig;
use wrenn_server::accounts::{AccountConfig, AccountService, SystemClock};
use wrenn_server::audit::AuditLog;
use wrenn_server::channels::{ChannelConfig, ChannelService, ConfigCipher};
use wrenn_server::events::EventBus;
use wrenn_server::host::LocalHost;
use wrenn_server::hosts::pki::Pki;
use wrenn_server::hosts::{HostConfig, HostService};
use wrenn_server::pool::{HostPool, Overcommit};
use wrenn_server::service::CapsuleService;
use wrenn_server::stats::StatsService;
use wrenn_server::store::Store;
use wrenn_server::AppState;

#[derive(Args)]
pub struct CpArgs {
    /// Address the API listens on.
    #[arg(long, env = "WRENN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// URL clients use to reach the API (default: http://<listen>).
    #[arg(long, env = "WRENN_PUBLIC_URL")]
    public_url: Option<String>,
    /// Email of the bootstrap admin created on first start.
    #[arg(long, env = "WRENN_ADMIN_EMAIL", default_value = "admin@localhost")]
    admin_email: String,
    /// Password of the bootstrap admin (first start only); a random one is printed otherwise.
    #[arg(long, env = "WRENN_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
    /// Database: `postgres://user:pass@host/db` for PostgreSQL; SQLite under the data dir when
    /// unset.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Redis for the event bus shared by several control-plane replicas
    /// (`redis://host:6379`); in-process events when unset.
    #[arg(long, env = "REDIS_URL")]
    redis_url: Option<String>,
    /// Seconds between team statistics samples (`/v1/capsules/stats` and `/usage`).
    #[arg(long, env = "WRENN_STATS_INTERVAL_SEC", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stats_interval_sec: u64,
    /// Seconds between host agents' heartbeats; a host silent for three is unreachable.
    #[arg(long, env = "WRENN_HEARTBEAT_INTERVAL_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_interval_sec: u64,
    /// Seconds between reconciler passes (database vs. every host's live capsules).
    #[arg(long, env = "WRENN_RECONCILE_INTERVAL_SEC", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86400))]
    reconcile_interval_sec: u64,
    /// How many vCPUs may be reserved per host core, and memory per MiB of host memory,
    /// when placing capsules.
    #[arg(long, env = "WRENN_CPU_OVERCOMMIT", default_value_t = 16.0)]
    cpu_overcommit: f64,
    #[arg(long, env = "WRENN_MEMORY_OVERCOMMIT", default_value_t = 2.0)]
    memory_overcommit: f64,
    /// Mail server: `smtp://[user:pass@]host[:port][?tls=required]` or `smtps://…`. Without
    /// it, mails (activation, password reset) go to `<data>/outbox` and their links are logged.
    #[arg(long, env = "WRENN_SMTP_URL", hide_env_values = true)]
    smtp_url: Option<String>,
    /// Sender of the platform's mails.
    #[arg(
        long,
        env = "WRENN_SMTP_FROM",
        default_value = "Wrenn <noreply@localhost>"
    )]
    smtp_from: String,
    /// Base URL of the dashboard, where OAuth flows end (`{url}/auth/{provider}/callback`).
    /// Defaults to the public URL.
    #[arg(long, env = "OAUTH_REDIRECT_URL")]
    oauth_redirect_url: Option<String>,
    /// GitHub OAuth app (both needed to enable "Sign in with GitHub").
    #[arg(long, env = "WRENN_GITHUB_CLIENT_ID")]
    github_client_id: Option<String>,
    #[arg(long, env = "WRENN_GITHUB_CLIENT_SECRET", hide_env_values = true)]
    github_client_secret: Option<String>,
    /// GitHub's web and API base URLs (GitHub Enterprise, or a stand-in in tests).
    #[arg(long, env = "WRENN_GITHUB_URL", default_value = "https://github.com")]
    github_url: String,
    #[arg(
        long,
        env = "WRENN_GITHUB_API_URL",
        default_value = "https://api.github.com"
    )]
    github_api_url: String,
    /// Drop `Secure` from session cookies. Only for plain-http access from another machine
    /// during development: browsers accept Secure cookies from http://localhost already.
    #[arg(long, env = "WRENN_INSECURE_COOKIES")]
    insecure_cookies: bool,
    /// Login, signup, activation and reset attempts allowed per minute per client IP…
    #[arg(long, env = "WRENN_AUTH_IP_LIMIT", default_value_t = 60)]
    auth_ip_limit: u32,
    /// …and per email address.
    #[arg(long, env = "WRENN_AUTH_EMAIL_LIMIT", default_value_t = 10)]
    auth_email_limit: u32,
    /// Key sealing notification channels' secrets (64 hex). Without it one is generated and
    /// kept in `<data>/encryption.key`; replicas sharing a database must share the key.
    #[arg(long, env = "WRENN_ENCRYPTION_KEY", hide_env_values = true)]
    encryption_key: Option<String>,
    /// Telegram's bot API base URL (a proxy, or a stand-in in tests).
    #[arg(
        long,
        env = "WRENN_TELEGRAM_API_URL",
        default_value = "https://api.telegram.org"
    )]
    telegram_api_url: String,
    /// Seconds to wait before each retry of a failed notification (comma-separated).
    #[arg(long, env = "WRENN_CHANNEL_RETRY_DELAYS", default_value = "10,30", value_parser = parse_delays)]
    channel_retry_delays: Delays,
    /// Let channels' URLs reach loopback and private addresses (services on the platform's
    /// own network). Off: notifications go to public addresses only.
    #[arg(long, env = "WRENN_CHANNEL_ALLOW_PRIVATE_TARGETS")]
    channel_allow_private_targets: bool,
}

#[derive(Clone, Debug)]
struct Delays(Vec<std::time::Duration>);

fn parse_delays(s: &str) -> std::result::Result<Delays, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<u64>()
                .ok()
                .filter(|n| *n <= 3600)
                .map(std::time::Duration::from_secs)
                .ok_or_else(|| format!("{p:?} is not a number of seconds (0 to 3600)"))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .and_then(|v| {
            if v.len() > 10 {
                Err("at most 10 retries".into())
            } else {
                Ok(Delays(v))
            }
        })
}

/// Runs the control plane until SIGTERM/SIGINT; with `embedded`, that agent is a host of its
/// own (and is handed back for shutdown).
pub async fn run(
    args: CpArgs,
    data_dir: PathBuf,
    embedded: Option<Arc<CapsuleManager>>,
) -> Result<Option<Arc<CapsuleManager>>> {
    if !(args.cpu_overcommit >= 1.0 && args.memory_overcommit >= 1.0) {
        bail!("overcommit factors must be at least 1");
    }
    let store = match &args.database_url {
        Some(url) => Store::connect(url).await,
        None => Store::open_sqlite(&data_dir.join("wrenn.db")).await,
    }
    .context("cannot open the database")?;
    info!(backend = ?store.backend(), "database ready");

    // Hosts: the platform CA issues our client certificate for calling agents.
    let pki = Arc::new(Pki::load(&store).await.context("host credentials")?);
    let client_cert = pki
        .issue_client_cert()
        .map_err(|e| anyhow::anyhow!("client certificate: {e}"))?;
    let pool = Arc::new(HostPool::new(
        store.clone(),
        Some(TlsMaterial {
            ca_cert: pki.ca_cert_pem().to_string(),
            cert: client_cert.cert_pem,
            key: client_cert.key_pem,
        }),
        Overcommit {
            cpu: args.cpu_overcommit,
            memory: args.memory_overcommit,
        },
    ));
    let embedded_id = match &embedded {
        Some(manager) => {
            let id =
                wrenn_server::hosts::ensure_embedded_host(&store, &data_dir, &manager.capacity())
                    .await
                    .context("cannot record the embedded host")?;
            pool.add(Arc::new(LocalHost {
                id: id.clone(),
                manager: manager.clone(),
            }));
            Some(id)
        }
        None => None,
    };
    for h in store.hosts(None).await? {
        if matches!(h.status.as_str(), "online" | "unreachable" | "draining") {
            pool.connect(&h);
        }
    }
    let events = Arc::new(match &args.redis_url {
        Some(url) => EventBus::redis(url)
            .await
            .with_context(|| format!("cannot use Redis at {url} for events"))?,
        None => EventBus::local(),
    });
    let capsules = Arc::new(CapsuleService::new(
        store.clone(),
        pool.clone(),
        events.clone(),
    ));
    capsules
        .reconcile()
        .await
        .map_err(|e| anyhow::anyhow!("reconcile: {e}"))?;
    // Every 2 s: capsules whose VM died turn `error`; idle ones are auto-paused (REFERENCE.md).
    let reaper = capsules.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = reaper.record_dead_vms().await {
                tracing::warn!(error = %e.message, "dead-VM pass failed");
            }
            if let Err(e) = reaper.pause_idle().await {
                tracing::warn!(error = %e.message, "TTL reaper pass failed");
            }
        }
    });

    // Periodically: the database and every online host's live list agree (orphans fixed).
    let reconciler = capsules.clone();
    let reconcile_every = args.reconcile_interval_sec;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(reconcile_every));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = reconciler.reconcile_pass().await {
                tracing::warn!(error = %e.message, "reconciler pass failed");
            }
        }
    });

    // Team statistics sampler (REFERENCE.md: every 10 s by default).
    let stats = Arc::new(StatsService::new(
        store.clone(),
        std::time::Duration::from_secs(args.stats_interval_sec),
    ));
    // One replica samples (usage would be counted once per replica otherwise): the one
    // holding the `stats-sampler` lease, renewed every tick, taken over when it lapses.
    let sampler = stats.clone();
    let lease_store = store.clone();
    let replica = replica_id(&data_dir).context("replica id")?;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sampler.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let ttl = chrono::Duration::from_std(sampler.interval() * 3)
            .unwrap_or(chrono::Duration::seconds(30));
        let mut leading = false;
        loop {
            tick.tick().await;
            let now = chrono::Utc::now();
            match lease_store
                .hold_lease("stats-sampler", &replica, now, ttl)
                .await
            {
                Ok(held) => {
                    if held != leading {
                        info!(replica = %replica, sampling = held, "team stats sampler lease changed");
                        leading = held;
                        if !held {
                            sampler.stop_sampling().await;
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "stats sampler lease unavailable");
                    continue;
                }
            }
            if !leading {
                continue;
            }
            if let Err(e) = sampler.sample(now).await {
                tracing::warn!(error = %e.message, "team stats sample failed");
            }
        }
    });

    let base_url = args
        .public_url
        .unwrap_or_else(|| format!("http://{}", args.listen));
    let bootstrap = wrenn_server::bootstrap::ensure(
        &store,
        &data_dir,
        &base_url,
        &args.admin_email,
        args.admin_password.as_deref(),
    )
    .await?;
    let mailer = Mailer::new(
        args.smtp_url.as_deref(),
        &args.smtp_from,
        data_dir.join("outbox"),
    )
    .context("mail settings")?;
    info!(mail = %mailer.describe(), "mail ready");
    let github = match (args.github_client_id, args.github_client_secret) {
        (Some(id), Some(secret)) => Some(ProviderConfig::github(
            id,
            secret,
            &args.github_url,
            &args.github_api_url,
        )),
        (None, None) => None,
        _ => bail!("GitHub OAuth needs both WRENN_GITHUB_CLIENT_ID and WRENN_GITHUB_CLIENT_SECRET"),
    };
    let accounts = Arc::new(AccountService::new(
        store.clone(),
        capsules.clone(),
        mailer,
        Arc::new(SystemClock),
        AccountConfig {
            oauth_redirect_url: args.oauth_redirect_url.unwrap_or_else(|| base_url.clone()),
            public_url: base_url.clone(),
            github,
            secure_cookies: !args.insecure_cookies,
        },
        AuthLimits::new(args.auth_ip_limit, args.auth_email_limit),
    ));
    let hosts = Arc::new(HostService::new(
        store.clone(),
        pki,
        Arc::new(SystemClock),
        HostConfig {
            heartbeat_interval: std::time::Duration::from_secs(args.heartbeat_interval_sec),
            embedded: embedded_id,
        },
        capsules.clone(),
    ));
    // Liveness: the embedded agent beats from here; the monitor runs twice per interval.
    let monitor = hosts.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(monitor.config().heartbeat_interval / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = monitor.embedded_heartbeat().await {
                tracing::warn!(error = %e.message, "embedded heartbeat failed");
            }
            if let Err(e) = monitor.monitor().await {
                tracing::warn!(error = %e.message, "host monitor pass failed");
            }
        }
    });
    // Housekeeping: expired sessions every 10 minutes, deleted accounts purged and old
    // delivery records forgotten daily.
    let housekeeper = accounts.clone();
    let delivery_store = store.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(600));
        let mut n: u64 = 0;
        loop {
            tick.tick().await;
            if let Err(e) = housekeeper.prune().await {
                tracing::warn!(error = %e.message, "session cleanup failed");
            }
            if n.is_multiple_of(144) {
                match housekeeper.purge_deleted().await {
                    Ok(0) => {}
                    Ok(k) => info!(users = k, "deleted accounts purged"),
                    Err(e) => tracing::warn!(error = %e.message, "account purge failed"),
                }
                let before = chrono::Utc::now()
                    - chrono::Duration::days(wrenn_server::channels::DELIVERY_RETENTION_DAYS);
                if let Err(e) = delivery_store.prune_deliveries(before).await {
                    tracing::warn!(error = %e, "delivery records cleanup failed");
                }
            }
            n += 1;
        }
    });
    // Notification channels: sealed configs, one delivery loop per replica sharing the
    // bus's `channels` queue.
    let cipher = Arc::new(match &args.encryption_key {
        Some(k) => ConfigCipher::from_hex(k).context("WRENN_ENCRYPTION_KEY")?,
        None => {
            if args.redis_url.is_some() {
                // Replicas: a key of each one's own would make every other's deliveries fail.
                bail!("with REDIS_URL (several control-plane replicas) set WRENN_ENCRYPTION_KEY: the 64-hex key every replica shares to seal channel secrets (e.g. `openssl rand -hex 32`)");
            }
            if args.database_url.is_some() {
                tracing::warn!("WRENN_ENCRYPTION_KEY is not set: channel secrets are sealed with a key kept in the data dir; another replica on this database would need the same key");
            }
            ConfigCipher::load_or_create(&data_dir).context("channel encryption key")?
        }
    });
    let channels = Arc::new(ChannelService::new(
        store.clone(),
        cipher,
        ChannelConfig {
            telegram_api_url: args.telegram_api_url.clone(),
            retry_delays: args.channel_retry_delays.0.clone(),
            allow_private_targets: args.channel_allow_private_targets,
        },
    ));
    let queue = events
        .work_queue(wrenn_server::channels::QUEUE_GROUP, channels.max_handling())
        .await
        .context("notification queue")?;
    tokio::spawn(channels.clone().run(queue, events.closed()));

    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let audit = AuditLog::new(store.clone());
    let app = wrenn_server::http::router(AppState {
        store,
        capsules,
        stats,
        key_usage: Default::default(),
        accounts,
        hosts,
        events: events.clone(),
        audit,
        channels,
    });

    match &embedded {
        Some(m) => println!(
            "Wrenn is up: {base_url}  (vmm: {}, accelerator: {})",
            m.vmm_version(),
            m.accel()
        ),
        None => {
            println!("Wrenn control plane is up: {base_url}  (capsules run on registered agents)")
        }
    }
    match bootstrap {
        Some(b) => {
            println!("  API key:  {}", b.api_key);
            println!("  admin:    {}", b.admin_email);
            if let Some(p) = &b.admin_password {
                println!("  password: {p}   (shown this once; log in at POST /v1/auth/login)");
            }
        }
        None => println!("  (bootstrap.json is gone; use an API key you created)"),
    }
    println!("  saved in: {}", data_dir.join("bootstrap.json").display());
    println!(
        "  try:      curl -s -X POST -H \"X-API-Key: $(jq -r .api_key {})\" {base_url}/v1/capsules",
        data_dir.join("bootstrap.json").display()
    );

    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        crate::shutdown_signal().await;
        // Event streams never end by themselves: end them so the shutdown does not wait.
        events.close();
    })
    .await?;
    Ok(embedded)
}

/// This replica's name in leases: kept in `<data>/replica-id`, so a restarted control plane
/// takes its own lease back at once instead of waiting for it to lapse.
fn replica_id(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("replica-id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_string()),
        _ => {
            let id = wrenn_api::id::new_id("cp-");
            std::fs::write(&path, &id)
                .with_context(|| format!("cannot write {}", path.display()))?;
            Ok(id)
        }
    }
}
