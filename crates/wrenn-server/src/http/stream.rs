//! Processes over WebSockets.
//!
//! `GET /v1/capsules/{id}/exec/stream` (docs/openapi.yaml): the client's first message is
//! `{"type":"start","cmd":…,"args":[…]}` (optionally `envs`, `cwd`); the server answers
//! `{"type":"start","pid"}`, then `stdout`/`stderr` events with text `data` in the order the
//! process wrote them, then `{"type":"exit","exit_code"}` and closes. `{"type":"stop"}` kills the
//! command (its `exit` still follows). Failures answer `{"type":"error","data"}` and close.
//! A client that goes away kills the command. Nothing is buffered beyond one frame: a slow
//! client slows the process down (its pipe fills), it never grows the server's memory.
//!
//! `GET /v1/capsules/{id}/processes/{selector}/stream`: the same events for a background
//! process, from the moment of attaching; several viewers may attach; leaving only detaches.

use std::time::Duration;

use super::ApiPath;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use envd_client::ExecEvent;
use serde::Deserialize;
use serde_json::json;
use wrenn_api::{ApiError, ExecRequest};

use crate::error::HttpError;
use crate::http::auth::{revoked, TeamAuth};
use crate::http::limits::StreamSlot;
use crate::AppState;

/// How long a client may wait before sending `start`.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMessage {
    Start {
        cmd: String,
        #[serde(default)]
        args: Vec<String>,
        #[serde(default)]
        envs: std::collections::BTreeMap<String, String>,
        cwd: Option<String>,
    },
    Stop,
}

pub async fn exec_stream(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    // 404 and 409 are answered as HTTP errors, before any upgrade.
    s.capsules.require_running(&auth.team_id, &id).await?;
    let ws =
        ws.map_err(|e| ApiError::invalid(format!("this endpoint needs a WebSocket upgrade: {e}")))?;
    let slot = s.streams.acquire(&auth.team_id)?;
    Ok(ws.on_upgrade(move |socket| run(socket, s, auth, id, slot)))
}

async fn run(mut socket: WebSocket, s: AppState, auth: TeamAuth, id: String, _slot: StreamSlot) {
    let first = tokio::time::timeout(START_TIMEOUT, next_text(&mut socket)).await;
    let req = match first {
        Ok(Some(text)) => match serde_json::from_str::<ClientMessage>(&text) {
            Ok(ClientMessage::Start {
                cmd,
                args,
                envs,
                cwd,
            }) => ExecRequest {
                cmd,
                args,
                envs,
                cwd,
                ..Default::default()
            },
            Ok(ClientMessage::Stop) => {
                return fail(socket, "nothing to stop: send start first").await
            }
            Err(e) => return fail(socket, &format!("expected a start message: {e}")).await,
        },
        Ok(None) => return,
        Err(_) => return fail(socket, "no start message within 30 s").await,
    };
    let stream = match s.capsules.exec_stream(&auth.team_id, &id, req).await {
        Ok(stream) => stream,
        Err(e) => return fail(socket, &e.message).await,
    };
    let _busy = s.capsules.hold(&id);
    let revoked = revoked(&s, &auth.grant, Some(&auth.team_id));
    forward(socket, stream, true, revoked).await;
}

/// `GET /v1/capsules/{id}/processes/{selector}/stream`: follow a background process. The
/// server speaks first (`start`, output from now on, `exit`); closing only detaches.
pub async fn process_stream(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath((id, selector)): ApiPath<(String, String)>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    s.capsules.require_running(&auth.team_id, &id).await?;
    let ws =
        ws.map_err(|e| ApiError::invalid(format!("this endpoint needs a WebSocket upgrade: {e}")))?;
    let slot = s.streams.acquire(&auth.team_id)?;
    Ok(ws.on_upgrade(move |socket| async move {
        let _slot = slot;
        match s.capsules.attach(&auth.team_id, &id, &selector).await {
            Ok(stream) => {
                let _busy = s.capsules.hold(&id);
                let revoked = revoked(&s, &auth.grant, Some(&auth.team_id));
                forward(socket, stream, false, revoked).await
            }
            Err(e) => fail(socket, &e.message).await,
        }
    }))
}

