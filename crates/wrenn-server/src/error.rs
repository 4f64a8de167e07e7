//! HTTP-layer error: an [`ApiError`] rendered as the spec's envelope with its status.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use wrenn_api::{ApiError, ErrorCode};

#[derive(Debug)]
pub struct HttpError(pub ApiError);

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status =
            StatusCode::from_u16(self.0.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::error!(code = self.0.code.as_str(), message = %self.0.message, "request failed");
        }
        (status, Json(self.0.body())).into_response()
    }
}

impl From<ApiError> for HttpError {
    fn from(e: ApiError) -> Self {
        HttpError(e)
    }
}

impl From<crate::store::StoreError> for HttpError {
    fn from(e: crate::store::StoreError) -> Self {
        HttpError(e.into())
    }
}

impl From<crate::store::StoreError> for ApiError {
    fn from(e: crate::store::StoreError) -> Self {
        tracing::error!(error = %e, "store error");
        ApiError::internal("internal storage error")
    }
}

/// Maps a host's errors to API errors.
pub fn from_host(e: wrenn_host::HostError) -> ApiError {
    use wrenn_host::HostError as H;
    match e {
        H::InvalidRequest(m) => ApiError::invalid(m),
        H::NotFound(m) => ApiError::not_found(m),
        H::InvalidState(m) => ApiError::invalid_state(m),
        H::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
        H::AlreadyExists(m) => ApiError::new(ErrorCode::AlreadyExists, m),
        H::CannotRun { message, .. } => ApiError::invalid(message),
        H::InsufficientStorage(m) => ApiError::new(ErrorCode::InsufficientStorage, m),
        H::Unreachable(m) => ApiError::new(
            ErrorCode::HostUnavailable,
            format!("the capsule's host cannot be reached: {m}"),
        ),
        other => ApiError::new(ErrorCode::AgentError, other.to_string()),
    }
}

/// Maps a guest agent's errors to API errors (the same way as the host's).
pub fn from_envd(e: envd_client::EnvdError) -> ApiError {
    from_host(e.into())
}
