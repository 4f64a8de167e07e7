//! `wrenn`: one binary for the whole platform.
//!
//! - `wrenn up`: single-node mode — control plane and one embedded host agent in one process,
//!   SQLite under the data dir, zero configuration.
//! - `wrenn server`: the control plane alone; it drives registered `wrenn agent`s.
//! - `wrenn agent`: a host agent; registers with a control plane once (`--register <token>`),
//!   then heartbeats and serves the control plane over gRPC with mutual TLS.

mod agent;
mod control_plane;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use tracing::info;
use wrenn_agent::{AccelChoice, AgentConfig};

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
    /// Run the control plane alone; capsules run on registered `wrenn agent`s.
    Server(Box<ServerArgs>),
    /// Run a host agent for a control plane.
    Agent(Box<agent::AgentArgs>),
}

#[derive(Args)]
struct UpArgs {
    /// Where the database, images and capsule state live.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    data_dir: PathBuf,
    #[command(flatten)]
    cp: control_plane::CpArgs,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Args)]
struct ServerArgs {
    /// Where the database (SQLite, unless DATABASE_URL) and the outbox live.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn")]
    data_dir: PathBuf,
    #[command(flatten)]
    cp: control_plane::CpArgs,
}

/// What a host agent needs to run VMs (`wrenn up` and `wrenn agent`).
#[derive(Args)]
pub struct HostArgs {
    /// Image cache directory (default: <data dir>/images).
    #[arg(long, env = "WRENN_IMAGES_DIR")]
    images_dir: Option<PathBuf>,
    /// The static envd binary injected into guests (default: next to this binary).
    #[arg(long, env = "WRENN_ENVD")]
    envd: Option<PathBuf>,
    /// CPU accelerator: auto (probe KVM, fall back to TCG), kvm or tcg.
    #[arg(long, env = "WRENN_ACCEL", default_value = "auto")]
    accel: AccelChoice,
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
    /// Remove a per-shape template snapshot no capsule has used for this many hours (0: never)
    #[arg(long, env = "WRENN_TEMPLATE_SNAPSHOT_IDLE_HOURS", default_value_t = 24)]
    template_snapshot_idle_hours: u64,
    /// Free disk (MiB) the host keeps for itself: creates and resumes that would leave less are
    /// refused with 507 `insufficient_storage`.
    #[arg(long, env = "WRENN_DISK_RESERVE_MB", default_value_t = wrenn_agent::DEFAULT_DISK_RESERVE_MB)]
    disk_reserve_mb: u64,
}

impl HostArgs {
    /// The agent configuration for `data_dir`.
    fn config(&self, data_dir: &std::path::Path) -> Result<AgentConfig> {
        if self.max_slots == 0 || self.max_slots > 16384 {
            anyhow::bail!("--max-slots must be between 1 and 16384");
        }
        let envd = match &self.envd {
            Some(p) => p.clone(),
            None => find_envd()?,
        };
        let mut cfg = AgentConfig::new(data_dir.to_path_buf(), envd);
        if let Some(images) = &self.images_dir {
            cfg.images_dir = images.clone();
        }
        cfg.accel = self.accel;
        cfg.slot_base = self.slot_base;
        cfg.max_slots = self.max_slots;
        cfg.debian_mirror = self.debian_mirror.clone();
        cfg.template_snapshots = self.template_snapshots;
        cfg.disk_reserve_mb = self.disk_reserve_mb;
        cfg.shape_snapshot_idle = (self.template_snapshot_idle_hours > 0)
            .then(|| std::time::Duration::from_secs(self.template_snapshot_idle_hours * 3600));
        Ok(cfg)
    }
}

/// Creates `dir`, owner only (0700: it holds the database, keys, capsules' disks and memory;
/// jailed VMs reach their own files through bind mounts, never through it), and returns its
/// canonical path.
fn data_dir(dir: &std::path::Path) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create data dir {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot make data dir {} owner-only", dir.display()))?;
    Ok(dir.canonicalize()?)
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
        Command::Server(args) => rt.block_on(async move {
            let dir = data_dir(&args.data_dir)?;
            let cp = control_plane::start(args.cp, dir, None).await?;
            Ok(cp.serve_until(shutdown_signal()).await?)
        }),
        Command::Agent(args) => rt.block_on(agent::run(*args)),
    }
}

async fn up(args: UpArgs) -> Result<()> {
    let dir = data_dir(&args.data_dir)?;
    let cfg = args.host.config(&dir)?;
    info!(data_dir = %dir.display(), "starting the host agent (first start builds guest images)");
    let manager = wrenn_agent::CapsuleManager::start(cfg)
        .await
        .context("host agent failed to start")?;
    let embedded = wrenn_server::EmbeddedHost {
        host: manager.clone(),
        capacity: manager.host_capacity(),
    };
    let about = format!(
        "vmm: {}, accelerator: {}",
        manager.vmm_version(),
        manager.accel()
    );
    let cp = control_plane::start(args.cp, dir, Some((embedded, about))).await?;
    let served = cp.serve_until(shutdown_signal()).await;
    if args.host.destroy_on_exit {
        info!("destroying every capsule before exit");
        manager.destroy_all().await;
    } else {
        info!("capsules keep running; the next `wrenn up` re-adopts them");
    }
    Ok(served?)
}

pub(crate) async fn shutdown_signal() {
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
