//! [`EnvdClient`]: connections to one capsule's envd, and the one-answer requests.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use envd_proto::lifeline::{LifelineOp, LifelineReply};
use envd_proto::{
    read_frame, write_json, FileEntry, Frame, ProcessInfo, Request, Response, Signal, StartSpec,
};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::conn::{EnvdConn, EnvdStream};
use crate::error::{EnvdError, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `connect_port` tries the guest's address before going through envd.
const DIRECT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Bound on a request that has one answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// What envd says about itself.
#[derive(Debug, Clone)]
pub struct EnvdHealth {
    pub envd_version: String,
    pub kernel_version: String,
    /// The protocol envd speaks (`envd_proto::PROTOCOL_VERSION` of its build).
    pub protocol: u32,
}

impl EnvdHealth {
    /// Whether this envd takes a capsule token (older ones, in snapshots made before tokens,
    /// do not).
    pub fn takes_token(&self) -> bool {
        self.protocol >= envd_proto::TOKEN_PROTOCOL_VERSION
    }
}

/// A started background process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedProcess {
    pub pid: u32,
    pub tag: String,
}

/// Opens connections to one capsule's envd some other way than TCP (through a remote agent).
#[async_trait::async_trait]
pub trait EnvdDial: Send + Sync + std::fmt::Debug {
    async fn dial(&self) -> Result<Box<dyn EnvdStream>>;
}

#[derive(Debug, Clone)]
pub struct EnvdClient {
    addr: SocketAddr,
    /// Set for capsules on another host: connections go through it instead of TCP.
    dial: Option<Arc<dyn EnvdDial>>,
    lifeline: Option<Arc<Path>>,
    /// Cancelled when the capsule's VM stops: every connection made through this client fails.
    vm_gone: CancellationToken,
    /// The capsule's token, presented first on every connection (`Request::Auth`).
    token: Option<Arc<str>>,
}

