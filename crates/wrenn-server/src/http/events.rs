//! `GET /v1/events/stream` (the caller's team) and `GET /v1/admin/events/stream` (every team):
//! Server-Sent Events from the event bus. A `connected` event first, a `: keepalive` comment
//! every 30 s; a client that falls [`crate::events::BACKLOG`] events behind is disconnected,
//! and one whose credential stops holding gets a `revoked` event and is disconnected.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::error::HttpError;
use crate::http::auth::{revoked, AdminAuth, Grant, TeamAuth};
use crate::http::limits::StreamSlot;
use crate::AppState;

const KEEPALIVE: Duration = Duration::from_secs(30);

/// The bus's events for `team` (every team for `None`) until the client leaves, falls behind,
/// the server stops, or `grant` stops authorising the caller: then a last `revoked` event
/// (`{"event":"revoked","reason"}`) ends the stream.
fn stream_for(
    s: &AppState,
    team: Option<String>,
    grant: Grant,
    slot: Option<StreamSlot>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let reason = Arc::new(Mutex::new(None::<String>));
    let lost = {
        let (s, team, reason) = (s.clone(), team.clone(), reason.clone());
        async move {
            let why = revoked(&s, &grant, team.as_deref()).await;
            *reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        }
    };
    let last = stream::once(async move { reason.lock().unwrap_or_else(|e| e.into_inner()).take() })
        .filter_map(|why| {
            std::future::ready(why.map(|why| {
                let data = serde_json::json!({"event": "revoked", "reason": why});
                Ok(SseEvent::default().event("revoked").data(data.to_string()))
            }))
        });
    let rx = BroadcastStream::new(s.events.subscribe());
    let connected = SseEvent::default().event("connected").data(
        serde_json::json!({"event": "connected", "timestamp": chrono::Utc::now()}).to_string(),
    );
    let events = rx
        // A lagging client is cut off: its stream ends here.
        .take_while(|r| std::future::ready(!matches!(r, Err(BroadcastStreamRecvError::Lagged(_)))))
        .filter_map(move |r| {
            // The team's stream slot is held as long as the stream is.
            let _held = &slot;
            let team = team.clone();
            std::future::ready(match r {
                Ok(ev) if team.is_none() || ev.team_id == team => serde_json::to_string(&*ev)
                    .ok()
                    .map(|data| Ok(SseEvent::default().event(ev.event.as_str()).data(data))),
                _ => None,
            })
        });
    let closing = s.events.closed();
    Sse::new(
        stream::once(async move { Ok(connected) })
            .chain(events.take_until(lost))
            .chain(last)
            .take_until(closing),
    )
    .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
}

pub async fn team_stream(
    State(s): State<AppState>,
    auth: TeamAuth,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, HttpError> {
    let slot = s.streams.acquire(&auth.team_id)?;
    Ok(stream_for(&s, Some(auth.team_id), auth.grant, Some(slot)))
}

pub async fn admin_stream(
    State(s): State<AppState>,
    _: AdminAuth,
    grant: AdminGrant,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    stream_for(&s, None, grant.0, None)
}

/// The admin session's cookie as a [`Grant`] (after [`AdminAuth`] has checked it).
pub struct AdminGrant(Grant);

impl<S: Send + Sync> FromRequestParts<S> for AdminGrant {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(AdminGrant(Grant::session_of(parts, true)))
    }
}
