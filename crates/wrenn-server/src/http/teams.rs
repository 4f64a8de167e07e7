//! `/v1/teams*`, `/v1/api-keys*` and `/v1/users/search`: session-authenticated team management.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use wrenn_api::*;

use super::{ApiJson, ApiPath, ApiQuery};
use crate::error::HttpError;
use crate::http::auth::SessionAuth;
use crate::AppState;

type Result<T> = std::result::Result<T, HttpError>;

pub async fn create_key(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<CreateApiKeyRequest>,
) -> Result<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(s.accounts.create_api_key(&u, req).await?),
    ))
}

pub async fn list_keys(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Json<Vec<ApiKeyResponse>>> {
    Ok(Json(s.accounts.list_api_keys(&u).await?))
}

pub async fn delete_key(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.accounts.delete_api_key(&u, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct SearchQuery {
    email: Option<String>,
}

pub async fn search_users(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiQuery(q): ApiQuery<SearchQuery>,
) -> Result<Json<Vec<UserSearchResult>>> {
    let email = q
        .email
        .ok_or_else(|| ApiError::invalid("query parameter email is required"))?;
    Ok(Json(s.accounts.search_users(&u, &email).await?))
}

pub async fn list(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Json<Vec<TeamWithRole>>> {
    Ok(Json(s.accounts.list_teams(&u).await?))
}

pub async fn create(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<NameRequest>,
) -> Result<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(s.accounts.create_team(&u, &req.name).await?),
    ))
}

pub async fn get(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<TeamDetail>> {
    Ok(Json(s.accounts.get_team(&u, &id).await?))
}

pub async fn rename(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<NameRequest>,
) -> Result<StatusCode> {
    s.accounts.rename_team(&u, &id, &req.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.accounts.delete_team(&u, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn members(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<Vec<TeamMember>>> {
    Ok(Json(s.accounts.team_members(&u, &id).await?))
}

pub async fn add_member(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AddMemberRequest>,
) -> Result<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(s.accounts.add_member(&u, &id, &req.email).await?),
    ))
}

pub async fn set_role(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath((id, uid)): ApiPath<(String, String)>,
    ApiJson(req): ApiJson<RoleRequest>,
) -> Result<StatusCode> {
    s.accounts.set_member_role(&u, &id, &uid, &req.role).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn remove_member(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath((id, uid)): ApiPath<(String, String)>,
) -> Result<StatusCode> {
    s.accounts.remove_member(&u, &id, &uid).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn leave(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.accounts.leave_team(&u, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/teams/{id}/quota`: the team's limits and holdings, for its members.
pub async fn quota(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<quota::TeamQuota>> {
    s.accounts.check_member(&u, &id).await?;
    Ok(Json(s.capsules.quota(&id).await?))
}
