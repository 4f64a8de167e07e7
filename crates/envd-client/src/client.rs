//! The host side of the envd protocol (see the `envd-proto` crate).

use std::net::SocketAddr;
use std::time::Duration;

use envd_proto::lifeline::{LifelineOp, LifelineReply};
use envd_proto::{
    read_frame, write_frame, write_json, ErrorKind, ExecSpec, FileEntry, Frame, FrameKind,
    ProcessInfo, Request, Response, Signal, StartSpec,
};
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::envd_conn::EnvdConn;
use tracing::warn;

use crate::error::{AgentError, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Output kept per stream for a foreground exec; beyond it bytes are dropped (and counted).
pub const MAX_CAPTURE_BYTES: usize = 64 * 1024 * 1024;

/// What envd says about itself.
#[derive(Debug, Clone)]
pub struct EnvdHealth {
    pub envd_version: String,
    pub kernel_version: String,
}

/// The result of a foreground exec.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Bytes of output dropped because a stream passed [`MAX_CAPTURE_BYTES`].
    pub dropped_bytes: u64,
}

/// Opens connections to one capsule's envd some other way than TCP (through a remote agent).
#[async_trait::async_trait]
pub trait EnvdDial: Send + Sync + std::fmt::Debug {
    async fn dial(&self) -> Result<Box<dyn crate::envd_conn::EnvdStream>>;
}

#[derive(Debug, Clone)]
pub struct EnvdClient {
    addr: SocketAddr,
    /// Set for capsules on another host: connections go through it instead of TCP.
    dial: Option<Arc<dyn EnvdDial>>,
    lifeline: Option<Arc<Path>>,
    /// Cancelled when the capsule's VM stops: every connection made through this client fails.
    vm_gone: CancellationToken,
}

