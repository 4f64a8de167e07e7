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

/// Maps the host agent's errors to API errors.
pub fn from_agent(e: wrenn_agent::AgentError) -> ApiError {
    use wrenn_agent::AgentError as A;
    match e {
        A::InvalidRequest(m) => ApiError::invalid(m),
        A::NotFound(m) => ApiError::not_found(m),
        A::InvalidState(m) => ApiError::invalid_state(m),
        A::Conflict(m) => ApiError::new(ErrorCode::Conflict, m),
        A::AlreadyExists(m) => ApiError::new(ErrorCode::AlreadyExists, m),
        A::CannotRun { message, .. } => ApiError::invalid(message),
        A::Unreachable(m) => ApiError::new(
            ErrorCode::HostUnavailable,
            format!("the capsule's host cannot be reached: {m}"),
        ),
        other => ApiError::new(ErrorCode::AgentError, other.to_string()),
    }
}
