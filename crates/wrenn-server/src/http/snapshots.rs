//! `/v1/snapshots*` handlers: snapshot templates.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use wrenn_api::{ApiError, CreateSnapshotRequest};

use super::{ApiJson, ApiPath, ApiQuery};
use crate::error::HttpError;
use crate::http::auth::TeamAuth;
use crate::AppState;

#[derive(serde::Deserialize)]
pub struct CreateQuery {
    overwrite: Option<String>,
}

pub async fn create(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiQuery(q): ApiQuery<CreateQuery>,
    ApiJson(req): ApiJson<CreateSnapshotRequest>,
) -> Result<impl IntoResponse, HttpError> {
    let overwrite = match q.overwrite.as_deref() {
        None | Some("false") | Some("0") => false,
        Some("true") | Some("1") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "overwrite must be true or false, not {other:?}"
            ))
            .into())
        }
    };
    let t = s
        .capsules
        .create_snapshot(&auth.team_id, req, overwrite, &auth.actor.event())
        .await?;
    Ok((StatusCode::CREATED, Json(t)))
}

#[derive(serde::Deserialize)]
pub struct ListQuery {
    #[serde(rename = "type")]
    kind: Option<String>,
}

pub async fn list(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<impl IntoResponse, HttpError> {
    Ok(Json(
        s.capsules
            .list_templates(&auth.team_id, q.kind.as_deref())
            .await?,
    ))
}

pub async fn delete(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, HttpError> {
    s.capsules
        .delete_template(&auth.team_id, &name, &auth.actor.event())
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
