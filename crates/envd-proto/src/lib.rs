//! The wire protocol between the host agent and envd (the guest agent).
//!
//! One TCP connection carries one operation. The client opens with a [`Request`] in a JSON frame;
//! envd answers with a sequence of frames that ends with a JSON [`Response`] frame (or closes the
//! connection on a fatal error). Byte streams (process output, later file contents) travel in their
//! own frame kinds so they are never base64-encoded or buffered whole.
//!
//! During an exec the host may send one byte (any value) to ask envd to stop the command: envd
//! kills its process group and still answers `Exit`. Closing the connection instead kills the
//! command without an answer.
//!
//! A frame is `kind: u8`, `len: u32` (big endian), then `len` bytes. Frames are at most
//! [`MAX_FRAME_LEN`] bytes so a peer can never make the other allocate without bound.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// TCP port envd listens on inside the guest (the reference platform's port).
pub const ENVD_PORT: u16 = 49983;
/// Largest frame either side accepts.
pub const MAX_FRAME_LEN: u32 = 1 << 20;
/// Protocol version; envd reports it in [`Response::Health`]. 2: capsule tokens
/// ([`Request::Auth`], `Restored::token`).
pub const PROTOCOL_VERSION: u32 = 2;
/// The first protocol version whose envd takes a capsule token.
pub const TOKEN_PROTOCOL_VERSION: u32 = 2;
/// Kernel command-line variable (an environment variable of envd) carrying the token a
/// cold-booted guest's envd requires from its first connection.
pub const TOKEN_ENV: &str = "WRENN_ENVD_TOKEN";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON-encoded [`Request`] or [`Response`].
    Json = 1,
    /// Raw bytes of a process's standard output.
    Stdout = 2,
    /// Raw bytes of a process's standard error.
    Stderr = 3,
    /// Raw file content.
    Data = 4,
}

impl FrameKind {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(FrameKind::Json),
            2 => Some(FrameKind::Stdout),
            3 => Some(FrameKind::Stderr),
            4 => Some(FrameKind::Data),
            _ => None,
        }
    }
}

/// What the host asks of envd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// The capsule's token, sent first on a connection when envd has one; the request follows
    /// on the same connection. An envd holding a token answers anything else with `Error`
    /// (kind `Unauthorized`): reaching its address is not enough.
    Auth { token: String },
    /// Liveness and version check.
    Health,
    /// Run a process to completion, streaming its output back.
    Exec(ExecSpec),
    /// Start a process in the background and answer at once with its pid and tag.
    Start(StartSpec),
    /// Follow a background process (by pid or tag): `Spawned`, its output from now on, and
    /// `Exit` (at once if it already ended). Hanging up detaches; the process keeps running.
    Attach { selector: String },
    /// Start a terminal session. Answer `PtyStarted`, then output as `Stdout` frames and `Exit`.
    /// Meanwhile the host sends input as `Data` frames and [`PtyControl`] as JSON frames;
    /// hanging up detaches (the session lives on).
    PtyStart(PtySpec),
    /// Re-attach to a session by tag: `PtyStarted`, recent output replayed, then live output.
    PtyConnect { tag: String },
    /// Every user process in the guest.
    ListProcesses,
    /// Send a signal to a process chosen by numeric pid or by tag.
    Signal { selector: String, signal: Signal },
    /// Entries under `path`: depth 0 = the entry itself, 1 = its children, N = N levels down.
    ListDir { path: String, depth: u32 },
    /// Create a directory and its parents; an existing path is `AlreadyExists`.
    MakeDir { path: String },
    /// Remove a file, link or whole directory tree.
    Remove { path: String },
    /// Stream a file: `FileStart`, then `Data` frames, then `Done`.
    ReadFile { path: String },
    /// Write a file from the `Data` frames that follow; an empty `Data` frame ends it, any other
    /// frame abandons it. The file appears whole (written aside, then renamed) or not at all,
    /// and envd answers only once the abandoned bytes are gone. Parent directories are made.
    WriteFile { path: String },
    /// The VM was just restored from a snapshot (resume, or a create from a template): set the
    /// wall clock to the host's (the guest's stood still while it was saved) and mix fresh
    /// entropy into the kernel's pool (a restored pool is a copy of the saved one). Answer
    /// `Done`.
    Restored {
        /// Host wall-clock time, nanoseconds since the Unix epoch.
        unix_nanos: u64,
        /// Random bytes from the host, hex-encoded.
        seed: String,
        /// The capsule's own token, required on every connection from now on (a snapshot's
        /// envd holds the token of the capsule it was taken from, or none for a template's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        token: Option<String>,
    },
    /// Connect to TCP `port` on the guest's loopback (servers bound to 127.0.0.1 or to every
    /// address alike). Answer `Done` once connected (or `Error`, kind `NotFound` when nothing
    /// listens there); from then on the connection carries the raw bytes of that TCP
    /// connection both ways, without frames, until either side closes.
    Connect { port: u16 },
}

