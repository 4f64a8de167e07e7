//! The control plane's flags (`wrenn server`, `wrenn up`), turned into a
//! [`wrenn_server::Config`], and what it prints when it is up.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Args;
use wrenn_server::{Config, ControlPlane, EmbeddedHost, GithubApp, Overcommit};

#[derive(Args)]
pub struct CpArgs {
    /// Address the API listens on.
    #[arg(long, env = "WRENN_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// URL clients use to reach the API (default: http://<listen>).
    #[arg(long, env = "WRENN_PUBLIC_URL")]
    public_url: Option<String>,
    /// Domain of the port proxy's links, `{port}-{capsule}.{domain}` (default: the public URL's
    /// host and port). Point a wildcard DNS name at the API to use one; the SDK reads the same
    /// variable.
    #[arg(long, env = "WRENN_PROXY_DOMAIN")]
    proxy_domain: Option<String>,
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
    /// Seconds between re-checks of a WebSocket or SSE stream's credential: a deleted key, an
    /// ended session or a removed member ends the stream within this time.
    #[arg(long, env = "WRENN_STREAM_RECHECK_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    stream_recheck_sec: u64,
    /// Requests a second each API key and each browser session may make to the API (0: no
    /// limit); past it, 429 with Retry-After. Shared by replicas through REDIS_URL.
    #[arg(long, env = "WRENN_RATE_LIMIT_PER_SEC", default_value_t = 50)]
    rate_limit_per_sec: u32,
    /// How many requests beyond the rate a caller may make at once.
    #[arg(long, env = "WRENN_RATE_LIMIT_BURST", default_value_t = 200)]
    rate_limit_burst: u32,
    /// WebSocket and SSE streams one team may hold open (per control-plane replica).
    #[arg(long, env = "WRENN_TEAM_MAX_STREAMS", default_value_t = 200, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    team_max_streams: u64,
    /// Default team quotas, `name=limit` separated by commas (capsules, vcpus, memory_mb,
    /// disk_mb, snapshots); unnamed ones keep their defaults (50 capsules, 32 vCPUs, 64 GiB of
    /// memory, 500 GiB of disk, 50 snapshots). Platform admins set a team's own with
    /// PUT /v1/admin/teams/{id}/quota.
    #[arg(long, env = "WRENN_TEAM_QUOTA", default_value = "")]
    team_quota: String,
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
    /// Built-in templates built in the background on start, when missing or out of date
    /// (comma-separated: python, node, code-runner-beta; or `none`)
    #[arg(
        long,
        env = "WRENN_BUILTIN_TEMPLATES",
        default_value = "python,node,code-runner-beta"
    )]
    builtin_templates: String,
    /// Template builds that run at once (later ones wait, `pending`)
    #[arg(long, env = "WRENN_BUILD_CONCURRENCY", default_value_t = 2)]
    build_concurrency: usize,
    /// CA certificates (PEM) that build guests trust besides their own, for networks that
    /// inspect TLS: `host` (this machine's store, /etc/ssl/certs/ca-certificates.crt), `none`,
    /// or a file
    #[arg(long, env = "WRENN_GUEST_CA_BUNDLE", default_value = "host")]
    guest_ca_bundle: String,
}

/// The host's own CA store (Debian's layout).
const HOST_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

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

impl CpArgs {
    /// The control plane's configuration for `data_dir`.
    fn config(self, data_dir: PathBuf) -> Result<Config> {
        let github = match (self.github_client_id, self.github_client_secret) {
            (Some(client_id), Some(client_secret)) => Some(GithubApp {
                client_id,
                client_secret,
                url: self.github_url,
                api_url: self.github_api_url,
            }),
            (None, None) => None,
            _ => bail!(
                "GitHub OAuth needs both WRENN_GITHUB_CLIENT_ID and WRENN_GITHUB_CLIENT_SECRET"
            ),
        };
        Ok(Config {
            data_dir,
            listen: self.listen,
            public_url: self.public_url,
            proxy_domain: self.proxy_domain,
            admin_email: self.admin_email,
            admin_password: self.admin_password,
            database_url: self.database_url,
            redis_url: self.redis_url,
            stats_interval: Duration::from_secs(self.stats_interval_sec),
            heartbeat_interval: Duration::from_secs(self.heartbeat_interval_sec),
            reconcile_interval: Duration::from_secs(self.reconcile_interval_sec),
            stream_recheck_interval: Duration::from_secs(self.stream_recheck_sec),
            rate_limit_per_sec: self.rate_limit_per_sec,
            rate_limit_burst: self.rate_limit_burst,
            team_max_streams: usize::try_from(self.team_max_streams).unwrap_or(usize::MAX),
            team_quota: wrenn_api::quota::QuotaFigures::DEFAULT
                .parse_over(&self.team_quota)
                .map_err(|e| anyhow::anyhow!("WRENN_TEAM_QUOTA: {e}"))?,
            overcommit: Overcommit {
                cpu: self.cpu_overcommit,
                memory: self.memory_overcommit,
            },
            smtp_url: self.smtp_url,
            smtp_from: self.smtp_from,
            oauth_redirect_url: self.oauth_redirect_url,
            github,
            secure_cookies: !self.insecure_cookies,
            auth_ip_limit: self.auth_ip_limit,
            auth_email_limit: self.auth_email_limit,
            encryption_key: self.encryption_key,
            telegram_api_url: self.telegram_api_url,
            channel_retry_delays: self.channel_retry_delays.0,
            channel_allow_private_targets: self.channel_allow_private_targets,
            builtin_templates: match self.builtin_templates.trim() {
                "" | "none" => Vec::new(),
                list => list.split(',').map(|s| s.trim().to_string()).collect(),
            },
            build_concurrency: self.build_concurrency,
            guest_ca_bundle: match self.guest_ca_bundle.as_str() {
                "none" => None,
                "host" => Some(PathBuf::from(HOST_CA_BUNDLE)).filter(|p| p.exists()),
                path => Some(PathBuf::from(path)),
            },
        })
    }
}

/// Starts the control plane and says so; `embedded` (with its description for the banner) is
/// a host of its own.
pub async fn start(
    args: CpArgs,
    data_dir: PathBuf,
    embedded: Option<(EmbeddedHost, String)>,
) -> Result<ControlPlane> {
    let bootstrap_file = data_dir.join("bootstrap.json");
    let config = args.config(data_dir)?;
    let (embedded, banner) = match embedded {
        Some((host, about)) => (Some(host), format!("Wrenn is up: {{url}}  ({about})")),
        None => (
            None,
            "Wrenn control plane is up: {url}  (capsules run on registered agents)".to_string(),
        ),
    };
    let cp = ControlPlane::start(config, embedded).await?;
    let base_url = cp.base_url().to_string();
    println!("{}", banner.replace("{url}", &base_url));
    match cp.bootstrap() {
        Some(b) => {
            println!("  API key:  {}", b.api_key);
            println!("  admin:    {}", b.admin_email);
            if let Some(p) = &b.admin_password {
                println!("  password: {p}   (shown this once; log in at POST /v1/auth/login)");
            }
        }
        None => println!("  (bootstrap.json is gone; use an API key you created)"),
    }
    println!("  saved in: {}", bootstrap_file.display());
    println!(
        "  try:      curl -s -X POST -H \"X-API-Key: $(sudo jq -r .api_key {})\" {base_url}/v1/capsules",
        bootstrap_file.display()
    );
    Ok(cp)
}
