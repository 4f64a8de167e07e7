//! The agent's link to its control plane: registration, credentials, heartbeats, and what
//! happens while the control plane is away.
//!
//! First start: [`register`] with a one-time token (from `POST /v1/hosts`) sends this host's
//! specs and receives a host token, a refresh token and TLS material, kept in
//! `<data>/agent-credentials.json` (mode 0600, written whole). Every start [`refresh`]es them
//! (new token, new refresh token, new certificate), and [`Uplink::run`] heartbeats until
//! stopped, refreshing daily (which renews the certificate; the new one is published on the
//! `renewed` channel so the agent's server restarts with it).
//!
//! Invariants:
//! - When the control plane refuses the refresh token (revoked, host deleted) the uplink stops
//!   with an error saying so; a 404 on a heartbeat (host deleted) also removes the stored
//!   credentials. A refresh that cannot reach the control plane (or gets a 5xx) is a missed
//!   heartbeat like any other and is tried again at the next one.
//! - After [`MISSED_BEFORE_PAUSE`] heartbeats in a row that cannot reach the control plane
//!   (transport errors or 5xx) every running capsule is paused: nothing runs unobserved, and no
//!   inactivity timeout is enforced while the control plane is away. Once heartbeats get through
//!   again each is reported as `sandbox.auto_paused` (kept for the next heartbeat until the
//!   control plane has taken the report).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use wrenn_api::{HostTls, RefreshHostTokenResponse, RegisterHostResponse, SandboxEvent};
use wrenn_host::{Host, HostCapacity, Phase, TlsMaterial};

/// Heartbeats in a row that cannot reach the control plane before capsules are paused.
pub const MISSED_BEFORE_PAUSE: u32 = 3;
/// How often credentials (and so the certificate) are renewed.
const REFRESH_EVERY: Duration = Duration::from_secs(24 * 3600);
/// Bound on every request to the control plane.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum UplinkError {
    /// The control plane could not be reached (or failed: 5xx).
    #[error("cannot reach the control plane at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    /// The control plane answered something this agent cannot read.
    #[error("unreadable answer from the control plane at {url}: {detail}")]
    BadAnswer { url: String, detail: String },
    /// No HTTP client could be made (TLS set-up).
    #[error("HTTP client: {0}")]
    Client(String),
    /// The control plane answered no.
    #[error("{0}")]
    Refused(String),
    /// The control plane deleted this host.
    #[error("the control plane deleted this host; its credentials are removed")]
    Deleted,
    #[error("credentials file {path}: {detail}")]
    Credentials { path: PathBuf, detail: String },
}

type Result<T> = std::result::Result<T, UplinkError>;

/// What the agent keeps between starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Credentials {
    pub control_plane: String,
    pub host_id: String,
    pub address: SocketAddr,
    pub token: String,
    pub refresh_token: String,
    pub tls: HostTls,
}

impl Credentials {
    fn file(dir: &Path) -> PathBuf {
        dir.join("agent-credentials.json")
    }