/// One filesystem entry (the API's `FileEntry`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub path: String,
    /// `file`, `directory` or `symlink`
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub permissions: String,
    pub owner: String,
    pub group: String,
    pub modified_at: i64,
    pub symlink_target: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct PtySpec {
    /// Default `/bin/bash`.
    pub cmd: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    pub cols: Option<u16>,
    pub rows: Option<u16>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// Run as this guest user (default root).
    pub user: Option<String>,
}

/// Control messages for a terminal session (JSON frames from the host).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PtyControl {
    Resize { cols: u16, rows: u16 },
    Kill,
}

/// Signals the API lets users send.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum Signal {
    #[serde(rename = "SIGKILL")]
    Kill,
    #[serde(rename = "SIGTERM")]
    Term,
}

/// One process as listed by envd.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    /// Set for processes started through envd (background exec).
    pub tag: Option<String>,
    pub cmd: String,
    pub args: Vec<String>,
}

/// What to run: the part every way of starting a process shares.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct CommandSpec {
    /// With no `args`, a shell command line (`/bin/sh -c cmd`); otherwise the program to run.
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub envs: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// The guest user to run as; the template's default user (else root) when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Where a template keeps what every command in its capsules starts with (written by template
/// builds; read by envd for every exec, background process and terminal).
pub const TEMPLATE_DEFAULTS_PATH: &str = "/etc/wrenn/defaults.json";
/// Largest defaults file envd reads (a larger one is ignored).
pub const MAX_TEMPLATE_DEFAULTS_BYTES: usize = 64 * 1024;