impl EnvdClient {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            dial: None,
            lifeline: None,
            vm_gone: CancellationToken::new(),
        }
    }

    /// A client whose connections are opened by `dial` (a capsule on a remote host).
    pub fn remote(dial: Arc<dyn EnvdDial>) -> Self {
        Self {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            dial: Some(dial),
            lifeline: None,
            vm_gone: CancellationToken::new(),
        }
    }

    /// A raw connection to envd (what a tunnel carries).
    pub async fn open(&self) -> Result<EnvdConn> {
        self.connect().await
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

    /// Asks envd over the lifeline directly (health, or a network repair).
    pub async fn lifeline(&self, op: LifelineOp) -> Result<LifelineReply> {
        let socket = self
            .lifeline
            .as_deref()
            .ok_or_else(|| AgentError::Envd("this VM has no lifeline".into()))?;
        crate::lifeline::call(socket, op).await
    }

    async fn connect(&self) -> Result<EnvdConn> {
        if let Some(dial) = &self.dial {
            return Ok(EnvdConn::boxed(dial.dial().await?, self.vm_gone.clone()));
        }
        self.connect_or_repair()
            .await
            .map(|s| EnvdConn::new(s, self.vm_gone.clone()))
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
                    AgentError::Envd(format!(
                        "{e} (envd answers on the serial lifeline; network repaired {:?}, \
                         failed {:?})",
                        network.repaired, network.failed
                    ))
                })
            }
            Err(lifeline) => Err(AgentError::Envd(format!("{first}; {lifeline}"))),
        }
    }

    async fn connect_tcp(&self) -> Result<TcpStream> {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| AgentError::Envd(format!("connect {} timed out", self.addr)))?
            .map_err(|e| AgentError::Envd(format!("connect {}: {e}", self.addr)))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    pub async fn health(&self) -> Result<EnvdHealth> {
        let mut s = self.connect().await?;
        write_json(&mut s, &Request::Health).await.map_err(proto)?;
        match read_response(&mut s).await? {
            Response::Health {
                envd_version,
                kernel_version,
                ..
            } => Ok(EnvdHealth {
                envd_version,
                kernel_version,
            }),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to health: {other:?}"
            ))),
        }
    }

    /// Runs a command to completion. envd enforces `spec.timeout_ms`; the client waits a grace
    /// period beyond it before giving up on a guest that stopped answering.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecOutput> {
        let limit = Duration::from_millis(spec.timeout_ms) + Duration::from_secs(15);
        let collect = async {
            let mut stream = match self.exec_stream(spec).await {
                Ok(stream) => stream,
                // As a shell would: the reason on stderr, 127 or 126 as the exit code.
                Err(AgentError::CannotRun { exit_code, message }) => {
                    return Ok(ExecOutput {
                        stderr: format!("{message}\n").into_bytes(),
                        exit_code,
                        ..Default::default()
                    })
                }
                Err(e) => return Err(e),
            };
            let mut out = ExecOutput::default();
            loop {
                match stream.next().await? {
                    ExecEvent::Stdout(b) => capture(&mut out.stdout, &b, &mut out.dropped_bytes),
                    ExecEvent::Stderr(b) => capture(&mut out.stderr, &b, &mut out.dropped_bytes),
                    ExecEvent::Exit {
                        exit_code,
                        timed_out,
                        duration_ms,
                    } => {
                        out.exit_code = exit_code;
                        out.timed_out = timed_out;
                        out.duration_ms = duration_ms;
                        return Ok(out);
                    }
                }
            }
        };
        tokio::time::timeout(limit, collect)
            .await
            .map_err(|_| AgentError::Envd("no answer from envd".into()))?
    }

    /// Follows a background process (pid or tag): its output from now on and its exit.
    /// Dropping the stream detaches; the process keeps running.
    pub async fn attach(&self, selector: &str) -> Result<ExecStream> {
        let mut conn = self.connect().await?;
        let req = Request::Attach {
            selector: selector.to_string(),
        };
        write_json(&mut conn, &req).await.map_err(proto)?;
        match read_response(&mut conn).await? {
            Response::Spawned { pid } => Ok(ExecStream { conn, pid }),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to attach: {other:?}"
            ))),
        }
    }

    /// Starts a terminal session.
    pub async fn pty_start(&self, spec: envd_proto::PtySpec) -> Result<PtySession> {
        self.pty(Request::PtyStart(spec)).await
    }

    /// Re-attaches to a terminal session by tag (recent output is replayed first).
    pub async fn pty_connect(&self, tag: &str) -> Result<PtySession> {
        self.pty(Request::PtyConnect {
            tag: tag.to_string(),
        })
        .await
    }

    async fn pty(&self, req: Request) -> Result<PtySession> {
        let mut conn = self.connect().await?;
        write_json(&mut conn, &req).await.map_err(proto)?;
        let (tag, pid) = match read_response(&mut conn).await? {
            Response::PtyStarted { tag, pid } => (tag, pid),
            Response::Error { kind, message } => return Err(envd_error(kind, message)),
            other => {
                return Err(AgentError::Envd(format!(
                    "unexpected answer to pty: {other:?}"
                )))
            }
        };
        let (mut rd, writer) = tokio::io::split(conn);
        let (tx, events) = tokio::sync::mpsc::channel(16);
        // Frames are read by a task of their own: reading one is not cancel-safe, and callers
        // select between terminal output and their own input.
        // The task ends on its own: at the session's last event, or once a detached
        // connection is closed (see `Drop`).
        tokio::spawn(async move {
            loop {
                let ev = match read_frame(&mut rd).await {
                    Ok(Some(Frame::Stdout(b))) => Ok(PtyEvent::Output(b)),
                    Ok(Some(Frame::Json(j))) => match serde_json::from_slice::<Response>(&j) {
                        Ok(Response::Exit { exit_code, .. }) => Ok(PtyEvent::Exit(exit_code)),
                        _ => Err(AgentError::Envd(
                            "unexpected frame in terminal session".into(),
                        )),
                    },
                    Ok(None) => Err(AgentError::Envd("terminal connection closed".into())),
                    Ok(Some(_)) => continue,
                    Err(e) => Err(proto(e)),
                };
                let last = !matches!(ev, Ok(PtyEvent::Output(_)));
                if last {
                    let _ = tx.send(ev).await;
                    return;
                }
                if tx.send(ev).await.is_err() {
                    // Detached: read on until envd closes its side (it does at once when it
                    // sees our end of stream). Closing a socket with unread data in it sends a
                    // reset, which can overtake input not yet delivered.
                    let drain = async { while let Ok(Some(_)) = read_frame(&mut rd).await {} };
                    let _ = tokio::time::timeout(DETACH_DRAIN, drain).await;
                    return;
                }
            }
        });
        Ok(PtySession {
            tag,
            pid,
            events,
            writer: Some(writer),
        })
    }

    /// Starts a command and returns once it runs; its output and exit arrive through the
    /// returned stream. Dropping the stream kills the command.
    pub async fn exec_stream(&self, spec: ExecSpec) -> Result<ExecStream> {
        let mut conn = self.connect().await?;
        write_json(&mut conn, &Request::Exec(spec))
            .await
            .map_err(proto)?;
        match read_response(&mut conn).await? {
            Response::Spawned { pid } => Ok(ExecStream { conn, pid }),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to exec: {other:?}"
            ))),
        }
    }
}

