//! `/v1/admin/builds*` and `/v1/admin/templates*`: template builds and every team's templates,
//! for platform admins (session auth; others 403).

use std::convert::Infallible;
use std::time::Duration;

use super::ApiPath;
use axum::extract::multipart::Multipart;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::Json;
use futures_util::stream::{self, Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::broadcast::error::{RecvError, TryRecvError};
use wrenn_api::{
    ApiError, Build, CreateBuildRequest, ErrorCode, Template, MAX_BUILD_ARCHIVE_BYTES,
};

use crate::accounts::user_actor;
use crate::builds::LiveEvent;
use crate::error::HttpError;
use crate::http::auth::AdminAuth;
use crate::AppState;

type Result<T> = std::result::Result<T, HttpError>;

/// Largest `config` part (or JSON body) of a build request.
const MAX_CONFIG_BYTES: usize = 1024 * 1024;
const KEEPALIVE: Duration = Duration::from_secs(30);

/// `POST /v1/admin/builds`: JSON, or multipart with a `config` JSON part and an optional
/// `archive` (tar, tar.gz or zip; at most 100 MiB, 413 beyond). 202 with the queued build.
pub async fn create(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    req: Request,
) -> Result<(StatusCode, Json<Build>)> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("multipart/form-data"));
    let upload = tempfile::Builder::new()
        .prefix("wrenn-build-upload")
        .tempfile()
        .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
    let (config, has_archive) = if multipart {
        let mp = Multipart::from_request(req, &s)
            .await
            .map_err(|e| ApiError::invalid(format!("invalid multipart body: {e}")))?;
        read_multipart(mp, upload.path()).await?
    } else {
        let body = axum::body::to_bytes(req.into_body(), MAX_CONFIG_BYTES)
            .await
            .map_err(|e| ApiError::new(ErrorCode::TooLarge, format!("build request: {e}")))?;
        (parse_config(&body)?, false)
    };
    let plan = s.builds.plan(config).await?;
    let archive = has_archive.then(|| upload.path());
    let build = s
        .builds
        .submit(plan, archive, None, &user_actor(&u))
        .await?;
    Ok((StatusCode::ACCEPTED, Json(build)))
}

fn parse_config(bytes: &[u8]) -> Result<CreateBuildRequest> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::invalid(format!("invalid build request: {e}")).into())
}

/// The `config` part, and the `archive` part streamed into `path` (bounded).
async fn read_multipart(
    mut mp: Multipart,
    path: &std::path::Path,
) -> Result<(CreateBuildRequest, bool)> {
    let bad = |e: &dyn std::fmt::Display| {
        HttpError(ApiError::invalid(format!("invalid multipart body: {e}")))
    };
    let mut config = None;
    let mut has_archive = false;
    while let Some(mut field) = mp.next_field().await.map_err(|e| bad(&e))? {
        match field.name() {
            Some("config") => {
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(|e| bad(&e))? {
                    bytes.extend_from_slice(&chunk);
                    if bytes.len() > MAX_CONFIG_BYTES {
                        return Err(
                            ApiError::new(ErrorCode::TooLarge, "config part too large").into()
                        );
                    }
                }
                config = Some(parse_config(&bytes)?);
            }
            Some("archive") => {
                let mut file = tokio::fs::File::create(path)
                    .await
                    .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
                let mut total = 0u64;
                while let Some(chunk) = field.chunk().await.map_err(|e| bad(&e))? {
                    total += chunk.len() as u64;
                    if total > MAX_BUILD_ARCHIVE_BYTES {
                        return Err(ApiError::new(
                            ErrorCode::TooLarge,
                            format!(
                                "the archive is larger than {} MiB",
                                MAX_BUILD_ARCHIVE_BYTES >> 20
                            ),
                        )
                        .into());
                    }
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
                }
                file.flush()
                    .await
                    .map_err(|e| ApiError::internal(format!("temporary file: {e}")))?;
                has_archive = true;
            }
            _ => {}
        }
    }
    let config =
        config.ok_or_else(|| ApiError::invalid("the multipart body needs a config part"))?;
    Ok((config, has_archive))
}