/// A template's defaults. A request's own `user`, `envs` and `cwd` win over them; without
/// either, commands run as root in the user's home.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct TemplateDefaults {
    pub user: Option<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// The working directory (a recipe's last `WORKDIR`).
    pub cwd: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct StartSpec {
    #[serde(flatten)]
    pub command: CommandSpec,
    /// The caller's tag; envd picks `proc-` + 8 hex when absent. Unique among live processes.
    pub tag: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ExecSpec {
    #[serde(flatten)]
    pub command: CommandSpec,
    /// Wall-clock limit; the whole process group is killed when it passes.
    pub timeout_ms: u64,
}

/// What envd answers; the last frame of every operation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Response {
    Health {
        envd_version: String,
        kernel_version: String,
        protocol: u32,
    },
    Started {
        pid: u32,
        tag: String,
    },
    PtyStarted {
        tag: String,
        pid: u32,
    },
    /// First frame of an exec: the process runs. Output frames and `Exit` follow.
    Spawned {
        pid: u32,
    },
    Processes {
        processes: Vec<ProcessInfo>,
    },
    /// The request was carried out and has nothing to report.
    Done,
    Entries {
        entries: Vec<FileEntry>,
    },
    Entry {
        // Boxed: keeps every `Response` (and every `Result<_, Response>`) small.
        entry: Box<FileEntry>,
    },
    /// A file read begins; `size` bytes of `Data` frames follow.
    FileStart {
        size: u64,
    },
    /// A file write finished.
    Written {
        size: u64,
    },
    Exit {
        exit_code: i32,
        timed_out: bool,
        duration_ms: u64,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

impl Response {
    /// The exit of a process envd did not time (background processes, terminals).
    pub fn exited(exit_code: i32) -> Self {
        Response::Exit {
            exit_code,
            timed_out: false,
            duration_ms: 0,
        }
    }
}

/// Classes of failure envd reports, so the host can map them to API errors.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself was wrong (unknown command, bad cwd, ...).
    InvalidRequest,
    NotFound,
    /// A live process already has the requested tag.
    Conflict,
    /// The path exists already.
    AlreadyExists,
    /// The program to run does not exist (a shell would exit 127).
    CommandNotFound,
    /// The program exists but cannot be executed (a shell would exit 126).
    NotExecutable,
    Internal,
    /// The connection did not present the capsule's token.
    Unauthorized,
}

/// One decoded frame.
#[derive(Debug, PartialEq)]
pub enum Frame {
    Json(Vec<u8>),
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Data(Vec<u8>),
}

#[derive(Debug)]
pub enum ProtoError {
    Io(std::io::Error),
    FrameTooLarge(u32),
    UnknownFrameKind(u8),
    Json(serde_json::Error),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::Io(e) => write!(f, "i/o: {e}"),
            ProtoError::FrameTooLarge(n) => write!(f, "frame of {n} bytes exceeds the limit"),
            ProtoError::UnknownFrameKind(k) => write!(f, "unknown frame kind {k}"),
            ProtoError::Json(e) => write!(f, "bad json frame: {e}"),
        }
    }
}

impl std::error::Error for ProtoError {}

impl From<std::io::Error> for ProtoError {
    fn from(e: std::io::Error) -> Self {
        ProtoError::Io(e)
    }
}

impl From<serde_json::Error> for ProtoError {
    fn from(e: serde_json::Error) -> Self {
        ProtoError::Json(e)
    }
}

/// Writes one frame. Payloads longer than [`MAX_FRAME_LEN`] are split into several frames.
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: FrameKind,
    payload: &[u8],
) -> Result<(), ProtoError> {
    let mut chunks = payload.chunks(MAX_FRAME_LEN as usize).peekable();
    if chunks.peek().is_none() {
        w.write_all(&[kind as u8, 0, 0, 0, 0]).await?;
        return Ok(());
    }
    for chunk in chunks {
        let mut header = [0u8; 5];
        header[0] = kind as u8;
        header[1..].copy_from_slice(&(chunk.len() as u32).to_be_bytes());
        if chunk.len() <= COALESCE_MAX {
            // One write, so one TCP segment on a no-delay socket: under emulation every
            // segment the guest sends or receives costs an interrupt and a wakeup.
            let mut buf = Vec::with_capacity(header.len() + chunk.len());
            buf.extend_from_slice(&header);
            buf.extend_from_slice(chunk);
            w.write_all(&buf).await?;
        } else {
            w.write_all(&header).await?;
            w.write_all(chunk).await?;
        }
    }
    Ok(())
}

/// Frames up to this size are written with their header in a single write.
const COALESCE_MAX: usize = 64 * 1024;

/// Writes a value as a JSON frame.
pub async fn write_json<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    value: &T,
) -> Result<(), ProtoError> {
    let bytes = serde_json::to_vec(value)?;
    write_frame(w, FrameKind::Json, &bytes).await
}

