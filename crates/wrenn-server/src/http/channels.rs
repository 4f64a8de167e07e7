//! `/v1/channels*`: a team's notification channels (session-authenticated).

use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use wrenn_api::*;

use super::{ApiJson, ApiPath};
use crate::error::HttpError;
use crate::http::auth::SessionAuth;
use crate::AppState;

type Result<T> = std::result::Result<T, HttpError>;

pub async fn create(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<CreateChannelRequest>,
) -> Result<impl IntoResponse> {
    Ok((StatusCode::CREATED, Json(s.channels.create(&u, req).await?)))
}

pub async fn list(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Json<Vec<ChannelResponse>>> {
    Ok(Json(s.channels.list(&u).await?))
}

pub async fn get(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ChannelResponse>> {
    Ok(Json(s.channels.get(&u, &id).await?))
}

pub async fn update(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<UpdateChannelRequest>,
) -> Result<Json<ChannelResponse>> {
    Ok(Json(s.channels.update(&u, &id, req).await?))
}

pub async fn rotate(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<RotateConfigRequest>,
) -> Result<Json<ChannelResponse>> {
    Ok(Json(s.channels.rotate(&u, &id, req).await?))
}

pub async fn delete(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.channels.delete(&u, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn test(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<TestChannelRequest>,
) -> Result<Json<serde_json::Value>> {
    s.channels.test(&u, req).await?;
    Ok(Json(serde_json::json!({ "status": "ok" })))
}

/// `GET /v1/channels/{id}/deliveries?limit=` (extension): the latest deliveries and how they
/// ended.
pub async fn deliveries(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    RawQuery(q): RawQuery,
) -> Result<Json<Vec<ChannelDelivery>>> {
    let mut limit = 50;
    for (k, v) in form_urlencoded::parse(q.unwrap_or_default().as_bytes()) {
        if k == "limit" {
            limit = v
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=200).contains(n))
                .ok_or_else(|| {
                    HttpError(ApiError::invalid(format!(
                        "limit must be an integer from 1 to 200, got {v:?}"
                    )))
                })?;
        }
    }
    Ok(Json(s.channels.deliveries(&u, &id, limit).await?))
}