pub async fn list(State(s): State<AppState>, _: AdminAuth) -> Result<Json<Vec<Build>>> {
    Ok(Json(s.builds.list().await?))
}

pub async fn get(
    State(s): State<AppState>,
    _: AdminAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Build>> {
    Ok(Json(s.builds.get(&id).await?))
}

pub async fn cancel(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.builds.cancel(&id, &user_actor(&u)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/admin/builds/{id}/stream` (extension): Server-Sent Events. First the record's
/// finished steps (`log`) and the running step's events so far, then live `step`, `output`
/// and `log` events, and last the final `status`, after which the stream ends. A follower
/// that falls behind gets a `lagged` event and the stream ends (reconnect to catch up).
pub async fn stream(
    State(s): State<AppState>,
    _: AdminAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Sse<impl Stream<Item = std::result::Result<SseEvent, Infallible>>>> {
    let (build, follower) = s.builds.follow(&id).await?;
    let recorded: Vec<(wrenn_api::BuildPhase, u32)> =
        build.logs.iter().map(|l| (l.phase, l.step)).collect();
    let mut first: Vec<SseEvent> = build
        .logs
        .iter()
        .map(|l| sse("log", &LiveEvent::Log(l.clone())))
        .collect();
    let status = LiveEvent::Status {
        status: build.status,
        error: build.error.clone(),
    };
    if build.status.is_final() {
        first.push(sse("status", &status));
        return Ok(Sse::new(stream::iter(first).map(Ok).boxed())
            .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive")));
    }
    first.insert(0, sse("status", &status));
    first.extend(
        follower
            .backlog
            .iter()
            .filter(|e| !already(e, &recorded))
            .map(|e| sse(kind(e), e)),
    );
    let follow = Follow::new(follower.rx, recorded, s.builds.clone(), id.clone());
    let live = stream::unfold(follow, |mut f| async move {
        let e = f.next().await?;
        Some((sse(kind(&e), &e), f))
    });
    let closing = s.events.closed();
    Ok(Sse::new(
        stream::iter(first)
            .chain(live)
            .map(Ok)
            .take_until(closing)
            .boxed(),
    )
    .keep_alive(KeepAlive::new().interval(KEEPALIVE).text("keepalive")))
}

/// How often a follower also reads the build's record: a build another replica runs
/// publishes its live events there, not here, so its step ends and final status come from
/// the record (the running step's output is only seen on the replica running it).
const RECORD_POLL: Duration = Duration::from_secs(1);

/// A follower's live part: the live channel of this replica, merged with the record.
struct Follow {
    /// `None` once closed (the build ended here, or runs on another replica).
    rx: Option<tokio::sync::broadcast::Receiver<LiveEvent>>,
    /// Step ends already sent.
    recorded: Vec<(wrenn_api::BuildPhase, u32)>,
    /// Read from the record, still to send.
    pending: std::collections::VecDeque<LiveEvent>,
    poll: tokio::time::Interval,
    builds: std::sync::Arc<crate::builds::BuildService>,
    id: String,
    done: bool,
}

impl Follow {
    fn new(
        rx: tokio::sync::broadcast::Receiver<LiveEvent>,
        recorded: Vec<(wrenn_api::BuildPhase, u32)>,
        builds: std::sync::Arc<crate::builds::BuildService>,
        id: String,
    ) -> Self {
        // The stream began with a read of the record; the next one is a period later.
        let start = tokio::time::Instant::now() + RECORD_POLL;
        let mut poll = tokio::time::interval_at(start, RECORD_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        Self {
            rx: Some(rx),
            recorded,
            pending: std::collections::VecDeque::new(),
            poll,
            builds,
            id,
            done: false,
        }
    }

    /// The next event; `None` once the final status went out (or the follower lagged).
    async fn next(&mut self) -> Option<LiveEvent> {
        loop {
            if self.done {
                return None;
            }
            // Live events first: they carry the running step's output, which a step end read
            // from the record would otherwise overtake.
            if let Some(rx) = &mut self.rx {
                match rx.try_recv() {
                    Ok(e) if already(&e, &self.recorded) => continue,
                    Ok(e) => return Some(self.sent(e)),
                    Err(TryRecvError::Lagged(n)) => return Some(self.lagged(n)),
                    Err(TryRecvError::Closed) => self.rx = None,
                    Err(TryRecvError::Empty) => {}
                }
            }
            if let Some(e) = self.pending.pop_front() {
                return Some(self.sent(e));
            }
            let Some(rx) = &mut self.rx else {
                self.poll.tick().await;
                self.poll_record().await;
                continue;
            };
            tokio::select! {
                biased;
                got = rx.recv() => match got {
                    Ok(e) if already(&e, &self.recorded) => {}
                    Ok(e) => return Some(self.sent(e)),
                    Err(RecvError::Lagged(n)) => return Some(self.lagged(n)),
                    // Nothing more comes here: the record tells the rest.
                    Err(RecvError::Closed) => {
                        self.rx = None;
                        self.poll_record().await;
                    }
                },
                _ = self.poll.tick() => self.poll_record().await,
            }
        }
    }

    fn lagged(&mut self, missed: u64) -> LiveEvent {
        self.done = true;
        LiveEvent::Lagged { missed }
    }

    /// Queues the record's step ends not sent yet, then its status if final.
    async fn poll_record(&mut self) {
        let Ok(b) = self.builds.get(&self.id).await else {
            return;
        };
        for l in b.logs {
            if !self.recorded.contains(&(l.phase, l.step)) {
                self.pending.push_back(LiveEvent::Log(l));
            }
        }
        if b.status.is_final() {
            self.pending.push_back(LiveEvent::Status {
                status: b.status,
                error: b.error,
            });
        }
    }

    fn sent(&mut self, e: LiveEvent) -> LiveEvent {
        match &e {
            LiveEvent::Log(l) if !self.recorded.contains(&(l.phase, l.step)) => {
                self.recorded.push((l.phase, l.step));
            }
            LiveEvent::Status { status, .. } if status.is_final() => self.done = true,
            _ => {}
        }
        e
    }
}

/// A live step end the follower already read from the record.
fn already(e: &LiveEvent, recorded: &[(wrenn_api::BuildPhase, u32)]) -> bool {
    match e {
        LiveEvent::Log(l) => recorded.contains(&(l.phase, l.step)),
        LiveEvent::Step { phase, step, .. } | LiveEvent::Output { phase, step, .. } => {
            recorded.contains(&(*phase, *step))
        }
        LiveEvent::Status { .. } | LiveEvent::Lagged { .. } => false,
    }
}

fn kind(e: &LiveEvent) -> &'static str {
    match e {
        LiveEvent::Step { .. } => "step",
        LiveEvent::Output { .. } => "output",
        LiveEvent::Log(_) => "log",
        LiveEvent::Status { .. } => "status",
        LiveEvent::Lagged { .. } => "lagged",
    }
}

fn sse(kind: &str, e: &LiveEvent) -> SseEvent {
    SseEvent::default()
        .event(kind)
        .data(serde_json::to_string(e).unwrap_or_else(|_| "{}".into()))
}

pub async fn templates(State(s): State<AppState>, _: AdminAuth) -> Result<Json<Vec<Template>>> {
    Ok(Json(s.builds.list_all_templates().await?))
}

pub async fn delete_template(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode> {
    s.builds.delete_template(&name, &user_actor(&u)).await?;
    Ok(StatusCode::NO_CONTENT)
}