/// Reads one frame; `Ok(None)` on a clean end of stream before a header.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, ProtoError> {
    let mut header = [0u8; 5];
    match r.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let kind = FrameKind::from_u8(header[0]).ok_or(ProtoError::UnknownFrameKind(header[0]))?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]);
    if len > MAX_FRAME_LEN {
        return Err(ProtoError::FrameTooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok(Some(match kind {
        FrameKind::Json => Frame::Json(payload),
        FrameKind::Stdout => Frame::Stdout(payload),
        FrameKind::Stderr => Frame::Stderr(payload),
        FrameKind::Data => Frame::Data(payload),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip() {
        let mut buf = Vec::new();
        write_json(&mut buf, &Request::Health).await.unwrap();
        write_frame(&mut buf, FrameKind::Stdout, b"hello")
            .await
            .unwrap();
        write_frame(&mut buf, FrameKind::Stderr, b"").await.unwrap();
        let mut r = &buf[..];
        let Some(Frame::Json(j)) = read_frame(&mut r).await.unwrap() else {
            panic!("expected json")
        };
        assert_eq!(
            serde_json::from_slice::<Request>(&j).unwrap(),
            Request::Health
        );
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Some(Frame::Stdout(b"hello".to_vec()))
        );
        assert_eq!(
            read_frame(&mut r).await.unwrap(),
            Some(Frame::Stderr(vec![]))
        );
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn oversized_and_unknown_frames_are_rejected() {
        let mut r: &[u8] = &[1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtoError::FrameTooLarge(_))
        ));
        let mut r: &[u8] = &[9, 0, 0, 0, 0];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(ProtoError::UnknownFrameKind(9))
        ));
    }

    /// Counts the writes it is given.
    struct CountingWriter(Vec<usize>);

    impl AsyncWrite for CountingWriter {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.0.push(buf.len());
            std::task::Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_frames_go_out_in_one_write() {
        let mut w = CountingWriter(Vec::new());
        write_json(&mut w, &Request::Health).await.unwrap();
        assert_eq!(w.0.len(), 1, "{:?}", w.0);
        let mut w = CountingWriter(Vec::new());
        write_frame(&mut w, FrameKind::Data, &vec![0u8; 1 << 20])
            .await
            .unwrap();
        assert_eq!(w.0, vec![5, 1 << 20]);
    }

    #[tokio::test]
    async fn large_payloads_are_split() {
        let big = vec![7u8; MAX_FRAME_LEN as usize + 10];
        let mut buf = Vec::new();
        write_frame(&mut buf, FrameKind::Stdout, &big)
            .await
            .unwrap();
        let mut r = &buf[..];
        let Some(Frame::Stdout(a)) = read_frame(&mut r).await.unwrap() else {
            panic!()
        };
        let Some(Frame::Stdout(b)) = read_frame(&mut r).await.unwrap() else {
            panic!()
        };
        assert_eq!(a.len() + b.len(), big.len());
    }
}

/// The serial lifeline: a virtio-serial port (guest `/dev/vportNp1`, host unix socket) that does
/// not depend on the guest network. It carries one JSON object per line each way, low rate:
/// health, and repairing the platform interface when TCP to envd fails. Replies echo the
/// request's `id`, so a client skips any stale reply a timed-out predecessor left in the port.
pub mod lifeline {
    use serde::{Deserialize, Serialize};

    /// Name of the lifeline port (QEMU `virtserialport,name=`); the guest finds its device node
    /// through `/sys/class/virtio-ports/*/name`, since the node's number follows the device's
    /// position on the virtio bus.
    pub const PORT_NAME: &str = "org.wrenn.lifeline";
    /// Longest line either side accepts.
    pub const MAX_LINE: usize = 64 * 1024;

    #[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
    pub struct LifelineRequest {
        pub id: u64,
        pub op: LifelineOp,
    }

    #[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
    #[serde(rename_all = "snake_case")]
    pub enum LifelineOp {
        /// Is envd alive? Also checks (and repairs) the network, like `repair_network`.
        Health,
        /// Put the platform interface back as the boot configured it.
        RepairNetwork,
    }

    #[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
    pub struct LifelineReply {
        pub id: u64,
        pub envd_version: String,
        /// Absent when envd knows no network configuration (started outside a capsule).
        #[serde(default)]
        pub network: Option<super::NetworkRepair>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub error: Option<String>,
    }
}

/// What a network check found and put back (names like `link up`, `default route`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct NetworkRepair {
    pub repaired: Vec<String>,
    pub failed: Vec<String>,
}