/// Relays a process's events to the WebSocket until its exit. With `stoppable`, a client
/// `stop` kills the process; a client that leaves drops the stream (for an exec: kills it; for
/// an attach: detaches). When `revoked` completes (the caller's credential no longer holds)
/// the client gets an `error` event with the reason and a policy-violation close.
async fn forward(
    mut socket: WebSocket,
    mut stream: envd_client::ExecStream,
    stoppable: bool,
    revoked: impl std::future::Future<Output = String>,
) {
    let mut revoked = std::pin::pin!(revoked);
    if send(&mut socket, json!({"type": "start", "pid": stream.pid}))
        .await
        .is_err()
    {
        return;
    }
    let (mut out, mut err) = (Utf8Stream::default(), Utf8Stream::default());
    loop {
        tokio::select! {
            event = stream.next() => {
                let msg = match event {
                    Ok(ExecEvent::Stdout(b)) => json!({"type": "stdout", "data": out.decode(&b)}),
                    Ok(ExecEvent::Stderr(b)) => json!({"type": "stderr", "data": err.decode(&b)}),
                    Ok(ExecEvent::Exit { exit_code, .. }) => {
                        for (kind, rest) in [("stdout", out.finish()), ("stderr", err.finish())] {
                            if !rest.is_empty() {
                                let _ = send(&mut socket, json!({"type": kind, "data": rest})).await;
                            }
                        }
                        let _ = send(&mut socket, json!({"type": "exit", "exit_code": exit_code})).await;
                        let _ = socket.send(Message::Close(None)).await;
                        return;
                    }
                    Err(e) => return fail(socket, &e.to_string()).await,
                };
                if send(&mut socket, msg).await.is_err() {
                    return;
                }
            }
            incoming = socket.recv() => match incoming {
                Some(Ok(Message::Text(t))) => {
                    let stop = stoppable && matches!(serde_json::from_str::<ClientMessage>(&t), Ok(ClientMessage::Stop));
                    if stop && stream.stop().await.is_err() {
                        return;
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
            reason = &mut revoked => return close_revoked(socket, &reason).await,
        }
    }
}

/// Ends a WebSocket whose caller lost the right to it: an `error` event naming why, then a
/// close with code 1008 (policy violation).
async fn close_revoked(mut socket: WebSocket, reason: &str) {
    let message = format!("access revoked: {reason}");
    let _ = send(&mut socket, json!({"type": "error", "data": message})).await;
    close_for_policy(&mut socket, message).await;
}

/// A close frame with code 1008 (policy violation) and `message` as its reason.
pub async fn close_for_policy(socket: &mut WebSocket, message: String) {
    let mut frame_reason = message;
    // A close frame's reason holds at most 123 bytes.
    while frame_reason.len() > 123 {
        frame_reason.pop();
    }
    let _ = socket
        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
            code: axum::extract::ws::close_code::POLICY,
            reason: frame_reason.into(),
        })))
        .await;
}

/// The next text message, skipping pings; `None` when the client closes.
async fn next_text(socket: &mut WebSocket) -> Option<String> {
    loop {
        match socket.recv().await? {
            Ok(Message::Text(t)) => return Some(t.to_string()),
            Ok(Message::Binary(b)) => return Some(String::from_utf8_lossy(&b).into_owned()),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

async fn send(socket: &mut WebSocket, value: serde_json::Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(value.to_string().into())).await
}

async fn fail(mut socket: WebSocket, message: &str) {
    let _ = send(&mut socket, json!({"type": "error", "data": message})).await;
    let _ = socket.send(Message::Close(None)).await;
}

/// Turns a byte stream into text without splitting a character across two events: an
/// incomplete sequence at the end of a chunk waits for the next one; invalid bytes become U+FFFD.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    pub fn decode(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                    match e.error_len() {
                        Some(n) => {
                            out.push('\u{FFFD}');
                            rest = &after[n..];
                        }
                        None => {
                            rest = after; // incomplete: wait for more
                            break;
                        }
                    }
                }
            }
        }
        self.pending = rest.to_vec();
        out
    }

    /// Whatever is left at the end of the stream.
    pub fn finish(&mut self) -> String {
        let rest = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        rest
    }
}

#[cfg(test)]
mod tests {
    use super::Utf8Stream;

    #[test]
    fn characters_split_across_chunks_arrive_whole() {
        let mut d = Utf8Stream::default();
        let bytes = "héllo €".as_bytes();
        let mut out = String::new();
        for b in bytes {
            out.push_str(&d.decode(&[*b]));
        }
        out.push_str(&d.finish());
        assert_eq!(out, "héllo €");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut d = Utf8Stream::default();
        assert_eq!(d.decode(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(d.decode(b"\xe2\x82"), "");
        assert_eq!(d.finish(), "\u{FFFD}");
    }
}
