//! Commands: foreground exec (collected), exec streams, and attaching to background processes.

use std::time::Duration;

use envd_proto::{read_frame, ExecSpec, Frame, Request, Response};

use crate::client::EnvdClient;
use crate::conn::EnvdConn;
use crate::error::{EnvdError, Result};

/// Output kept per stream for a foreground exec; beyond it bytes are dropped (and counted).
/// Small on purpose: the answer is one JSON document held in memory, where a control byte
/// costs six (`\u0001`), so a request can never hold more than ~14 MiB. Commands with more
/// output are streamed (`exec/stream`, background processes), which apply backpressure.
pub const MAX_CAPTURE_BYTES: usize = 1024 * 1024;
/// How long past its own timeout a foreground exec waits for a guest that stopped answering.
const EXEC_GRACE: Duration = Duration::from_secs(15);

/// The result of a foreground exec.
#[derive(Debug, Clone, Default)]
pub struct ExecOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub exit_code: i32,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// Bytes of stdout dropped because it passed [`MAX_CAPTURE_BYTES`].
    pub stdout_dropped: u64,
    /// Bytes of stderr dropped because it passed [`MAX_CAPTURE_BYTES`].
    pub stderr_dropped: u64,
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

impl EnvdClient {
    /// Runs a command to completion. envd enforces `spec.timeout_ms`; the client waits a grace
    /// period beyond it before giving up on a guest that stopped answering.
    pub async fn exec(&self, spec: ExecSpec) -> Result<ExecOutput> {
        let limit = Duration::from_millis(spec.timeout_ms) + EXEC_GRACE;
        let collect = async {
            let mut stream = match self.exec_stream(spec).await {
                Ok(stream) => stream,
                // As a shell would: the reason on stderr, 127 or 126 as the exit code.
                Err(EnvdError::CannotRun { exit_code, message }) => {
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
                    ExecEvent::Stdout(b) => capture(&mut out.stdout, &b, &mut out.stdout_dropped),
                    ExecEvent::Stderr(b) => capture(&mut out.stderr, &b, &mut out.stderr_dropped),
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
            .map_err(|_| EnvdError::Unavailable("no answer from envd".into()))?
    }

    /// Starts a command and returns once it runs; its output and exit arrive through the
    /// returned stream. Dropping the stream kills the command.
    pub async fn exec_stream(&self, spec: ExecSpec) -> Result<ExecStream> {
        self.spawned("exec", Request::Exec(spec)).await
    }

    /// Follows a background process (pid or tag): its output from now on and its exit.
    /// Dropping the stream detaches; the process keeps running.
    pub async fn attach(&self, selector: &str) -> Result<ExecStream> {
        let req = Request::Attach {
            selector: selector.to_string(),
        };
        self.spawned("attach", req).await
    }

    async fn spawned(&self, what: &str, req: Request) -> Result<ExecStream> {
        match self.open_with(&req).await? {
            (conn, Response::Spawned { pid }) => Ok(ExecStream { conn, pid }),
            (_, other) => Err(EnvdError::unexpected(what, other)),
        }
    }
}

impl ExecStream {
    /// The next event; after `Exit` the stream is finished.
    pub async fn next(&mut self) -> Result<ExecEvent> {
        match read_frame(&mut self.conn).await? {
            Some(Frame::Stdout(b)) => Ok(ExecEvent::Stdout(b)),
            Some(Frame::Stderr(b)) => Ok(ExecEvent::Stderr(b)),
            Some(Frame::Data(_)) => Err(EnvdError::Unavailable(
                "unexpected data frame in exec".into(),
            )),
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
                Ok(Response::Error { kind, message }) => Err(EnvdError::reported(kind, message)),
                Ok(other) => Err(EnvdError::Unavailable(format!(
                    "unexpected frame in exec: {other:?}"
                ))),
                Err(e) => Err(EnvdError::Unavailable(format!("bad answer: {e}"))),
            },
            None => Err(EnvdError::Unavailable(
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

fn capture(buf: &mut Vec<u8>, bytes: &[u8], dropped: &mut u64) {
    let room = MAX_CAPTURE_BYTES.saturating_sub(buf.len());
    let take = room.min(bytes.len());
    buf.extend_from_slice(&bytes[..take]);
    *dropped += (bytes.len() - take) as u64;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_at_most_the_limit_and_counts_the_rest() {
        let mut buf = vec![0u8; MAX_CAPTURE_BYTES - 3];
        let mut dropped = 0;
        capture(&mut buf, b"abcdef", &mut dropped);
        assert_eq!(buf.len(), MAX_CAPTURE_BYTES);
        assert_eq!(&buf[MAX_CAPTURE_BYTES - 3..], b"abc");
        assert_eq!(dropped, 3);
        capture(&mut buf, b"xy", &mut dropped);
        assert_eq!(dropped, 5);
    }
}
