//! `/v1/capsules*` handlers: parse, call [`crate::service::CapsuleService`], answer.

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use wrenn_api::{CreateCapsuleRequest, ExecRequest};

use super::ApiJson;
use crate::auth::TeamAuth;
use crate::error::HttpError;
use crate::service::ExecOutcome;
use crate::AppState;

pub async fn create(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiJson(req): ApiJson<CreateCapsuleRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s.capsules.create(&auth.team_id, req).await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

pub async fn list(
    State(s): State<AppState>,
    auth: TeamAuth,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.capsules.list(&auth.team_id).await?))
}

pub async fn get(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.capsules.get(&auth.team_id, &id).await?))
}

pub async fn destroy(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s.capsules.destroy(&auth.team_id, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

pub async fn pause(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s.capsules.pause(&auth.team_id, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

pub async fn resume(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s.capsules.resume(&auth.team_id, &id).await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

#[derive(serde::Deserialize)]
pub struct MetricsQuery {
    range: Option<String>,
}

pub async fn metrics(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
    Query(q): Query<MetricsQuery>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(
        s.capsules
            .metrics(&auth.team_id, &id, q.range.as_deref())
            .await?,
    ))
}

pub async fn ping(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
) -> Result<StatusCode, HttpError> {
    s.capsules.ping(&auth.team_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn exec(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<axum::response::Response, HttpError> {
    Ok(match s.capsules.exec(&auth.team_id, &id, req).await? {
        ExecOutcome::Foreground(out) => Json(out).into_response(),
        ExecOutcome::Background(started) => (StatusCode::ACCEPTED, Json(started)).into_response(),
    })
}

pub async fn processes(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.capsules.processes(&auth.team_id, &id).await?))
}

#[derive(serde::Deserialize)]
pub struct KillQuery {
    signal: Option<String>,
}

pub async fn kill_process(
    State(s): State<AppState>,
    auth: TeamAuth,
    Path((id, selector)): Path<(String, String)>,
    Query(q): Query<KillQuery>,
) -> Result<impl IntoResponse, HttpError> {
    s.capsules
        .kill_process(&auth.team_id, &id, &selector, q.signal.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
