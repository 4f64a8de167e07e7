//! `wrenn`: one binary for the whole platform.
//!
//! - `wrenn up`: single-node mode — control plane and one embedded host agent in one process,
//!   SQLite under the data dir, zero configuration.
//! - `wrenn server` / `wrenn agent`: the control plane and host agent as separate processes
//!   (multi-host mode; not available in this version, see README's status table).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing::info;
use wrenn_agent::config::AccelChoice;
use wrenn_agent::{AgentConfig, CapsuleManager};
use wrenn_server::accounts::limits::AuthLimits;
use wrenn_server::accounts::mail::Mailer;
use wrenn_server::accounts::oauth::ProviderConfig;
use wrenn_server::accounts::{AccountConfig, AccountService, SystemClock};
use wrenn_server::host::LocalHost;
use wrenn_server::hosts::pki::Pki;
use wrenn_server::hosts::{HostConfig, HostService};
use wrenn_server::service::CapsuleService;
use wrenn_server::stats::StatsService;
use wrenn_server::store::Store;
use wrenn_server::AppState;

#[derive(Parser)]
#[command(
    name = "wrenn",
    version,
    about = "Wrenn: microVM capsules for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole platform on this machine (control plane + host agent).
    Up(Box<UpArgs>),
    /// Run the control plane alone (multi-host mode).
    Server,
    /// Run a host agent alone (multi-host mode).
    Agent,
}

#[derive(Args)]
struct UpArgs {
    /// Where the database, images and capsule state live.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    data_dir: PathBuf,
    /// Address the API listens on.
    #[arg(long, env = "WRENN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// URL clients use to reach the API (default: http://<listen>).
    #[arg(long, env = "WRENN_PUBLIC_URL")]
    public_url: Option<String>,
    /// Image cache directory (default: <data dir>/images).
    #[arg(long, env = "WRENN_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// The static envd binary injected into guests (default: next to this binary).
    #[arg(long, env = "WRENN_ENVD")]
    envd: Option<PathBuf>,
    /// CPU accelerator: auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, env = "WRENN_ACCEL", default_value = "auto")]
    accel: AccelChoice,
    /// Email of the bootstrap admin created on first start.
    #[arg(long, env = "WRENN_ADMIN_EMAIL", default_value = "admin@localhost")]
    admin_email: String,
    /// First address of the range used for capsule network slots (a /30 each).
    #[arg(long, env = "WRENN_SLOT_BASE", default_value = "10.201.0.0")]
    slot_base: std::net::Ipv4Addr,
    /// Most capsules this host runs at once.
    #[arg(long, env = "WRENN_MAX_SLOTS", default_value_t = 256)]
    max_slots: u32,
    /// Debian mirror used to build guest images.
    #[arg(
        long,
        env = "WRENN_DEBIAN_MIRROR",
        default_value = "http://deb.debian.org/debian"
    )]
    debian_mirror: String,
    /// Destroy every capsule on shutdown instead of leaving them running for the next start.
    #[arg(long, env = "WRENN_DESTROY_ON_EXIT")]
    destroy_on_exit: bool,
    /// Restore every create from a template snapshot made on first use (`false`: cold-boot
    /// every capsule; saves the snapshots' disk space, costs ~1.5 s per create).
    #[arg(long, env = "WRENN_TEMPLATE_SNAPSHOTS", default_value_t = true, action = clap::ArgAction::Set)]
    template_snapshots: bool,
    /// Database: `postgres://user:pass@host/db` for PostgreSQL; SQLite under the data dir when
    /// unset.
    #[arg(long, env = "DATABASE_URL")]
    database_url: Option<String>,
    /// Seconds between team statistics samples (`/v1/capsules/stats` and `/usage`).
    #[arg(long, env = "WRENN_STATS_INTERVAL_SEC", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stats_interval_sec: u64,
    /// Seconds between host agents' heartbeats; a host silent for three is unreachable.
    #[arg(long, env = "WRENN_HEARTBEAT_INTERVAL_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_interval_sec: u64,
    /// Password of the bootstrap admin (first start only); a random one is printed otherwise.
    #[arg(long, env = "WRENN_ADMIN_PASSWORD", hide_env_values = true)]
    admin_password: Option<String>,
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
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_http=warn,sqlx=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Up(args) => rt.block_on(up(*args)),
        Command::Server | Command::Agent => bail!(
            "multi-host mode (separate `wrenn server` and `wrenn agent`) is not available yet in this version; \
             run `wrenn up` for a single-node platform"
        ),
    }
}

