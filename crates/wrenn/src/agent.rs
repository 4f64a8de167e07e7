//! `wrenn agent`: a host agent for a control plane.
//!
//! First start: `--register <token>` (from `POST /v1/hosts`) sends this machine's specs and
//! receives a host token, a refresh token and TLS material, kept in
//! `<data>/agent-credentials.json` (mode 0600). Every start refreshes them (new token, new
//! refresh token, new certificate), then the agent serves the control plane over gRPC with
//! mutual TLS and sends heartbeats. When the control plane refuses its refresh token (revoked,
//! host deleted) the agent stops with a message saying so; a 404 on a heartbeat (host deleted)
//! also removes the stored credentials.
//!
//! When [`MISSED_BEFORE_PAUSE`] heartbeats in a row cannot reach the control plane, the agent
//! pauses every running capsule (REFERENCE.md: nothing runs unobserved, and no inactivity
//! timeout is enforced while the control plane is away); once heartbeats get through again it
//! reports each as `sandbox.auto_paused`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};
use wrenn_agent::rpc::TlsMaterial;
use wrenn_agent::CapsuleManager;
use wrenn_api::{HostTls, RefreshHostTokenResponse, RegisterHostResponse};

use crate::HostArgs;

/// Heartbeats in a row that cannot reach the control plane before capsules are paused.
const MISSED_BEFORE_PAUSE: u32 = 3;

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

/// What the agent keeps between starts.
#[derive(Serialize, Deserialize)]
struct Credentials {
    control_plane: String,
    host_id: String,
    address: SocketAddr,
    token: String,
    refresh_token: String,
    tls: HostTls,
}

fn credentials_file(dir: &Path) -> PathBuf {
    dir.join("agent-credentials.json")
}

fn save(dir: &Path, c: &Credentials) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = credentials_file(dir);
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(c)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

fn tls(c: &Credentials) -> TlsMaterial {
    TlsMaterial {
        ca_cert: c.tls.ca_cert.clone(),
        cert: c.tls.cert.clone(),
        key: c.tls.key.clone(),
    }
}

/// The error message of a control-plane answer.
async fn api_error(r: reqwest::Response) -> String {
    let status = r.status();
    let body: serde_json::Value = r.json().await.unwrap_or_default();
    format!(
        "{status}: {}",
        body["error"]["message"].as_str().unwrap_or("(no message)")
    )
}

async fn register(
    http: &reqwest::Client,
    cp: &str,
    token: &str,
    address: SocketAddr,
    manager: &CapsuleManager,
) -> Result<Credentials> {
    let cap = manager.capacity();
    let body = serde_json::json!({
        "token": token,
        "address": address.to_string(),
        "arch": std::env::consts::ARCH,
        "cpu_cores": cap.cpus,
        "memory_mb": cap.memory_mb,
        "disk_gb": cap.disk_free_mb / 1024,
    });
    let r = http
        .post(format!("{cp}/v1/hosts/register"))
        .json(&body)
        .send()
        .await
        .with_context(|| format!("cannot reach the control plane at {cp}"))?;
    if !r.status().is_success() {
        bail!("registration refused: {}", api_error(r).await);
    }
    let reg: RegisterHostResponse = r.json().await?;
    info!(host_id = %reg.host.id, "registered with the control plane");
    Ok(Credentials {
        control_plane: cp.to_string(),
        host_id: reg.host.id,
        address,
        token: reg.token,
        refresh_token: reg.refresh_token,
        tls: reg.tls,
    })
}

/// New token, refresh token and certificate. `Err` with a clear message when the control
/// plane refuses (the agent must stop).
async fn refresh(http: &reqwest::Client, c: &mut Credentials) -> Result<()> {
    let r = http
        .post(format!("{}/v1/hosts/auth/refresh", c.control_plane))
        .json(&serde_json::json!({ "refresh_token": c.refresh_token }))
        .send()
        .await
        .with_context(|| format!("cannot reach the control plane at {}", c.control_plane))?;
    if r.status() == reqwest::StatusCode::UNAUTHORIZED {
        bail!(
            "the control plane no longer accepts this host's credentials ({}): the host was \
             deleted or its tokens revoked; create a new host and start with --register <token>",
            api_error(r).await
        );
    }
    if !r.status().is_success() {
        bail!("credential refresh failed: {}", api_error(r).await);
    }
    let new: RefreshHostTokenResponse = r.json().await?;
    c.token = new.token;
    c.refresh_token = new.refresh_token;
    c.tls = new.tls;
    Ok(())
}

