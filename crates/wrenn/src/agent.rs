//! `wrenn agent`: a host agent for a control plane. Registration, credentials and heartbeats
//! are `wrenn_agent::uplink`'s; this file turns flags into them and serves the control plane
//! until stopped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::info;
use wrenn_agent::uplink::{self, Credentials, Uplink};
use wrenn_agent::CapsuleManager;

use crate::HostArgs;

#[derive(Args)]
pub struct AgentArgs {
    /// Where images, capsule state and this agent's credentials live.
    #[arg(long, env = "WRENN_DATA_DIR", default_value = "/var/lib/wrenn-agent")]
    data_dir: PathBuf,
    /// The control plane's URL.
    #[arg(long, env = "WRENN_CONTROL_PLANE")]
    control_plane: Option<String>,
    /// A registration token from `POST /v1/hosts` (first start only).
    #[arg(long, env = "WRENN_REGISTRATION_TOKEN", hide_env_values = true)]
    register: Option<String>,
    /// Address the control plane reaches this agent at (ip:port); it is in the agent's
    /// certificate. Needed with --register.
    #[arg(long, env = "WRENN_AGENT_ADDRESS")]
    address: Option<SocketAddr>,
    /// Address to listen on (default: the advertised address).
    #[arg(long, env = "WRENN_AGENT_LISTEN")]
    listen: Option<SocketAddr>,
    /// Seconds between heartbeats.
    #[arg(long, env = "WRENN_HEARTBEAT_INTERVAL_SEC", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_interval_sec: u64,
    #[command(flatten)]
    host: HostArgs,
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let dir = crate::data_dir(&args.data_dir)?;
    let cfg = args.host.config(&dir)?;
    let http = uplink::http_client()?;
    let stored = Credentials::load(&dir);
    if stored.is_none() && args.register.is_none() {
        bail!(
            "this agent is not registered: start it once with --register <token> --address <ip:port> \
             --control-plane <url> (the token comes from POST /v1/hosts)"
        );
    }
    info!(data_dir = %dir.display(), "starting the host agent (first start builds guest images)");
    let manager = CapsuleManager::start(cfg)
        .await
        .context("host agent failed to start")?;
    let creds = match (stored, &args.register) {
        (_, Some(token)) => {
            let cp = args
                .control_plane
                .clone()
                .context("--register needs --control-plane <url>")?;
            let address = args.address.context(
                "--register needs --address <ip:port> (where the control plane reaches this agent)",
            )?;
            uplink::register(&http, &cp, token, address, &manager.host_capacity()).await?
        }
        (Some(mut c), None) => {
            if let Some(cp) = &args.control_plane {
                c.control_plane = cp.trim_end_matches('/').to_string();
            }
            uplink::refresh(&http, &mut c).await?;
            c
        }
        (None, None) => bail!("this agent is not registered"),
    };
    creds.save(&dir)?;
    info!(host_id = %creds.host_id, control_plane = %creds.control_plane, "credentials ready");

    let listen = args.listen.unwrap_or(creds.address);
    let interval = Duration::from_secs(args.heartbeat_interval_sec);
    let host: Arc<dyn wrenn_host::Host> = manager.clone();
    let (uplink, mut renewed) = Uplink::new(http, &dir, creds, host.clone(), interval);
    let stop = CancellationToken::new();
    let mut beater = tokio::spawn(uplink.run(stop.clone()));

    // Serve until stopped; a renewed certificate restarts the server with it.
    let mut stop_signal = Box::pin(crate::shutdown_signal());
    let outcome: Result<()> = loop {
        let material = renewed.borrow_and_update().clone();
        let mut next = renewed.clone();
        let serve = wrenn_host::serve(host.clone(), listen, &material, async move {
            let _ = next.changed().await;
        });
        println!("Wrenn agent serving the control plane on {listen} (mutual TLS)");
        tokio::select! {
            r = serve => match r {
                Ok(()) => info!("certificate renewed; restarting the agent service"),
                Err(e) => break Err(anyhow::anyhow!("agent service on {listen}: {e}")),
            },
            _ = &mut stop_signal => break Ok(()),
            r = &mut beater => break match r {
                Ok(r) => r.map_err(Into::into),
                Err(e) => Err(anyhow::anyhow!("heartbeat task: {e}")),
            },
        }
    };
    stop.cancel();
    if args.host.destroy_on_exit {
        info!("destroying every capsule before exit");
        manager.destroy_all().await;
    } else {
        info!("capsules keep running; the next start re-adopts them");
    }
    outcome
}