/// What a running command produces, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Always the last event.
    Exit {
        exit_code: i32,
        timed_out: bool,
        duration_ms: u64,
    },
}

/// A running command's output. Reading applies backpressure all the way to the process (its
/// pipe fills when nobody reads); dropping the stream kills it.
pub struct ExecStream {
    conn: EnvdConn,
    pub pid: u32,
}

impl ExecStream {
    /// The next event; after `Exit` the stream is finished.
    pub async fn next(&mut self) -> Result<ExecEvent> {
        match read_frame(&mut self.conn).await.map_err(proto)? {
            Some(Frame::Stdout(b)) => Ok(ExecEvent::Stdout(b)),
            Some(Frame::Stderr(b)) => Ok(ExecEvent::Stderr(b)),
            Some(Frame::Data(_)) => Err(AgentError::Envd("unexpected data frame in exec".into())),
            Some(Frame::Json(j)) => match serde_json::from_slice::<Response>(&j) {
                Ok(Response::Exit {
                    exit_code,
                    timed_out,
                    duration_ms,
                }) => Ok(ExecEvent::Exit {
                    exit_code,
                    timed_out,
                    duration_ms,
                }),
                Ok(Response::Error { kind, message }) => Err(envd_error(kind, message)),
                Ok(other) => Err(AgentError::Envd(format!(
                    "unexpected frame in exec: {other:?}"
                ))),
                Err(e) => Err(AgentError::Envd(format!("bad answer: {e}"))),
            },
            None => Err(AgentError::Envd(
                "connection closed before the process exited".into(),
            )),
        }
    }

    /// Asks envd to kill the command; its `Exit` still follows.
    pub async fn stop(&mut self) -> Result<()> {
        use tokio::io::AsyncWriteExt;
        self.conn.write_all(&[1]).await?;
        Ok(())
    }
}

/// What a terminal session produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    Output(Vec<u8>),
    /// The session's process ended; always the last event.
    Exit(i32),
}

/// An attached terminal session. Dropping it detaches; the session lives on in the guest.
pub struct PtySession {
    pub tag: String,
    pub pid: u32,
    events: tokio::sync::mpsc::Receiver<Result<PtyEvent>>,
    /// `None` only inside `Drop`.
    writer: Option<tokio::io::WriteHalf<EnvdConn>>,
}

impl PtySession {
    fn writer(&mut self) -> Result<&mut tokio::io::WriteHalf<EnvdConn>> {
        self.writer
            .as_mut()
            .ok_or_else(|| AgentError::Envd("terminal session detached".into()))
    }

    /// The next event (cancel-safe); `None` after the last.
    pub async fn next(&mut self) -> Option<Result<PtyEvent>> {
        self.events.recv().await
    }

    pub async fn input(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        write_frame(self.writer()?, FrameKind::Data, bytes)
            .await
            .map_err(proto)
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        write_json(
            self.writer()?,
            &envd_proto::PtyControl::Resize { cols, rows },
        )
        .await
        .map_err(proto)
    }

