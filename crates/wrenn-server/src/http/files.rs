//! `/v1/capsules/{id}/files/*`: list, mkdir, remove, and reads and writes streamed end to end.
//!
//! File bytes never sit whole in this process: a read is forwarded chunk by chunk from envd to
//! the HTTP body, an upload chunk by chunk from the multipart body to envd. The non-streaming
//! `write` differs from `stream/write` only in its size limit (answered 413 `too_large`).

use axum::body::{Body, Bytes};
use axum::extract::multipart::{Multipart, MultipartRejection};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use envd_client::FileReader;
use serde::Deserialize;
use serde_json::json;
use wrenn_api::{ApiError, ErrorCode};

use super::{ApiJson, ApiPath};
use crate::capsules::Busy;
use crate::error::{from_envd, HttpError};
use crate::http::auth::TeamAuth;
use crate::AppState;

/// Largest upload through the non-streaming `files/write` (the reference platform's cap).
pub const MAX_SIMPLE_UPLOAD: u64 = 100 * 1024 * 1024;
/// Upload bytes are sent to envd in frames of about this size: under emulation each frame
/// costs envd a file write through its blocking pool, far more than copying the bytes here.
const UPLOAD_FRAME: usize = 512 * 1024;
/// Deepest recursive listing.
const MAX_DEPTH: i64 = 64;

#[derive(Deserialize)]
pub struct PathBody {
    path: String,
}

#[derive(Deserialize)]
pub struct ListBody {
    path: String,
    depth: Option<i64>,
}

fn absolute(path: &str) -> Result<(), HttpError> {
    if path.starts_with('/') && !path.contains('\0') {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "path must be an absolute path inside the capsule, got {path:?}"
        ))
        .into())
    }
}

pub async fn list(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ListBody>,
) -> Result<impl IntoResponse, HttpError> {
    absolute(&body.path)?;
    let depth = body.depth.unwrap_or(1);
    if !(0..=MAX_DEPTH).contains(&depth) {
        return Err(ApiError::invalid(format!("depth must be between 0 and {MAX_DEPTH}")).into());
    }
    let envd = s.capsules.files(&auth.team_id, &id).await?;
    let entries = envd
        .list_dir(&body.path, depth as u32)
        .await
        .map_err(from_envd)?;
    Ok(Json(json!({ "entries": entries })))
}

pub async fn mkdir(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> Result<impl IntoResponse, HttpError> {
    absolute(&body.path)?;
    let envd = s.capsules.files(&auth.team_id, &id).await?;
    let entry = envd.make_dir(&body.path).await.map_err(from_envd)?;
    Ok(Json(json!({ "entry": entry })))
}

pub async fn remove(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> Result<impl IntoResponse, HttpError> {
    absolute(&body.path)?;
    let envd = s.capsules.files(&auth.team_id, &id).await?;
    envd.remove(&body.path).await.map_err(from_envd)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Both `read` and `stream/read`: the body is streamed either way.
pub async fn read(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<PathBody>,
) -> Result<Response, HttpError> {
    absolute(&body.path)?;
    let envd = s.capsules.files(&auth.team_id, &id).await?;
    // Opening first means "not found" and friends are still JSON errors, before any byte.
    let reader = envd.read_file(&body.path).await.map_err(from_envd)?;
    // The capsule is in use until the last byte has left (or the client went away).
    let busy = s.capsules.hold(&id);
    let chunks = futures_util::stream::unfold(
        Some((reader, busy)),
        |state: Option<(FileReader, Busy)>| async move {
            let (mut r, busy) = state?;
            match r.next_chunk().await {
                Ok(Some(b)) => Some((Ok(Bytes::from(b)), Some((r, busy)))),
                Ok(None) => None,
                // The status is sent already: all that is left is to cut the body short.
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        },
    );
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(chunks),
    )
        .into_response())
}

pub async fn write(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<StatusCode, HttpError> {
    upload(s, auth, id, multipart, Some(MAX_SIMPLE_UPLOAD)).await
}

pub async fn stream_write(
    State(s): State<AppState>,
    auth: TeamAuth,
    ApiPath(id): ApiPath<String>,
    multipart: Result<Multipart, MultipartRejection>,
) -> Result<StatusCode, HttpError> {
    upload(s, auth, id, multipart, None).await
}

async fn upload(
    s: AppState,
    auth: TeamAuth,
    id: String,
    multipart: Result<Multipart, MultipartRejection>,
    limit: Option<u64>,
) -> Result<StatusCode, HttpError> {
    let bad = |e: &dyn std::fmt::Display| {
        HttpError(ApiError::invalid(format!("invalid multipart body: {e}")))
    };
    let envd = s.capsules.files(&auth.team_id, &id).await?;
    let _busy = s.capsules.hold(&id);
    let mut multipart = multipart.map_err(|e| bad(&e))?;
    let mut path = None;
    while let Some(mut field) = multipart.next_field().await.map_err(|e| bad(&e))? {
        match field.name() {
            Some("path") => path = Some(field.text().await.map_err(|e| bad(&e))?),
            Some("file") => {
                let Some(path) = path.take() else {
                    return Err(ApiError::invalid("send the path part before the file part").into());
                };
                absolute(&path)?;
                let mut writer = envd.write_file(&path).await.map_err(from_envd)?;
                let mut total = 0u64;
                let mut pending: Vec<u8> = Vec::with_capacity(UPLOAD_FRAME);
                while let Some(chunk) = field.chunk().await.map_err(|e| bad(&e))? {
                    total += chunk.len() as u64;
                    if limit.is_some_and(|l| total > l) {
                        writer.abort().await;
                        return Err(ApiError::new(
                            ErrorCode::TooLarge,
                            format!(
                                "file is larger than {} MiB; use /files/stream/write for large files",
                                MAX_SIMPLE_UPLOAD >> 20
                            ),
                        )
                        .into());
                    }
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= UPLOAD_FRAME {
                        writer.send(&pending).await.map_err(from_envd)?;
                        pending.clear();
                    }
                }
                writer.send(&pending).await.map_err(from_envd)?;
                writer.finish().await.map_err(from_envd)?;
                return Ok(StatusCode::NO_CONTENT);
            }
            _ => {} // other parts are ignored
        }
    }
    Err(ApiError::invalid("the multipart body needs a path part and a file part").into())
}