impl EnvdClient {
    /// A client reaching envd over TCP at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            dial: None,
            lifeline: None,
            vm_gone: CancellationToken::new(),
            token: None,
        }
    }

    /// A client whose connections are opened by `dial` (a capsule on a remote host).
    pub fn remote(dial: Arc<dyn EnvdDial>) -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            dial: Some(dial),
            lifeline: None,
            vm_gone: CancellationToken::new(),
            token: None,
        }
    }

    /// A client presenting `token` on every connection (for an envd that holds one; `None`
    /// for one that does not, or when whoever opens the connection presents it: a tunnel's
    /// far end).
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.map(Arc::from);
        self
    }

    /// A client that, when TCP to envd fails, asks envd over the serial lifeline to repair the
    /// guest network and tries once more.
    pub fn with_lifeline(mut self, socket: Option<&Path>) -> Self {
        self.lifeline = socket.map(Arc::from);
        self
    }

    /// Connections made through this client fail once `token` is cancelled.
    pub fn with_cancellation(mut self, token: CancellationToken) -> Self {
        self.vm_gone = token;
        self
    }

    /// A raw connection to envd (what a tunnel carries).
    pub async fn open(&self) -> Result<EnvdConn> {
        self.connect().await
    }

    /// Asks envd over the lifeline directly (health, or a network repair).
    pub async fn lifeline(&self, op: LifelineOp) -> Result<LifelineReply> {
        let socket = self
            .lifeline
            .as_deref()
            .ok_or_else(|| EnvdError::Unavailable("this VM has no lifeline".into()))?;
        crate::lifeline::call(socket, op).await
    }

    pub(crate) async fn connect(&self) -> Result<EnvdConn> {
        let mut conn = match &self.dial {
            Some(dial) => EnvdConn::boxed(dial.dial().await?, self.vm_gone.clone()),
            None => EnvdConn::new(self.connect_or_repair().await?, self.vm_gone.clone()),
        };
        if let Some(token) = &self.token {
            let auth = Request::Auth {
                token: token.to_string(),
            };
            write_json(&mut conn, &auth).await?;
        }
        Ok(conn)
    }

    async fn connect_or_repair(&self) -> Result<TcpStream> {
        let first = match self.connect_tcp().await {
            Ok(s) => return Ok(s),
            Err(e) => e,
        };
        if self.lifeline.is_none() {
            return Err(first);
        }
        match self.lifeline(LifelineOp::RepairNetwork).await {
            Ok(reply) => {
                let network = reply.network.unwrap_or_default();
                warn!(
                    addr = %self.addr,
                    error = %first,
                    repaired = ?network.repaired,
                    failed = ?network.failed,
                    "envd unreachable over TCP; asked for a network repair over the lifeline"
                );
                self.connect_tcp().await.map_err(|e| {
                    EnvdError::Unavailable(format!(
                        "{e} (envd answers on the serial lifeline; network repaired {:?}, \
                         failed {:?})",
                        network.repaired, network.failed
                    ))
                })
            }
            Err(lifeline) => Err(EnvdError::Unavailable(format!("{first}; {lifeline}"))),
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream> {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| EnvdError::Unavailable(format!("connect {} timed out", self.addr)))?
            .map_err(|e| EnvdError::Unavailable(format!("connect {}: {e}", self.addr)))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// One request, one JSON answer, within [`CALL_TIMEOUT`].
    pub(crate) async fn call(&self, req: Request) -> Result<Response> {
        let mut s = self.connect().await?;
        write_json(&mut s, &req).await?;
        match tokio::time::timeout(CALL_TIMEOUT, read_response(&mut s)).await {
            Ok(Ok(Response::Error { kind, message })) => Err(EnvdError::reported(kind, message)),
            Ok(answer) => answer,
            Err(_) => Err(EnvdError::Unavailable("no answer from envd".into())),
        }
    }

    pub async fn health(&self) -> Result<EnvdHealth> {
        match self.call(Request::Health).await? {
            Response::Health {
                envd_version,
                kernel_version,
                protocol,
            } => Ok(EnvdHealth {
                envd_version,
                kernel_version,
                protocol,
            }),
            other => Err(EnvdError::unexpected("health", other)),
        }
    }

    /// Tells envd its VM was just restored: it sets the clock to now and reseeds entropy, and
    /// from now on requires `token` (when given) on every connection.
    pub async fn restored(&self, token: Option<&str>) -> Result<()> {
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed: [u8; 32] = rand::random();
        let req = Request::Restored {
            unix_nanos,
            seed: hex::encode(seed),
            token: token.map(str::to_string),
        };
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => Err(EnvdError::unexpected("restored", other)),
        }
    }

    /// Starts a background process and returns as soon as it runs.
    pub async fn start(&self, spec: StartSpec) -> Result<StartedProcess> {
        match self.call(Request::Start(spec)).await? {
            Response::Started { pid, tag } => Ok(StartedProcess { pid, tag }),
            other => Err(EnvdError::unexpected("start", other)),
        }
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>> {
        match self.call(Request::ListProcesses).await? {
            Response::Processes { processes } => Ok(processes),
            other => Err(EnvdError::unexpected("list", other)),
        }
    }

    pub async fn signal(&self, selector: &str, signal: Signal) -> Result<()> {
        let req = Request::Signal {
            selector: selector.to_string(),
            signal,
        };
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => Err(EnvdError::unexpected("signal", other)),
        }
    }

    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<FileEntry>> {
        let req = Request::ListDir {
            path: path.to_string(),
            depth,
        };
        match self.call(req).await? {
            Response::Entries { entries } => Ok(entries),
            other => Err(EnvdError::unexpected("list", other)),
        }
    }

    pub async fn make_dir(&self, path: &str) -> Result<FileEntry> {
        let req = Request::MakeDir {
            path: path.to_string(),
        };
        match self.call(req).await? {
            Response::Entry { entry } => Ok(*entry),
            other => Err(EnvdError::unexpected("mkdir", other)),
        }
    }

    pub async fn remove(&self, path: &str) -> Result<()> {
        let req = Request::Remove {
            path: path.to_string(),
        };
        match self.call(req).await? {
            Response::Done => Ok(()),
            other => Err(EnvdError::unexpected("remove", other)),
        }
    }

    /// A TCP connection to `port` in the guest. When envd is reached over TCP, the guest's own
    /// address is tried first: a server listening on every address is then reached straight,
    /// without envd copying every byte inside the guest (under emulation those copies cost
    /// most of the throughput). Refused there (a server on the guest's loopback only), or for
    /// a capsule on another host, the connection goes through envd, which dials the port on the
    /// guest's loopback and carries its bytes both ways. `NotFound` when nothing listens.
    pub async fn connect_port(&self, port: u16) -> Result<EnvdConn> {
        if self.dial.is_none() {
            let direct = tokio::time::timeout(
                DIRECT_CONNECT_TIMEOUT,
                TcpStream::connect((self.addr.ip(), port)),
            )
            .await;
            if let Ok(Ok(s)) = direct {
                let _ = s.set_nodelay(true);
                return Ok(EnvdConn::new(s, self.vm_gone.clone()));
            }
        }
        match self.open_with(&Request::Connect { port }).await? {
            (conn, Response::Done) => Ok(conn),
            (_, other) => Err(EnvdError::unexpected("connect", other)),
        }
    }

    /// Sends `req` on a new connection and reads its first answer (within [`CALL_TIMEOUT`]:
    /// envd answers a stream's first frame at once): the connection, for what follows on it,
    /// and that answer (an envd error already turned into `Err`).
    pub(crate) async fn open_with(&self, req: &Request) -> Result<(EnvdConn, Response)> {
        let mut conn = self.connect().await?;
        write_json(&mut conn, req).await?;
        let first = tokio::time::timeout(CALL_TIMEOUT, read_response(&mut conn))
            .await
            .map_err(|_| EnvdError::Unavailable("no answer from envd".into()))?;
        match first? {
            Response::Error { kind, message } => Err(EnvdError::reported(kind, message)),
            answer => Ok((conn, answer)),
        }
    }
}

/// The next frame of `s`, which must be a JSON response.
pub(crate) async fn read_response(s: &mut EnvdConn) -> Result<Response> {
    match read_frame(s).await? {
        Some(Frame::Json(j)) => serde_json::from_slice(&j)
            .map_err(|e| EnvdError::Unavailable(format!("bad answer: {e}"))),
        Some(_) => Err(EnvdError::Unavailable("expected a JSON answer".into())),
        None => Err(EnvdError::Unavailable("connection closed".into())),
    }
}