    /// The credentials kept in `dir`, if any (an unreadable file counts as none).
    pub fn load(dir: &Path) -> Option<Credentials> {
        std::fs::read(Self::file(dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    }

    /// Writes them to `dir` (mode 0600): under a temporary name, then renamed into place.
    pub fn save(&self, dir: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = Self::file(dir);
        let failed = |e: std::io::Error| UplinkError::Credentials {
            path: path.clone(),
            detail: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(failed)?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| failed(e.into()))?;
        f.write_all(&json).map_err(failed)?;
        f.sync_all().map_err(failed)?;
        std::fs::rename(&tmp, &path).map_err(failed)
    }

    fn remove(dir: &Path) {
        if let Err(e) = std::fs::remove_file(Self::file(dir)) {
            warn!(error = %e, "cannot remove the stored credentials");
        }
    }

    /// The TLS material the agent serves the control plane with.
    pub fn tls(&self) -> TlsMaterial {
        TlsMaterial {
            ca_cert: self.tls.ca_cert.clone(),
            cert: self.tls.cert.clone(),
            key: self.tls.key.clone(),
        }
    }
}

/// An HTTP client for the control plane, every request bounded in time.
pub fn http_client() -> Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .map_err(|e| UplinkError::Client(e.to_string()))
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

fn unreachable(url: &str, e: reqwest::Error) -> UplinkError {
    UplinkError::Unreachable {
        url: url.to_string(),
        detail: e.to_string(),
    }
}

fn bad_answer(url: &str, e: reqwest::Error) -> UplinkError {
    UplinkError::BadAnswer {
        url: url.to_string(),
        detail: e.to_string(),
    }
}

/// Registers this host with the control plane at `cp` using a one-time `token`.
pub async fn register(
    http: &reqwest::Client,
    cp: &str,
    token: &str,
    address: SocketAddr,
    capacity: &HostCapacity,
) -> Result<Credentials> {
    let cp = cp.trim_end_matches('/');
    let body = serde_json::json!({
        "token": token,
        "address": address.to_string(),
        "arch": std::env::consts::ARCH,
        "cpu_cores": capacity.cpus,
        "memory_mb": capacity.memory_mb,
        "disk_gb": capacity.disk_free_mb / 1024,
    });
    let r = http
        .post(format!("{cp}/v1/hosts/register"))
        .json(&body)
        .send()
        .await
        .map_err(|e| unreachable(cp, e))?;
    if !r.status().is_success() {
        return Err(UplinkError::Refused(format!(
            "registration refused: {}",
            api_error(r).await
        )));
    }
    let reg: RegisterHostResponse = r.json().await.map_err(|e| bad_answer(cp, e))?;
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

/// New token, refresh token and certificate. A refusal is an error that says the agent must
/// be registered anew.
pub async fn refresh(http: &reqwest::Client, c: &mut Credentials) -> Result<()> {
    let cp = c.control_plane.clone();
    let r = http
        .post(format!("{cp}/v1/hosts/auth/refresh"))
        .json(&serde_json::json!({ "refresh_token": c.refresh_token }))
        .send()
        .await
        .map_err(|e| unreachable(&cp, e))?;
    if r.status() == reqwest::StatusCode::UNAUTHORIZED {
        return Err(UplinkError::Refused(format!(
            "the control plane no longer accepts this host's credentials ({}): the host was \
             deleted or its tokens revoked; create a new host and start with --register <token>",
            api_error(r).await
        )));
    }
    if r.status().is_server_error() {
        return Err(UplinkError::Unreachable {
            url: cp,
            detail: format!("credential refresh: {}", api_error(r).await),
        });
    }
    if !r.status().is_success() {
        return Err(UplinkError::Refused(format!(
            "credential refresh failed: {}",
            api_error(r).await
        )));
    }
    let new: RefreshHostTokenResponse = r.json().await.map_err(|e| bad_answer(&cp, e))?;
    c.token = new.token;
    c.refresh_token = new.refresh_token;
    c.tls = new.tls;
    Ok(())
}

/// The heartbeat loop of a registered agent.
pub struct Uplink {
    http: reqwest::Client,
    /// Where the credentials are kept.
    dir: PathBuf,
    creds: Credentials,
    host: Arc<dyn Host>,
    interval: Duration,
    /// Renewed TLS material, for the agent's server.
    renewed: watch::Sender<TlsMaterial>,
    last_refresh: Instant,
    /// Heartbeats in a row that did not reach the control plane.
    missed: u32,
    /// Paused while the control plane was away, not yet reported to it.
    unreported: Vec<String>,
}

impl Uplink {
    /// An uplink for `host` with fresh credentials (kept in `dir`); TLS renewals are published
    /// on the returned channel.
    pub fn new(
        http: reqwest::Client,
        dir: &Path,
        creds: Credentials,
        host: Arc<dyn Host>,
        interval: Duration,
    ) -> (Self, watch::Receiver<TlsMaterial>) {
        let (renewed, rx) = watch::channel(creds.tls());
        let uplink = Self {
            http,
            dir: dir.to_path_buf(),
            creds,
            host,
            interval,
            renewed,
            last_refresh: Instant::now(),
            missed: 0,
            unreported: Vec::new(),
        };
        (uplink, rx)
    }

    /// Heartbeats every interval until `stop` is cancelled (`Ok`) or the control plane refuses
    /// this host for good (`Err`).
    pub async fn run(mut self, stop: CancellationToken) -> Result<()> {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return Ok(()),
            }
            self.beat().await?;
        }
    }

    /// New credentials; `Ok(false)` when the control plane cannot be reached now (tried again
    /// at the next heartbeat).
    async fn renew(&mut self) -> Result<bool> {
        match refresh(&self.http, &mut self.creds).await {
            Ok(()) => {}
            Err(e @ (UplinkError::Unreachable { .. } | UplinkError::BadAnswer { .. })) => {
                warn!(error = %e, "credential refresh failed; trying again at the next heartbeat");
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        self.creds.save(&self.dir)?;
        // Nobody listening (the server is restarting anyway) is fine.
        let _ = self.renewed.send(self.creds.tls());
        self.last_refresh = Instant::now();
        Ok(true)
    }

    /// One heartbeat and what follows from its answer.
    async fn beat(&mut self) -> Result<()> {
        if self.last_refresh.elapsed() > REFRESH_EVERY {
            self.renew().await?;
        }
        self.heartbeat().await
    }

    async fn heartbeat(&mut self) -> Result<()> {
        let url = format!(
            "{}/v1/hosts/{}/heartbeat",
            self.creds.control_plane, self.creds.host_id
        );
        let r = self
            .http
            .post(&url)
            .header("X-Host-Token", &self.creds.token)
            .send()
            .await;
        let reached = matches!(&r, Ok(r) if !r.status().is_server_error());
        match r {
            Ok(r) if r.status().is_success() => {
                if self.missed >= MISSED_BEFORE_PAUSE {
                    info!(missed = self.missed, "control plane reachable again");
                }
                self.report_auto_paused().await;
            }
            Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                Credentials::remove(&self.dir);
                return Err(UplinkError::Deleted);
            }
            Ok(r)
                if r.status() == reqwest::StatusCode::UNAUTHORIZED
                    || r.status() == reqwest::StatusCode::FORBIDDEN =>
            {
                warn!(status = %r.status(), "heartbeat refused; refreshing credentials");
                self.renew().await?;
            }
            Ok(r) => warn!(status = %r.status(), "heartbeat failed"),
            Err(e) => warn!(error = %e, "control plane unreachable"),
        }
        self.missed = if reached { 0 } else { self.missed + 1 };
        if self.missed == MISSED_BEFORE_PAUSE {
            let paused = pause_all(self.host.as_ref()).await;
            self.unreported.extend(paused);
        }
        Ok(())
    }

    /// Tells the control plane which capsules were paused while it was away (those it cannot
    /// be told about now are kept for the next heartbeat).
    async fn report_auto_paused(&mut self) {
        let url = format!("{}/v1/hosts/sandbox-events", self.creds.control_plane);
        let mut left = Vec::new();
        for id in self.unreported.drain(..) {
            let ev = SandboxEvent {
                event: "sandbox.auto_paused".into(),
                sandbox_id: id.clone(),
                host_id: self.creds.host_id.clone(),
                timestamp: Some(chrono::Utc::now().timestamp()),
                reason: Some("control_plane_unreachable".into()),
            };
            match self
                .http
                .post(&url)
                .header("X-Host-Token", &self.creds.token)
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
        self.unreported = left;
    }
}

/// Pauses every running capsule of `host`; returns those paused.
async fn pause_all(host: &dyn Host) -> Vec<String> {
    let running: Vec<String> = match host.list().await {
        Ok(list) => list
            .into_iter()
            .filter(|c| c.phase == Phase::Running)
            .map(|c| c.id)
            .collect(),
        Err(e) => {
            warn!(error = %e, "cannot list capsules to pause them");
            return Vec::new();
        }
    };
    if !running.is_empty() {
        warn!(
            capsules = running.len(),
            missed = MISSED_BEFORE_PAUSE,
            "control plane unreachable: pausing every running capsule"
        );
    }
    let mut paused = Vec::new();
    for id in running {
        match host.pause(id.clone()).await {
            Ok(()) => {
                info!(capsule_id = %id, "paused while the control plane is unreachable");
                paused.push(id);
            }
            Err(e) => warn!(capsule_id = %id, error = %e, "pause failed"),
        }
    }
    paused
}

#[cfg(test)]
mod tests {
    //! The uplink against a stand-in control plane on loopback (a real HTTP server) and an
    //! in-memory host.

    use std::sync::Mutex;

    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use wrenn_api::Host as HostRecord;
    use wrenn_host::testing::FakeHost;

    use super::*;

    #[derive(Default)]
    struct Cp {
        /// Answers to the next heartbeats (200 once they run out).
        heartbeats: Vec<u16>,
        refresh_refused: bool,
        /// The refresh endpoint answers 503.
        refresh_failing: bool,
        refreshes: usize,
        events: Vec<SandboxEvent>,
    }

    type Shared = Arc<Mutex<Cp>>;

    fn host_record() -> HostRecord {
        let now = chrono::Utc::now();
        HostRecord {
            id: "host-test".into(),
            kind: "regular".into(),
            team_id: None,
            provider: None,
            availability_zone: None,
            arch: None,
            cpu_cores: None,
            memory_mb: None,
            disk_gb: None,
            address: Some("127.0.0.1:7443".into()),
            status: wrenn_api::HostStatus::Online,
            last_heartbeat_at: None,
            created_by: "test".into(),
            created_at: now,
            updated_at: now,
        }
    }

    fn tls(n: usize) -> HostTls {
        HostTls {
            ca_cert: "ca".into(),
            cert: format!("cert-{n}"),
            key: format!("key-{n}"),
        }
    }

    async fn register_route(Json(body): Json<serde_json::Value>) -> (StatusCode, String) {
        if body["token"] != "good-token" {
            let err = r#"{"error":{"code":"unauthorized","message":"invalid, used or expired registration token"}}"#;
            return (StatusCode::UNAUTHORIZED, err.into());
        }
        let answer = RegisterHostResponse {
            host: host_record(),
            token: "jwt-0".into(),
            refresh_token: "refresh-0".into(),
            tls: tls(0),
        };
        (StatusCode::CREATED, serde_json::to_string(&answer).unwrap())
    }

    async fn refresh_route(State(cp): State<Shared>) -> (StatusCode, String) {
        let mut cp = cp.lock().unwrap();
        if cp.refresh_failing {
            return (StatusCode::SERVICE_UNAVAILABLE, "{}".into());
        }
        if cp.refresh_refused {
            let err = r#"{"error":{"code":"unauthorized","message":"invalid, expired or revoked refresh token"}}"#;
            return (StatusCode::UNAUTHORIZED, err.into());
        }
        cp.refreshes += 1;
        let n = cp.refreshes;
        let answer = RefreshHostTokenResponse {
            host: host_record(),
            token: format!("jwt-{n}"),
            refresh_token: format!("refresh-{n}"),
            tls: tls(n),
        };
        (StatusCode::OK, serde_json::to_string(&answer).unwrap())
    }

    async fn heartbeat_route(State(cp): State<Shared>) -> StatusCode {
        let mut cp = cp.lock().unwrap();
        let status = if cp.heartbeats.is_empty() {
            200
        } else {
            cp.heartbeats.remove(0)
        };
        StatusCode::from_u16(status).unwrap()
    }

    async fn events_route(State(cp): State<Shared>, Json(ev): Json<SandboxEvent>) -> StatusCode {
        cp.lock().unwrap().events.push(ev);
        StatusCode::NO_CONTENT
    }

    /// A stand-in control plane; its URL.
    async fn control_plane(cp: Shared) -> String {
        let app = Router::new()
            .route("/v1/hosts/register", post(register_route))
            .route("/v1/hosts/auth/refresh", post(refresh_route))
            .route("/v1/hosts/{id}/heartbeat", post(heartbeat_route))
            .route("/v1/hosts/sandbox-events", post(events_route))
            .with_state(cp);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wrenn-uplink-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    async fn registered(
        name: &str,
        cp: &Shared,
    ) -> (Uplink, watch::Receiver<TlsMaterial>, Arc<FakeHost>, PathBuf) {
        let url = control_plane(cp.clone()).await;
        let dir = temp_dir(name);
        let capacity = HostCapacity {
            cpus: 2,
            memory_mb: 4096,
            disk_free_mb: 10_240,
            disk_reserve_mb: 0,
        };
        let creds = register(
            &http_client().unwrap(),
            &url,
            "good-token",
            "127.0.0.1:7443".parse().unwrap(),
            &capacity,
        )
        .await
        .unwrap();
        creds.save(&dir).unwrap();
        let host = FakeHost::new();
        let (uplink, renewed) = Uplink::new(
            http_client().unwrap(),
            &dir,
            creds,
            host.clone(),
            Duration::from_secs(1),
        );
        (uplink, renewed, host, dir)
    }

    #[tokio::test]
    async fn registration_keeps_whole_private_credentials_and_a_bad_token_is_refused() {
        let cp = Shared::default();
        let (_, _, _, dir) = registered("register", &cp).await;
        let kept = Credentials::load(&dir).expect("credentials kept");
        assert_eq!(
            (kept.host_id.as_str(), kept.token.as_str()),
            ("host-test", "jwt-0")
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(Credentials::file(&dir))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(!Credentials::file(&dir).with_extension("tmp").exists());

        let url = control_plane(cp).await;
        let capacity = HostCapacity {
            cpus: 1,
            memory_mb: 1,
            disk_free_mb: 1,
            disk_reserve_mb: 0,
        };
        let err = register(
            &http_client().unwrap(),
            &url,
            "used-token",
            "127.0.0.1:7443".parse().unwrap(),
            &capacity,
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("registration refused"), "{err}");
        assert!(
            err.to_string().contains("expired registration token"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_deleted_host_stops_its_uplink_and_forgets_its_credentials() {
        let cp = Shared::default();
        let (mut uplink, _, _, dir) = registered("deleted", &cp).await;
        cp.lock().unwrap().heartbeats = vec![200, 404];
        uplink.beat().await.unwrap();
        let err = uplink.beat().await.unwrap_err();
        assert!(matches!(err, UplinkError::Deleted), "{err}");
        assert!(Credentials::load(&dir).is_none(), "credentials removed");
    }

    #[tokio::test]
    async fn a_refused_heartbeat_renews_the_credentials_and_a_refused_renewal_stops_the_uplink() {
        let cp = Shared::default();
        let (mut uplink, mut renewed, _, dir) = registered("refresh", &cp).await;
        cp.lock().unwrap().heartbeats = vec![401];
        uplink.beat().await.unwrap();
        assert!(
            renewed.has_changed().unwrap(),
            "the server gets the new certificate"
        );
        assert_eq!(renewed.borrow_and_update().cert, "cert-1");
        let kept = Credentials::load(&dir).unwrap();
        assert_eq!(
            (kept.token.as_str(), kept.refresh_token.as_str()),
            ("jwt-1", "refresh-1")
        );

        // A refresh that meets a failing control plane is tried again at the next heartbeat.
        cp.lock().unwrap().heartbeats = vec![401];
        cp.lock().unwrap().refresh_failing = true;
        uplink.beat().await.unwrap();
        assert!(!renewed.has_changed().unwrap(), "nothing renewed");
        assert_eq!(Credentials::load(&dir).unwrap().token, "jwt-1");
        cp.lock().unwrap().refresh_failing = false;

        cp.lock().unwrap().heartbeats = vec![403];
        cp.lock().unwrap().refresh_refused = true;
        let err = uplink.beat().await.unwrap_err();
        assert!(err.to_string().contains("no longer accepts"), "{err}");
        assert!(err.to_string().contains("--register"), "{err}");
    }

    #[tokio::test]
    async fn capsules_pause_after_three_missed_heartbeats_and_are_reported_once_back() {
        let cp = Shared::default();
        let (mut uplink, _, host, _) = registered("offline", &cp).await;
        host.put("cl-a", Phase::Running);
        host.put("cl-b", Phase::Running);
        host.put("cl-c", Phase::Paused);
        cp.lock().unwrap().heartbeats = vec![503, 502, 503, 503];
        uplink.beat().await.unwrap();
        uplink.beat().await.unwrap();
        assert_eq!(host.count("pause"), 0, "two misses: nothing paused yet");
        uplink.beat().await.unwrap();
        assert_eq!(host.count("pause"), 2, "{:?}", host.calls());
        for id in ["cl-a", "cl-b", "cl-c"] {
            assert_eq!(host.capsule(id).unwrap().phase, Phase::Paused, "{id}");
        }
        // Still away: nothing told, nothing paused twice.
        uplink.beat().await.unwrap();
        assert!(cp.lock().unwrap().events.is_empty());
        assert_eq!(host.count("pause"), 2);

        // Back: each auto-pause is reported once.
        uplink.beat().await.unwrap();
        uplink.beat().await.unwrap();
        let events = cp.lock().unwrap().events.clone();
        let mut ids: Vec<&str> = events.iter().map(|e| e.sandbox_id.as_str()).collect();
        ids.sort();
        assert_eq!(ids, ["cl-a", "cl-b"]);
        for e in &events {
            assert_eq!(e.event, "sandbox.auto_paused");
            assert_eq!(e.host_id, "host-test");
            assert_eq!(e.reason.as_deref(), Some("control_plane_unreachable"));
        }
    }

    #[tokio::test]
    async fn run_stops_when_told() {
        let cp = Shared::default();
        let (uplink, _, _, _) = registered("stop", &cp).await;
        let stop = CancellationToken::new();
        let task = tokio::spawn(uplink.run(stop.clone()));
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(matches!(ended, Ok(Ok(Ok(())))));
    }
}