    pub async fn kill(&mut self) -> Result<()> {
        write_json(self.writer()?, &envd_proto::PtyControl::Kill)
            .await
            .map_err(proto)
    }
}

/// How long a detached terminal connection may take to close in order.
const DETACH_DRAIN: Duration = Duration::from_secs(5);

impl Drop for PtySession {
    /// Detaches (the session lives on in the guest): our end of stream goes out after every
    /// byte of input already written, and the reader task drains the connection until envd
    /// closes it, so nothing the client typed last is lost to a reset.
    fn drop(&mut self) {
        if let Some(mut w) = self.writer.take() {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
                });
            }
        }
    }
}

/// A file being read from the guest, chunk by chunk.
pub struct FileReader {
    conn: EnvdConn,
    pub size: u64,
    done: bool,
}

impl FileReader {
    /// The next chunk, or `None` at the end of the file.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        match read_frame(&mut self.conn).await.map_err(proto)? {
            Some(Frame::Data(b)) => Ok(Some(b)),
            Some(Frame::Json(j)) => match serde_json::from_slice::<Response>(&j) {
                Ok(Response::Done) => {
                    self.done = true;
                    Ok(None)
                }
                Ok(Response::Error { kind, message }) => Err(envd_error(kind, message)),
                _ => Err(AgentError::Envd("unexpected frame in file read".into())),
            },
            _ => Err(AgentError::Envd("file read ended early".into())),
        }
    }
}

/// A file being written into the guest.
pub struct FileWriter {
    conn: EnvdConn,
}

impl FileWriter {
    pub async fn send(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(()); // an empty frame would end the file
        }
        write_frame(&mut self.conn, FrameKind::Data, bytes)
            .await
            .map_err(proto)
    }

    /// Abandons the upload and waits until envd has removed what it wrote so far.
    pub async fn abort(mut self) {
        // Any JSON frame in place of data ends the upload as failed (envd-proto's contract).
        if write_frame(&mut self.conn, FrameKind::Json, b"{}")
            .await
            .is_ok()
        {
            let _ =
                tokio::time::timeout(Duration::from_secs(10), read_response(&mut self.conn)).await;
        }
    }

    /// Ends the file; it appears in the guest (whole) when this returns its size.
    pub async fn finish(mut self) -> Result<u64> {
        write_frame(&mut self.conn, FrameKind::Data, &[])
            .await
            .map_err(proto)?;
        match read_response(&mut self.conn).await? {
            Response::Written { size } => Ok(size),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to write: {other:?}"
            ))),
        }
    }
}

/// A started background process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartedProcess {
    pub pid: u32,
    pub tag: String,
}