pub async fn run(args: AgentArgs) -> Result<()> {
    let dir = crate::data_dir(&args.data_dir)?;
    let cfg = args.host.config(&dir)?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()?;
    let stored: Option<Credentials> = std::fs::read(credentials_file(&dir))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
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
    let mut creds = match (stored, &args.register) {
        (_, Some(token)) => {
            let cp = args
                .control_plane
                .clone()
                .context("--register needs --control-plane <url>")?;
            let address = args.address.context(
                "--register needs --address <ip:port> (where the control plane reaches this agent)",
            )?;
            let c = register(&http, cp.trim_end_matches('/'), token, address, &manager).await?;
            save(&dir, &c)?;
            c
        }
        (Some(mut c), None) => {
            if let Some(cp) = &args.control_plane {
                c.control_plane = cp.trim_end_matches('/').to_string();
            }
            refresh(&http, &mut c).await?;
            save(&dir, &c)?;
            c
        }
        (None, None) => unreachable!("checked above"),
    };
    info!(host_id = %creds.host_id, control_plane = %creds.control_plane, "credentials ready");

    let listen = args.listen.unwrap_or(creds.address);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (renewed_tx, mut renewed_rx) = tokio::sync::watch::channel(tls(&creds));
    // Heartbeats (and a credential refresh each day, which renews the certificate).
    let interval = Duration::from_secs(args.heartbeat_interval_sec);
    let beat_dir = dir.clone();
    let beat_http = http.clone();
    let mut beat_stop = stop_rx.clone();
    let beat_manager = manager.clone();
    let beater = tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = std::time::Instant::now();
        let mut missed = 0u32;
        // Paused while the control plane was away, not yet reported to it.
        let mut unreported: Vec<String> = Vec::new();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = beat_stop.changed() => return Ok(()),
            }
            if last_refresh.elapsed() > Duration::from_secs(24 * 3600) {
                refresh(&beat_http, &mut creds).await?;
                save(&beat_dir, &creds)?;
                let _ = renewed_tx.send(tls(&creds));
                last_refresh = std::time::Instant::now();
            }
            let url = format!(
                "{}/v1/hosts/{}/heartbeat",
                creds.control_plane, creds.host_id
            );
            let r = beat_http
                .post(&url)
                .header("X-Host-Token", &creds.token)
                .send()
                .await;
            let reached = matches!(&r, Ok(r) if !r.status().is_server_error());
            match r {
                Ok(r) if r.status().is_success() => {
                    if missed >= MISSED_BEFORE_PAUSE {
                        info!(missed, "control plane reachable again");
                    }
                    report_auto_paused(&beat_http, &creds, &mut unreported).await;
                }
                Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                    let _ = std::fs::remove_file(credentials_file(&beat_dir));
                    bail!("the control plane deleted this host; its credentials are removed");
                }
                Ok(r)
                    if r.status() == reqwest::StatusCode::UNAUTHORIZED
                        || r.status() == reqwest::StatusCode::FORBIDDEN =>
                {
                    warn!(status = %r.status(), "heartbeat refused; refreshing credentials");
                    refresh(&beat_http, &mut creds).await?;
                    save(&beat_dir, &creds)?;
                    let _ = renewed_tx.send(tls(&creds));
                    last_refresh = std::time::Instant::now();
                }
                Ok(r) => warn!(status = %r.status(), "heartbeat failed"),
                Err(e) => warn!(error = %e, "control plane unreachable"),
            }
            missed = if reached { 0 } else { missed + 1 };
            if missed == MISSED_BEFORE_PAUSE {
                unreported.extend(pause_all(&beat_manager).await);
            }
        }
    });

    // Serve until stopped; a renewed certificate restarts the server with it.
    let mut stop_signal = Box::pin(crate::shutdown_signal());
    let mut beater = beater;
    let outcome: Result<()> = loop {
        let material = renewed_rx.borrow_and_update().clone();
        let mut renewed = renewed_rx.clone();
        let serve =
            wrenn_agent::rpc::server::serve(manager.clone(), listen, &material, async move {
                let _ = renewed.changed().await;
            });
        println!("Wrenn agent serving the control plane on {listen} (mutual TLS)");
        tokio::select! {
            r = serve => match r {
                Ok(()) => info!("certificate renewed; restarting the agent service"),
                Err(e) => break Err(anyhow::anyhow!("agent service on {listen}: {e}")),
            },
            _ = &mut stop_signal => break Ok(()),
            r = &mut beater => break match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e),
                Err(e) => Err(anyhow::anyhow!("heartbeat task: {e}")),
            },
        }
    };
    let _ = stop_tx.send(true);
    if args.host.destroy_on_exit {
        info!("destroying every capsule before exit");
        manager.destroy_all().await;
    } else {
        info!("capsules keep running; the next start re-adopts them");
    }
    let _: Arc<CapsuleManager> = manager;
    outcome
}

/// Pauses every running capsule; returns those paused.
async fn pause_all(manager: &CapsuleManager) -> Vec<String> {
    let running: Vec<String> = manager
        .list()
        .await
        .into_iter()
        .filter(|c| c.phase == wrenn_agent::Phase::Running)
        .map(|c| c.id)
        .collect();
    if !running.is_empty() {
        warn!(
            capsules = running.len(),
            missed = MISSED_BEFORE_PAUSE,
            "control plane unreachable: pausing every running capsule"
        );
    }
    let mut paused = Vec::new();
    for id in running {
        match manager.pause(&id).await {
            Ok(()) => {
                info!(capsule_id = %id, "paused while the control plane is unreachable");
                paused.push(id);
            }
            Err(e) => warn!(capsule_id = %id, error = %e, "pause failed"),
        }
    }
    paused
}

/// Tells the control plane which capsules were paused while it was away (kept for the next
/// heartbeat when it cannot be told now).
async fn report_auto_paused(http: &reqwest::Client, creds: &Credentials, ids: &mut Vec<String>) {
    let url = format!("{}/v1/hosts/sandbox-events", creds.control_plane);
    let mut left = Vec::new();
    for id in ids.drain(..) {
        let ev = wrenn_api::SandboxEvent {
            event: "sandbox.auto_paused".into(),
            sandbox_id: id.clone(),
            host_id: creds.host_id.clone(),
            timestamp: Some(chrono::Utc::now().timestamp()),
            reason: Some("control_plane_unreachable".into()),
        };
        match http
            .post(&url)
            .header("X-Host-Token", &creds.token)
            .json(&ev)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => {}
            // The capsule is gone from the control plane's view: nothing to tell.
            Ok(r) if r.status().is_client_error() => {
                warn!(capsule_id = %id, status = %r.status(), "auto-pause report refused")
            }
            _ => left.push(id),
        }
    }
    *ids = left;
}
