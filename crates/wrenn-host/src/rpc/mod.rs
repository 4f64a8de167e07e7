//! The control plane ↔ agent service: gRPC (tonic) over mutual TLS.
//!
//! The control plane calls the agent: the lifecycle calls are unary with JSON messages
//! ([`wire`]); everything that talks to a capsule's guest agent (exec, processes, files,
//! streams, terminals) goes through `Tunnel`, a bidirectional byte stream the agent connects to
//! that capsule's envd, so the control plane's [`crate::EnvdClient`] works unchanged across the
//! network. The agent's server certificate and the control plane's client certificate are both
//! signed by the platform CA; each side accepts only the other's.

pub mod client;
pub mod codec;
pub mod server;
pub mod wire;

#[allow(clippy::all, missing_docs)]
pub mod generated {
    include!(concat!(env!("OUT_DIR"), "/wrenn.agent.Agent.rs"));
}

use tonic::{Code, Status};

use crate::AgentError;
use wire::WireError;

/// Metadata key naming the capsule a tunnel is for.
pub const CAPSULE_ID_KEY: &str = "x-capsule-id";

/// PEM material for one side of the mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}

pub fn to_status(e: AgentError) -> Status {
    let (code, kind, exit_code) = match &e {
        AgentError::InvalidRequest(_) => (Code::InvalidArgument, "invalid_request", 0),
        AgentError::NotFound(_) => (Code::NotFound, "not_found", 0),
        AgentError::InvalidState(_) => (Code::FailedPrecondition, "invalid_state", 0),
        AgentError::CannotRun { exit_code, .. } => {
            (Code::FailedPrecondition, "cannot_run", *exit_code)
        }
        AgentError::AlreadyExists(_) => (Code::AlreadyExists, "already_exists", 0),
        AgentError::Conflict(_) => (Code::Aborted, "conflict", 0),
        AgentError::Vmm(_) => (Code::Internal, "vmm", 0),
        AgentError::Envd(_) => (Code::Unavailable, "envd", 0),
        _ => (Code::Internal, "internal", 0),
    };
    let message = match &e {
        AgentError::CannotRun { message, .. } => message.clone(),
        AgentError::Vmm(m) | AgentError::Envd(m) => m.clone(),
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

pub fn from_status(s: Status) -> AgentError {
    let Ok(w) = serde_json::from_str::<WireError>(s.message()) else {
        return AgentError::Unreachable(format!("{}: {}", s.code(), s.message()));
    };
    match w.kind.as_str() {
        "invalid_request" => AgentError::InvalidRequest(w.message),
        "not_found" => AgentError::NotFound(w.message),
        "invalid_state" => AgentError::InvalidState(w.message),
        "cannot_run" => AgentError::CannotRun {
            exit_code: w.exit_code,
            message: w.message,
        },
        "already_exists" => AgentError::AlreadyExists(w.message),
        "conflict" => AgentError::Conflict(w.message),
        "vmm" => AgentError::Vmm(w.message),
        "envd" => AgentError::Envd(w.message),
        _ => AgentError::Vmm(w.message),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_survive_the_wire() {
        for e in [
            AgentError::NotFound("capsule x".into()),
            AgentError::CannotRun {
                exit_code: 127,
                message: "no such program".into(),
            },
            AgentError::InvalidState("paused".into()),
        ] {
            let want = e.to_string();
            let back = from_status(to_status(e));
            assert_eq!(back.to_string(), want);
        }
        assert!(matches!(
            from_status(Status::unavailable("connection refused")),
            AgentError::Unreachable(_)
        ));
    }
}