impl EnvdClient {
    /// Starts a background process and returns as soon as it runs.
    pub async fn start(&self, spec: StartSpec) -> Result<StartedProcess> {
        let mut s = self.connect().await?;
        write_json(&mut s, &Request::Start(spec))
            .await
            .map_err(proto)?;
        match read_response(&mut s).await? {
            Response::Started { pid, tag } => Ok(StartedProcess { pid, tag }),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to start: {other:?}"
            ))),
        }
    }

    pub async fn list_processes(&self) -> Result<Vec<ProcessInfo>> {
        match self.call(Request::ListProcesses).await? {
            Response::Processes { processes } => Ok(processes),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to list: {other:?}"
            ))),
        }
    }

    pub async fn signal(&self, selector: &str, signal: Signal) -> Result<()> {
        let req = Request::Signal {
            selector: selector.to_string(),
            signal,
        };
        match self.call(req).await? {
            Response::Done => Ok(()),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to signal: {other:?}"
            ))),
        }
    }

    pub async fn list_dir(&self, path: &str, depth: u32) -> Result<Vec<FileEntry>> {
        let req = Request::ListDir {
            path: path.to_string(),
            depth,
        };
        match self.call(req).await? {
            Response::Entries { entries } => Ok(entries),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to list: {other:?}"
            ))),
        }
    }

    pub async fn make_dir(&self, path: &str) -> Result<FileEntry> {
        match self
            .call(Request::MakeDir {
                path: path.to_string(),
            })
            .await?
        {
            Response::Entry { entry } => Ok(*entry),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to mkdir: {other:?}"
            ))),
        }
    }

    pub async fn remove(&self, path: &str) -> Result<()> {
        match self
            .call(Request::Remove {
                path: path.to_string(),
            })
            .await?
        {
            Response::Done => Ok(()),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to remove: {other:?}"
            ))),
        }
    }

    /// Opens a file for streaming; fails (not found, a directory, ...) before any byte flows.
    pub async fn read_file(&self, path: &str) -> Result<FileReader> {
        let mut conn = self.connect().await?;
        write_json(
            &mut conn,
            &Request::ReadFile {
                path: path.to_string(),
            },
        )
        .await
        .map_err(proto)?;
        match read_response(&mut conn).await? {
            Response::FileStart { size } => Ok(FileReader {
                conn,
                size,
                done: false,
            }),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to read: {other:?}"
            ))),
        }
    }

    /// Starts writing a file; send its bytes with [`FileWriter::send`], then
    /// [`FileWriter::finish`]. Dropping the writer before `finish` leaves no file behind.
    pub async fn write_file(&self, path: &str) -> Result<FileWriter> {
        let mut conn = self.connect().await?;
        write_json(
            &mut conn,
            &Request::WriteFile {
                path: path.to_string(),
            },
        )
        .await
        .map_err(proto)?;
        Ok(FileWriter { conn })
    }

    /// One request, one JSON answer.
    /// Tells envd its VM was just restored: it sets the clock to now and reseeds entropy.
    pub async fn restored(&self) -> Result<()> {
        let unix_nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        let seed: [u8; 32] = rand::random();
        let req = Request::Restored {
            unix_nanos,
            seed: hex::encode(seed),
        };
        match self.call(req).await? {
            Response::Done => Ok(()),
            Response::Error { kind, message } => Err(envd_error(kind, message)),
            other => Err(AgentError::Envd(format!(
                "unexpected answer to restored: {other:?}"
            ))),
        }
    }

    async fn call(&self, req: Request) -> Result<Response> {
        let mut s = self.connect().await?;
        write_json(&mut s, &req).await.map_err(proto)?;
        tokio::time::timeout(Duration::from_secs(10), read_response(&mut s))
            .await
            .map_err(|_| AgentError::Envd("no answer from envd".into()))?
    }
}

fn envd_error(kind: ErrorKind, message: String) -> AgentError {
    match kind {
        ErrorKind::InvalidRequest => AgentError::InvalidRequest(message),
        ErrorKind::NotFound => AgentError::NotFound(message),
        ErrorKind::Conflict => AgentError::Conflict(message),
        ErrorKind::AlreadyExists => AgentError::AlreadyExists(message),
        ErrorKind::CommandNotFound => AgentError::CannotRun {
            exit_code: 127,
            message,
        },
        ErrorKind::NotExecutable => AgentError::CannotRun {
            exit_code: 126,
            message,
        },
        ErrorKind::Internal => AgentError::Envd(message),
    }
}

fn capture(buf: &mut Vec<u8>, bytes: &[u8], dropped: &mut u64) {
    let room = MAX_CAPTURE_BYTES.saturating_sub(buf.len());
    let take = room.min(bytes.len());
    buf.extend_from_slice(&bytes[..take]);
    *dropped += (bytes.len() - take) as u64;
}

async fn read_response(s: &mut EnvdConn) -> Result<Response> {
    match read_frame(s).await.map_err(proto)? {
        Some(Frame::Json(j)) => {
            serde_json::from_slice(&j).map_err(|e| AgentError::Envd(format!("bad answer: {e}")))
        }
        Some(_) => Err(AgentError::Envd("expected a JSON answer".into())),
        None => Err(AgentError::Envd("connection closed".into())),
    }
}

fn proto(e: envd_proto::ProtoError) -> AgentError {
    AgentError::Envd(e.to_string())
}
