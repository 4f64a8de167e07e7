//! The error envelope every failing request answers with: `{"error":{"code","message"}}`.

use serde::{Deserialize, Serialize};

/// The machine-readable error codes of the platform, each tied to one HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    InvalidState,
    Conflict,
    AlreadyExists,
    TooLarge,
    Internal,
    AgentError,
    HostUnavailable,
    NoHostsAvailable,
    /// The template is being built (503 until it is ready).
    TemplateBuilding,
    NotImplemented,
    InvalidToken,
    AlreadyActivated,
    LastLoginMethod,
    WrongPassword,
    AccountDeactivated,
    ProviderNotFound,
    EmailTaken,
    SignupCooldown,
    OwnsTeamWithMembers,
    RateLimited,
    DeliveryFailed,
    /// The port proxy found nothing listening on the port in the capsule (502).
    PortNotListening,
    /// The host's disk is down to the free space it keeps (507).
    InsufficientStorage,
    /// A team quota would be passed (403; the message names the limit).
    QuotaExceeded,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::Conflict => "conflict",
            ErrorCode::AlreadyExists => "already_exists",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Internal => "internal_error",
            ErrorCode::AgentError => "agent_error",
            ErrorCode::HostUnavailable => "host_unavailable",
            ErrorCode::NoHostsAvailable => "no_hosts_available",
            ErrorCode::TemplateBuilding => "template_building",
            ErrorCode::NotImplemented => "not_implemented",
            ErrorCode::InvalidToken => "invalid_token",
            ErrorCode::AlreadyActivated => "already_activated",
            ErrorCode::LastLoginMethod => "last_login_method",
            ErrorCode::WrongPassword => "wrong_password",
            ErrorCode::AccountDeactivated => "account_deactivated",
            ErrorCode::ProviderNotFound => "provider_not_found",
            ErrorCode::EmailTaken => "email_taken",
            ErrorCode::SignupCooldown => "signup_cooldown",
            ErrorCode::OwnsTeamWithMembers => "owns_team_with_members",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::DeliveryFailed => "delivery_failed",
            ErrorCode::PortNotListening => "port_not_listening",
            ErrorCode::InsufficientStorage => "insufficient_storage",
            ErrorCode::QuotaExceeded => "quota_exceeded",
        }
    }

    /// The HTTP status this code is answered with.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::InvalidToken
            | ErrorCode::AlreadyActivated
            | ErrorCode::LastLoginMethod
            | ErrorCode::DeliveryFailed => 400,
            ErrorCode::Unauthorized | ErrorCode::WrongPassword => 401,
            ErrorCode::Forbidden | ErrorCode::AccountDeactivated | ErrorCode::QuotaExceeded => 403,
            ErrorCode::NotFound | ErrorCode::ProviderNotFound => 404,
            ErrorCode::InvalidState
            | ErrorCode::Conflict
            | ErrorCode::AlreadyExists
            | ErrorCode::EmailTaken
            | ErrorCode::SignupCooldown
            | ErrorCode::OwnsTeamWithMembers => 409,
            ErrorCode::RateLimited => 429,
            ErrorCode::TooLarge => 413,
            ErrorCode::Internal => 500,
            ErrorCode::NotImplemented => 501,
            ErrorCode::AgentError | ErrorCode::PortNotListening => 502,
            ErrorCode::HostUnavailable
            | ErrorCode::NoHostsAvailable
            | ErrorCode::TemplateBuilding => 503,
            ErrorCode::InsufficientStorage => 507,
        }
    }
}

/// An API error: a code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }
    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidState, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unauthorized, message)
    }
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Forbidden, message)
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code.as_str().to_string(),
                message: self.message.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ApiError {}

/// The JSON shape of an error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_serializes_to_spec_envelope() {
        let e = ApiError::not_found("capsule cl-x not found");
        let v = serde_json::to_value(e.body()).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error":{"code":"not_found","message":"capsule cl-x not found"}})
        );
        assert_eq!(ErrorCode::InvalidState.status(), 409);
    }
}
