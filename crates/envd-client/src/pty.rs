//! Terminal sessions: start or re-attach, then input, resize and kill while output streams.

use std::time::Duration;

use envd_proto::{
    read_frame, write_frame, write_json, Frame, FrameKind, PtySpec, Request, Response,
};

use crate::client::EnvdClient;
use crate::conn::EnvdConn;
use crate::error::{EnvdError, Result};

/// How long a detached terminal connection may take to close in order.
const DETACH_DRAIN: Duration = Duration::from_secs(5);

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

impl EnvdClient {
    /// Starts a terminal session.
    pub async fn pty_start(&self, spec: PtySpec) -> Result<PtySession> {
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
        let (conn, tag, pid) = match self.open_with(&req).await? {
            (conn, Response::PtyStarted { tag, pid }) => (conn, tag, pid),
            (_, other) => return Err(EnvdError::unexpected("pty", other)),
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
                        _ => Err(EnvdError::Unavailable(
                            "unexpected frame in terminal session".into(),
                        )),
                    },
                    Ok(None) => Err(EnvdError::Unavailable("terminal connection closed".into())),
                    Ok(Some(_)) => continue,
                    Err(e) => Err(e.into()),
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
}

impl PtySession {
    fn writer(&mut self) -> Result<&mut tokio::io::WriteHalf<EnvdConn>> {
        self.writer
            .as_mut()
            .ok_or_else(|| EnvdError::Unavailable("terminal session detached".into()))
    }

    /// The next event (cancel-safe); `None` after the last.
    pub async fn next(&mut self) -> Option<Result<PtyEvent>> {
        self.events.recv().await
    }

    pub async fn input(&mut self, bytes: &[u8]) -> Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        Ok(write_frame(self.writer()?, FrameKind::Data, bytes).await?)
    }

    pub async fn resize(&mut self, cols: u16, rows: u16) -> Result<()> {
        let msg = envd_proto::PtyControl::Resize { cols, rows };
        Ok(write_json(self.writer()?, &msg).await?)
    }

    pub async fn kill(&mut self) -> Result<()> {
        Ok(write_json(self.writer()?, &envd_proto::PtyControl::Kill).await?)
    }
}

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
