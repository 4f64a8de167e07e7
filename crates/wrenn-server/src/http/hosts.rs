//! `/v1/hosts*`: host records and tokens (sessions), and the agents' calls (registration,
//! refresh: no credential but the token itself; heartbeats and capsule events: `X-Host-Token`).

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use wrenn_api::*;

use super::{ApiJson, ApiPath, ApiQuery};
use crate::error::HttpError;
use crate::hosts::DeleteError;
use crate::http::auth::SessionAuth;
use crate::AppState;

type Result<T> = std::result::Result<T, HttpError>;

pub const HOST_TOKEN_HEADER: &str = "X-Host-Token";

/// A request from a host agent, proved by its host token.
pub struct HostAuth(pub Host);

impl FromRequestParts<AppState> for HostAuth {
    type Rejection = HttpError;

    async fn from_request_parts(parts: &mut Parts, s: &AppState) -> Result<Self> {
        let token = parts
            .headers
            .get(HOST_TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::unauthorized("missing host token: send it in X-Host-Token"))?;
        Ok(HostAuth(s.hosts.authenticate(token.trim()).await?))
    }
}

pub async fn create(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<CreateHostRequest>,
) -> Result<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(s.hosts.create(&u, req).await?)))
}

pub async fn list(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Json<Vec<Host>>> {
    Ok(Json(s.hosts.list(&u).await?))
}

pub async fn get(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Host>> {
    Ok(Json(s.hosts.get(&u, &id).await?))
}

#[derive(Deserialize)]
pub struct DeleteQuery {
    force: Option<String>,
}

pub async fn delete(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<Response> {
    let force = match q.force.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(
                ApiError::invalid(format!("force must be true or false, not {other:?}")).into(),
            )
        }
    };
    match s.hosts.delete(&u, &id, force).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT.into_response()),
        Err(DeleteError::Api(e)) => Err(e.into()),
        Err(DeleteError::HasCapsules(ids)) => {
            let n = ids.len();
            // The spec puts the ids in `error.sandbox_ids`; the official SDK reads
            // `capsule_ids` at the top level. Both are there.
            Ok((
                StatusCode::CONFLICT,
                Json(serde_json::json!({
                    "error": {
                        "code": "host_has_capsules",
                        "message": format!("host {id} has {n} active capsule(s): destroy them or delete with ?force=true"),
                        "sandbox_ids": ids,
                    },
                    "capsule_ids": ids,
                })),
            )
                .into_response())
        }
    }
}

pub async fn delete_preview(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<HostDeletePreview>> {
    Ok(Json(s.hosts.delete_preview(&u, &id).await?))
}

pub async fn regenerate_token(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(s.hosts.regenerate_token(&u, &id).await?),
    ))
}

pub async fn tags(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<String>>> {
    Ok(Json(s.hosts.tags(&u, &id).await?))
}

pub async fn add_tag(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AddTagRequest>,
) -> Result<StatusCode> {
    s.hosts.add_tag(&u, &id, &req.tag).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_tag(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath((id, tag)): ApiPath<(String, String)>,
) -> Result<StatusCode> {
    s.hosts.remove_tag(&u, &id, &tag).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn register(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<RegisterHostRequest>,
) -> Result<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(s.hosts.register(req).await?)))
}

pub async fn refresh(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<RefreshHostTokenRequest>,
) -> Result<Json<RefreshHostTokenResponse>> {
    Ok(Json(s.hosts.refresh(&req.refresh_token).await?))
}

pub async fn heartbeat(
    State(s): State<AppState>,
    HostAuth(h): HostAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.hosts.heartbeat(&h, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn sandbox_event(
    State(s): State<AppState>,
    HostAuth(h): HostAuth,
    ApiJson(ev): ApiJson<SandboxEvent>,
) -> Result<StatusCode> {
    s.hosts.capsule_event(&h, ev).await?;
    Ok(StatusCode::NO_CONTENT)
}
