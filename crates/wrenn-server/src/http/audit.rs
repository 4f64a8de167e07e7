//! `/v1/audit-logs` (the session's team) and `/v1/admin/audit-logs` (every team).

use axum::extract::{RawQuery, State};
use axum::Json;
use wrenn_api::{ApiError, AuditLogPage};

use crate::audit::{PageParams, Reader};
use crate::error::HttpError;
use crate::http::auth::{AdminAuth, SessionAuth};
use crate::AppState;
use wrenn_api::Role;

pub async fn team(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<AuditLogPage>, HttpError> {
    let params = PageParams::parse(q.as_deref())?;
    let role = u.role.ok_or_else(|| {
        ApiError::forbidden("you are no longer a member of this session's team: switch team")
    })?;
    let reader = Reader::Team {
        team_id: u.team_id,
        elevated: role >= Role::Admin,
    };
    Ok(Json(s.audit.page(reader, params).await?))
}

pub async fn admin(
    State(s): State<AppState>,
    AdminAuth(_): AdminAuth,
    RawQuery(q): RawQuery,
) -> Result<Json<AuditLogPage>, HttpError> {
    let params = PageParams::parse(q.as_deref())?;
    Ok(Json(s.audit.page(Reader::Platform, params).await?))
}
