//! `/v1/capsules*` handlers: parse, call the capsule service, answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use wrenn_api::{
    CreateCapsuleRequest, CreateProxyTokenRequest, ExecRequest, NetworkPolicy, ProxyAccess,
    ProxyToken,
};

use super::{ApiJson, ApiPath, ApiQuery};
use crate::capsules::ExecOutcome;
use crate::error::HttpError;
use crate::http::auth::TeamAuth;
use crate::AppState;

pub async fn create(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiJson(req): ApiJson<CreateCapsuleRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s
        .capsules
        .create(&auth.team_id, req, &auth.actor.event())
        .await?;
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
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.capsules.get(&auth.team_id, &id).await?))
}

pub async fn destroy(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s
        .capsules
        .destroy(&auth.team_id, &id, &auth.actor.event())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

pub async fn pause(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s
        .capsules
        .pause(&auth.team_id, &id, &auth.actor.event())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

pub async fn resume(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    let capsule = s
        .capsules
        .resume(&auth.team_id, &id, &auth.actor.event())
        .await?;
    Ok((StatusCode::ACCEPTED, Json(capsule)))
}

#[derive(serde::Deserialize)]
pub struct MetricsQuery {
    range: Option<String>,
}

pub async fn metrics(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<MetricsQuery>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(
        s.capsules
            .metrics(&auth.team_id, &id, q.range.as_deref())
            .await?,
    ))
}

#[derive(serde::Deserialize)]
pub struct StatsQuery {
    range: Option<String>,
}

pub async fn stats(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiQuery(q): ApiQuery<StatsQuery>,
) -> Result<impl IntoResponse, HttpError> {
    let now = chrono::Utc::now();
    Ok(Json(
        s.stats
            .stats(&auth.team_id, q.range.as_deref(), now)
            .await?,
    ))
}

#[derive(serde::Deserialize)]
pub struct UsageQuery {
    from: Option<String>,
    to: Option<String>,
}

pub async fn usage(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiQuery(q): ApiQuery<UsageQuery>,
) -> Result<impl IntoResponse, HttpError> {
    let today = chrono::Utc::now().date_naive();
    Ok(Json(
        s.stats
            .usage(&auth.team_id, q.from.as_deref(), q.to.as_deref(), today)
            .await?,
    ))
}

pub async fn ping(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, HttpError> {
    s.capsules.ping(&auth.team_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn exec(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
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
    ApiPath(id): ApiPath<String>,
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
    ApiPath((id, selector)): ApiPath<(String, String)>,
    ApiQuery(q): ApiQuery<KillQuery>,
) -> Result<impl IntoResponse, HttpError> {
    s.capsules
        .kill_process(&auth.team_id, &id, &selector, q.signal.as_deref())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/capsules/{id}/proxy`: who may reach the capsule's ports besides its team.
pub async fn proxy_access(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.capsules.proxy_access(&auth.team_id, &id).await?))
}

/// `PUT /v1/capsules/{id}/proxy`: makes the capsule, or some of its ports, public or private.
pub async fn set_proxy_access(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ProxyAccess>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(
        s.capsules
            .set_proxy_access(&auth.team_id, &id, &req, &auth.actor.event())
            .await?,
    ))
}

/// `GET /v1/capsules/{id}/network`: where the capsule's guest may connect to.
pub async fn network(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(s.capsules.network(&auth.team_id, &id).await?))
}

/// `PUT /v1/capsules/{id}/network`: replaces the capsule's egress policy (applied at once
/// while it runs, at its resume while it is paused).
pub async fn set_network(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<NetworkPolicy>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(
        s.capsules
            .set_network(&auth.team_id, &id, &req, &auth.actor.event())
            .await?,
    ))
}

/// `POST /v1/capsules/{id}/proxy/tokens`: an access token for one port, and the link that
/// opens it in a browser.
pub async fn create_proxy_token(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<CreateProxyTokenRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let (token, port, expires_at) = s
        .capsules
        .create_proxy_token(&auth.team_id, &id, &req, chrono::Utc::now())
        .await?;
    let url = format!(
        "{}?{}={token}",
        s.proxy.settings.url(port, &id),
        super::proxy::TOKEN_PARAM
    );
    Ok((
        StatusCode::CREATED,
        Json(ProxyToken {
            token,
            port,
            url,
            expires_at,
        }),
    ))
}

/// `DELETE /v1/capsules/{id}/proxy/tokens`: revokes every access token of the capsule.
pub async fn revoke_proxy_tokens(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse, HttpError> {
    s.capsules.revoke_proxy_tokens(&auth.team_id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
