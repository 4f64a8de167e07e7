//! [`HostError`]: what went wrong on a host. The control plane maps each variant to an API
//! error; across the gRPC transport it travels as JSON in the status message.

use envd_client::EnvdError;
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::{Code, Status};

#[derive(Debug, Error)]
pub enum HostError {
    /// The request names something wrong (bad cwd, unknown template, ...).
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The capsule exists but is not in a state that allows the operation.
    #[error("{0}")]
    InvalidState(String),
    /// The program could not be started; `exit_code` is what a shell would report (127/126).
    #[error("{message}")]
    CannotRun { exit_code: i32, message: String },
    /// The path (or other named thing) exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request clashes with what exists (e.g. a live process already has the tag).
    #[error("{0}")]
    Conflict(String),
    /// A host command (ip, nft, qemu-img, ...) failed.
    #[error("command `{command}` failed: {detail}")]
    Command { command: String, detail: String },
    /// The VM did not come up or died.
    #[error("vmm: {0}")]
    Vmm(String),
    /// envd could not be reached or answered nonsense.
    #[error("envd: {0}")]
    Envd(String),
    #[error("image build: {0}")]
    Image(String),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The host's disk is down to the free space it keeps (its reserve).
    #[error("{0}")]
    InsufficientStorage(String),
    /// The host could not be reached (a remote agent's connection failed).
    #[error("host unreachable: {0}")]
    Unreachable(String),
}

impl From<EnvdError> for HostError {
    fn from(e: EnvdError) -> Self {
        match e {
            EnvdError::InvalidRequest(m) => HostError::InvalidRequest(m),
            EnvdError::NotFound(m) => HostError::NotFound(m),
            EnvdError::Conflict(m) => HostError::Conflict(m),
            EnvdError::AlreadyExists(m) => HostError::AlreadyExists(m),
            EnvdError::CannotRun { exit_code, message } => {
                HostError::CannotRun { exit_code, message }
            }
            EnvdError::InvalidState(m) => HostError::InvalidState(m),
            EnvdError::Unavailable(m) => HostError::Envd(m),
            EnvdError::HostUnreachable(m) => HostError::Unreachable(m),
            EnvdError::Host(e) => match e.downcast::<HostError>() {
                Ok(h) => *h,
                Err(e) => HostError::Envd(e.to_string()),
            },
            EnvdError::Io(e) => HostError::Io(e),
        }
    }
}

impl From<HostError> for EnvdError {
    /// Why a connection to a guest could not be made through its host.
    fn from(e: HostError) -> Self {
        match e {
            HostError::InvalidRequest(m) => EnvdError::InvalidRequest(m),
            HostError::NotFound(m) => EnvdError::NotFound(m),
            HostError::InvalidState(m) => EnvdError::InvalidState(m),
            HostError::Unreachable(m) => EnvdError::HostUnreachable(m),
            HostError::Envd(m) => EnvdError::Unavailable(m),
            HostError::Io(e) => EnvdError::Io(e),
            other => EnvdError::Host(Box::new(other)),
        }
    }
}

/// A [`HostError`] as it crosses the wire (in the status message).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireError {
    kind: String,
    message: String,
    #[serde(default)]
    exit_code: i32,
}

impl From<HostError> for Status {
    fn from(e: HostError) -> Status {
        let (code, kind, exit_code) = match &e {
            HostError::InvalidRequest(_) => (Code::InvalidArgument, "invalid_request", 0),
            HostError::NotFound(_) => (Code::NotFound, "not_found", 0),
            HostError::InvalidState(_) => (Code::FailedPrecondition, "invalid_state", 0),
            HostError::CannotRun { exit_code, .. } => {
                (Code::FailedPrecondition, "cannot_run", *exit_code)
            }
            HostError::AlreadyExists(_) => (Code::AlreadyExists, "already_exists", 0),
            HostError::Conflict(_) => (Code::Aborted, "conflict", 0),
            HostError::Vmm(_) => (Code::Internal, "vmm", 0),
            HostError::Envd(_) => (Code::Unavailable, "envd", 0),
            HostError::InsufficientStorage(_) => {
                (Code::ResourceExhausted, "insufficient_storage", 0)
            }
            _ => (Code::Internal, "internal", 0),
        };
        let message = match &e {
            HostError::CannotRun { message, .. } => message.clone(),
            HostError::Vmm(m) | HostError::Envd(m) => m.clone(),
            other => other.to_string(),
        };
        let body = serde_json::to_string(&WireError {
            kind: kind.into(),
            message,
            exit_code,
        })
        .unwrap_or_default();
        Status::new(code, body)
    }
}

impl From<Status> for HostError {
    /// A status that is not one of ours (connection refused, TLS, ...) means the agent could
    /// not be reached.
    fn from(s: Status) -> HostError {
        let Ok(w) = serde_json::from_str::<WireError>(s.message()) else {
            return HostError::Unreachable(format!("{}: {}", s.code(), s.message()));
        };
        match w.kind.as_str() {
            "invalid_request" => HostError::InvalidRequest(w.message),
            "not_found" => HostError::NotFound(w.message),
            "invalid_state" => HostError::InvalidState(w.message),
            "cannot_run" => HostError::CannotRun {
                exit_code: w.exit_code,
                message: w.message,
            },
            "already_exists" => HostError::AlreadyExists(w.message),
            "conflict" => HostError::Conflict(w.message),
            "envd" => HostError::Envd(w.message),
            "insufficient_storage" => HostError::InsufficientStorage(w.message),
            _ => HostError::Vmm(w.message),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        for e in [
            HostError::NotFound("capsule x".into()),
            HostError::CannotRun {
                exit_code: 127,
                message: "no such program".into(),
            },
            HostError::InvalidState("paused".into()),
            HostError::Envd("connect refused".into()),
        ] {
            let want = e.to_string();
            let back = HostError::from(Status::from(e));
            assert_eq!(back.to_string(), want);
        }
        assert!(matches!(
            HostError::from(Status::unavailable("connection refused")),
            HostError::Unreachable(_)
        ));
    }

    #[test]
    fn a_failed_dial_keeps_its_meaning_for_the_caller() {
        let through = |e| HostError::from(EnvdError::from(e));
        assert!(matches!(
            through(HostError::Unreachable("tls".into())),
            HostError::Unreachable(_)
        ));
        assert!(matches!(
            through(HostError::InvalidState("paused".into())),
            HostError::InvalidState(_)
        ));
        let vmm = through(HostError::Vmm("gone".into()));
        assert!(matches!(vmm, HostError::Vmm(_)), "{vmm}");
        assert_eq!(vmm.to_string(), "vmm: gone");
    }
}
