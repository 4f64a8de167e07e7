//! `/v1/admin/users*` and `/v1/admin/teams*`: the platform admin surface. [`AdminAuth`] checks
//! the admin flag in the database on every request.

use axum::extract::{FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use wrenn_api::*;

use super::{ApiJson, ApiPath};
use crate::accounts::user_actor;
use crate::audit::Record;
use crate::error::HttpError;
use crate::http::auth::{Actor, AdminAuth, Grant, TeamAuth};
use crate::AppState;

type Result<T> = std::result::Result<T, HttpError>;

pub async fn users(State(s): State<AppState>, _: AdminAuth) -> Result<Json<Vec<AdminUser>>> {
    Ok(Json(s.accounts.admin_users().await?))
}

pub async fn set_active(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ActiveFlag>,
) -> Result<StatusCode> {
    s.accounts.admin_set_active(&u, &id, req.active).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn set_admin(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<AdminFlag>,
) -> Result<StatusCode> {
    s.accounts.admin_set_admin(&u, &id, req.admin).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn teams(State(s): State<AppState>, _: AdminAuth) -> Result<Json<Vec<AdminTeam>>> {
    Ok(Json(s.accounts.admin_teams().await?))
}

pub async fn delete_team(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.accounts.admin_delete_team(&u, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn set_byoc(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<ByocFlag>,
) -> Result<StatusCode> {
    s.accounts.admin_set_byoc(&u, &id, req.byoc).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `GET /v1/admin/teams/{id}/quota`: any team's limits and holdings.
pub async fn quota(
    State(s): State<AppState>,
    _: AdminAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<quota::TeamQuota>> {
    if s.store.team(&id).await?.is_none() {
        return Err(ApiError::not_found(format!("team {id} not found")).into());
    }
    Ok(Json(s.capsules.quota(&id).await?))
}

/// `PUT /v1/admin/teams/{id}/quota`: replaces the team's own limits (`null` or absent: the
/// platform default).
pub async fn set_quota(
    State(s): State<AppState>,
    AdminAuth(u): AdminAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<quota::QuotaOverrides>,
) -> Result<Json<quota::TeamQuota>> {
    let q = s.capsules.set_quota(&id, req).await?;
    s.audit
        .record(
            Record::new(&user_actor(&u), "team", &id, "set_quota")
                .team(Some(&id))
                .admin()
                .meta(
                    "quota",
                    serde_json::to_value(q.overrides).unwrap_or_default(),
                ),
        )
        .await;
    Ok(Json(q))
}

/// Scope of every `/v1/admin/capsules*` route: the caller must be a platform admin; the
/// request then acts for the capsule's own team (or, for create, the `team_id` query parameter
/// or the admin's session team), so the team routes' handlers serve it unchanged.
pub async fn capsule_scope(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let (mut parts, body) = req.into_parts();
    let admin = match AdminAuth::from_request_parts(&mut parts, &s).await {
        Ok(AdminAuth(u)) => u,
        Err(e) => return e.into_response(),
    };
    let path = parts.uri.path().to_string();
    let capsule_id = path
        .strip_prefix("/v1/admin/capsules/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| !id.is_empty());
    let team_id = match capsule_id {
        Some(id) => match s.store.capsule(id).await {
            Ok(Some(row)) => row.team_id,
            Ok(None) => {
                return HttpError(ApiError::not_found(format!("capsule {id} not found")))
                    .into_response()
            }
            Err(e) => return HttpError::from(e).into_response(),
        },
        None => {
            let q: Option<String> = parts.uri.query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == "team_id")
                    .map(|(_, v)| v.to_string())
            });
            match q {
                Some(t) => match s.store.team(&t).await {
                    Ok(Some(_)) => t,
                    Ok(None) => {
                        return HttpError(ApiError::not_found(format!("team {t} not found")))
                            .into_response()
                    }
                    Err(e) => return HttpError::from(e).into_response(),
                },
                None => admin.team_id.clone(),
            }
        }
    };
    let grant = Grant::session_of(&parts, true);
    parts.extensions.insert(TeamAuth {
        team_id,
        actor: Actor::User {
            id: admin.user_id,
            email: admin.email,
        },
        grant,
    });
    next.run(Request::from_parts(parts, body)).await
}

/// Create for any team: the team routes' create, answered 201 as the spec gives for admins.
pub async fn create_capsule(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiJson(req): ApiJson<CreateCapsuleRequest>,
) -> Result<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(
            s.capsules
                .create(&auth.team_id, req, &auth.actor.event())
                .await?,
        ),
    ))
}

pub async fn list_capsules(State(s): State<AppState>, _: AdminAuth) -> Result<Json<Vec<Capsule>>> {
    Ok(Json(s.capsules.list_all().await?))
}

#[derive(serde::Deserialize)]
pub struct SnapshotName {
    name: String,
}

pub async fn snapshot(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<SnapshotName>,
) -> Result<impl IntoResponse> {
    let req = CreateSnapshotRequest {
        sandbox_id: id,
        name: Some(req.name),
    };
    Ok((
        StatusCode::CREATED,
        Json(
            s.capsules
                .create_snapshot(&auth.team_id, req, false, &auth.actor.event())
                .await?,
        ),
    ))
}
