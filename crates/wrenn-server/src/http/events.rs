//! `GET /v1/events/stream` (the caller's team) and `GET /v1/admin/events/stream` (every team):
//! Server-Sent Events from the event bus. A `connected` event first, a `: keepalive` comment
//! every 30 s; a client that falls [`crate::events::BACKLOG`] events behind is disconnected.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;
use tokio_stream::wrappers::BroadcastStream;

use crate::http::auth::{AdminAuth, TeamAuth};
use crate::AppState;

const KEEPALIVE: Duration = Duration::from_secs(30);

fn stream_for(
    s: &AppState,
    team: Option<String>,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    let rx = BroadcastStream::new(s.events.subscribe());
    let connected = SseEvent::default().event("connected").data(
        serde_json::json!({"event": "connected", "timestamp": chrono::Utc::now()}).to_string(),
    );
    let events = rx
        // A lagging client is cut off: its stream ends here.
        .take_while(|r| std::future::ready(!matches!(r, Err(BroadcastStreamRecvError::Lagged(_)))))
        .filter_map(move |r| {
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
            .chain(events)
            .take_until(closing),
    )
    .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive"))
}

pub async fn team_stream(
    State(s): State<AppState>,
    auth: TeamAuth,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    stream_for(&s, Some(auth.team_id))
}

pub async fn admin_stream(
    State(s): State<AppState>,
    _: AdminAuth,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    stream_for(&s, None)
}
