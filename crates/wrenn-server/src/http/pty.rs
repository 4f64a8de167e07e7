//! `GET /v1/capsules/{id}/pty`: interactive terminals over a WebSocket.
//!
//! First client message: `{"type":"start",cmd?,args?,cols?,rows?,envs?,cwd?,user?}` or
//! `{"type":"connect","tag"}`. Server: `{"type":"started","tag","pid"}`, output, `exit`, `error`
//! (`fatal: true` ends the connection), and `{"type":"ping"}` every 30 s.
//!
//! Two framings share the endpoint, chosen once at the upgrade: a browser (it always sends an
//! `Origin` header) gets the spec's JSON `{"type":"output","data":<base64>}`; other clients (the
//! official SDK sends no `Origin`) get output as binary frames from the first byte. Input is
//! accepted in both forms from everyone: binary frames, or JSON `{"type":"input","data":<base64>}`.
//! Sessions outlive the WebSocket: closing detaches, `connect` re-attaches and replays the
//! recent screen.

use std::time::Duration;

use super::ApiPath;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::Response;
use base64::Engine;
use envd_client::{PtyEvent, PtySession};
use serde::Deserialize;
use serde_json::json;
use wrenn_api::ApiError;

use crate::error::HttpError;
use crate::http::auth::{revoked, TeamAuth};
use crate::AppState;

const PING_EVERY: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientMessage {
    Start(wrenn_api::TerminalStart),
    Connect { tag: String },
    Input { data: String },
    Resize { cols: u16, rows: u16 },
    Kill,
    Pong,
    Ping,
}

pub async fn pty(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    s.capsules.require_running(&auth.team_id, &id).await?;
    let ws =
        ws.map_err(|e| ApiError::invalid(format!("this endpoint needs a WebSocket upgrade: {e}")))?;
    let json_output = headers.contains_key(header::ORIGIN);
    let slot = s.streams.acquire(&auth.team_id)?;
    Ok(ws.on_upgrade(move |socket| async move {
        let _slot = slot;
        run(socket, s, auth, id, json_output).await
    }))
}

async fn run(mut socket: WebSocket, s: AppState, auth: TeamAuth, id: String, json_output: bool) {
    let first = tokio::time::timeout(Duration::from_secs(30), socket.recv()).await;
    let text = match first {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        Ok(Some(Ok(Message::Binary(b)))) => String::from_utf8_lossy(&b).into_owned(),
        Ok(_) => return,
        Err(_) => return fatal(socket, "no start or connect message within 30 s").await,
    };
    let envd = match s.capsules.files(&auth.team_id, &id).await {
        Ok(e) => e,
        Err(e) => return fatal(socket, &e.message).await,
    };
    let session = match serde_json::from_str::<ClientMessage>(&text) {
        Ok(ClientMessage::Start(start)) => envd.pty_start(crate::capsules::pty_spec(start)).await,
        Ok(ClientMessage::Connect { tag }) => envd.pty_connect(&tag).await,
        Ok(_) => return fatal(socket, "the first message must be start or connect").await,
        Err(e) => return fatal(socket, &format!("bad first message: {e}")).await,
    };
    match session {
        Ok(session) => {
            let _busy = s.capsules.hold(&id);
            let revoked = revoked(&s, &auth.grant, Some(&auth.team_id));
            relay(socket, session, json_output, revoked).await
        }
        Err(e) => fatal(socket, &crate::error::from_envd(e).message).await,
    }
}

/// Relays until the terminal exits, the client leaves, or `revoked` completes (the caller's
/// credential no longer holds: a fatal error naming why, a policy-violation close, and the
/// terminal is left running for a caller who still may connect to it).
async fn relay(
    mut socket: WebSocket,
    mut session: PtySession,
    json_output: bool,
    revoked: impl std::future::Future<Output = String>,
) {
    let mut revoked = std::pin::pin!(revoked);
    let started = json!({"type": "started", "tag": session.tag, "pid": session.pid});
    if send(&mut socket, started).await.is_err() {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    loop {
        tokio::select! {
            ev = session.next() => match ev {
                Some(Ok(PtyEvent::Output(b))) => {
                    let msg = if json_output {
                        Message::Text(json!({"type": "output", "data": b64.encode(&b)}).to_string().into())
                    } else {
                        Message::Binary(b.into())
                    };
                    if socket.send(msg).await.is_err() {
                        return drain(socket, session).await;
                    }
                }
                Some(Ok(PtyEvent::Exit(code))) => {
                    let _ = send(&mut socket, json!({"type": "exit", "exit_code": code})).await;
                    let _ = socket.send(Message::Close(None)).await;
                    return;
                }
                Some(Err(e)) => return fatal(socket, &e.to_string()).await,
                None => return,
            },
            incoming = socket.recv() => {
                if apply(incoming, &mut socket, &mut session).await == Flow::Detach {
                    return;
                }
            }
            _ = ping.tick() => {
                if send(&mut socket, json!({"type": "ping"})).await.is_err() {
                    return drain(socket, session).await;
                }
            }
            reason = &mut revoked => {
                let message = format!("access revoked: {reason}");
                let _ = send(&mut socket, json!({"type": "error", "data": &message, "fatal": true})).await;
                return super::stream::close_for_policy(&mut socket, message).await;
            }
        }
    }
}

#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Detach,
}

/// Applies one message from the client to the session.
async fn apply(
    incoming: Option<Result<Message, axum::Error>>,
    socket: &mut WebSocket,
    session: &mut PtySession,
) -> Flow {
    let b64 = base64::engine::general_purpose::STANDARD;
    let result = match incoming {
        Some(Ok(Message::Binary(b))) => session.input(&b).await,
        Some(Ok(Message::Text(t))) => match serde_json::from_str::<ClientMessage>(&t) {
            Ok(ClientMessage::Input { data }) => match b64.decode(data.as_bytes()) {
                Ok(bytes) => session.input(&bytes).await,
                Err(_) => {
                    let _ = send(socket, json!({"type": "error", "data": "input data must be base64", "fatal": false})).await;
                    Ok(())
                }
            },
            Ok(ClientMessage::Resize { cols, rows }) => session.resize(cols, rows).await,
            Ok(ClientMessage::Kill) => session.kill().await,
            Ok(ClientMessage::Ping) => {
                let _ = send(socket, json!({"type": "pong"})).await;
                Ok(())
            }
            Ok(_) => Ok(()),
            Err(_) => {
                let _ = send(
                    socket,
                    json!({"type": "error", "data": "unknown message", "fatal": false}),
                )
                .await;
                Ok(())
            }
        },
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return Flow::Detach,
        Some(Ok(_)) => Ok(()),
    };
    match result {
        Ok(()) => Flow::Continue,
        Err(_) => Flow::Detach,
    }
}

/// The client is gone (a send failed), but what it sent before leaving still counts: the
/// official SDK, for one, sends `kill` and closes at once. Apply what is already buffered, then
/// detach.
async fn drain(mut socket: WebSocket, mut session: PtySession) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while let Ok(incoming) = tokio::time::timeout_at(deadline, socket.recv()).await {
        if apply(incoming, &mut socket, &mut session).await == Flow::Detach {
            return;
        }
    }
}

async fn send(socket: &mut WebSocket, value: serde_json::Value) -> Result<(), axum::Error> {
    socket.send(Message::Text(value.to_string().into())).await
}

async fn fatal(mut socket: WebSocket, message: &str) {
    let _ = send(
        &mut socket,
        json!({"type": "error", "data": message, "fatal": true}),
    )
    .await;
    let _ = socket.send(Message::Close(None)).await;
}