async fn up(args: UpArgs) -> Result<()> {
    if args.max_slots == 0 || args.max_slots > 16384 {
        bail!("--max-slots must be between 1 and 16384");
    }
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let data_dir = args.data_dir.canonicalize()?;
    let envd = match args.envd {
        Some(p) => p,
        None => find_envd()?,
    };
    let mut cfg = AgentConfig::new(data_dir.clone(), envd);
    if let Some(images) = args.images_dir {
        cfg.images_dir = images;
    }
    cfg.accel = args.accel;
    cfg.slot_base = args.slot_base;
    cfg.max_slots = args.max_slots;
    cfg.debian_mirror = args.debian_mirror;
    cfg.template_snapshots = args.template_snapshots;

    info!(data_dir = %data_dir.display(), "starting the host agent (first start builds guest images)");
    let manager = CapsuleManager::start(cfg)
        .await
        .context("host agent failed to start")?;
    let store = match &args.database_url {
        Some(url) => Store::connect(url).await,
        None => Store::open_sqlite(&data_dir.join("wrenn.db")).await,
    }
    .context("cannot open the database")?;
    info!(backend = ?store.backend(), "database ready");
    let host_id = wrenn_server::hosts::ensure_embedded_host(&store, &data_dir, &manager.capacity())
        .await
        .context("cannot record the embedded host")?;
    let host = Arc::new(LocalHost {
        id: host_id.clone(),
        manager: manager.clone(),
    });
    let capsules = Arc::new(CapsuleService::new(store.clone(), host));
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

    // Team statistics sampler (REFERENCE.md: every 10 s by default).
    let stats = Arc::new(StatsService::new(
        store.clone(),
        std::time::Duration::from_secs(args.stats_interval_sec),
    ));
    let sampler = stats.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(sampler.interval());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = sampler.sample(chrono::Utc::now()).await {
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
    let pki = Arc::new(Pki::load(&store).await.context("host credentials")?);
    let hosts = Arc::new(HostService::new(
        store.clone(),
        pki,
        Arc::new(SystemClock),
        HostConfig {
            heartbeat_interval: std::time::Duration::from_secs(args.heartbeat_interval_sec),
            embedded: Some(host_id),
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
    // Housekeeping: expired sessions every 10 minutes, deleted accounts purged daily.
    let housekeeper = accounts.clone();
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
            }
            n += 1;
        }
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let app = wrenn_server::http::router(AppState {
        store,
        capsules,
        stats,
        key_usage: Default::default(),
        accounts,
        hosts,
    });

    println!(
        "Wrenn is up: {base_url}  (vmm: {}, accelerator: {})",
        manager.vmm_version(),
        manager.accel()
    );
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
    .with_graceful_shutdown(shutdown_signal())
    .await?;
    if args.destroy_on_exit {
        info!("destroying every capsule before exit");
        manager.destroy_all().await;
    } else {
        info!("capsules keep running; the next `wrenn up` re-adopts them");
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    info!("shutting down");
}

/// envd sits next to the `wrenn` binary in an install, or in cargo's static-target directory
/// when run from a checkout.
fn find_envd() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("binary has no directory")?;
    // In a checkout, target/debug/envd is a dynamically linked build of the same crate: the
    // static one under the explicit target directory wins.
    let candidates = [
        dir.join("../x86_64-unknown-linux-gnu/release/envd"),
        dir.join("envd"),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize())
        .transpose()?
        .context("cannot find the envd binary: build it with scripts/build.sh or pass --envd")
}
