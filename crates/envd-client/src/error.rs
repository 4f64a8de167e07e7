//! What can go wrong talking to a guest agent.

use envd_proto::ErrorKind;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EnvdError {
    /// The request names something wrong (bad cwd, bad path, ...).
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with what exists (e.g. a live process already has the tag).
    #[error("{0}")]
    Conflict(String),
    /// The path (or other named thing) exists already.
    #[error("{0}")]
    AlreadyExists(String),
    /// The program could not be started; `exit_code` is what a shell would report (127/126).
    #[error("{message}")]
    CannotRun { exit_code: i32, message: String },
    /// The capsule is not in a state in which its guest can be reached (through a remote
    /// host: it is paused, or gone from that host).
    #[error("{0}")]
    InvalidState(String),
    /// envd could not be reached, or answered nonsense.
    #[error("envd: {0}")]
    Unavailable(String),
    /// The host carrying the connection could not be reached.
    #[error("host unreachable: {0}")]
    HostUnreachable(String),
    /// The host carrying the connection failed to make it (its own error, kept whole).
    #[error("{0}")]
    Host(Box<dyn std::error::Error + Send + Sync>),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, EnvdError>;

impl EnvdError {
    /// An error envd reported in an `Error` response.
    pub(crate) fn reported(kind: ErrorKind, message: String) -> Self {
        match kind {
            ErrorKind::InvalidRequest => EnvdError::InvalidRequest(message),
            ErrorKind::NotFound => EnvdError::NotFound(message),
            ErrorKind::Conflict => EnvdError::Conflict(message),
            ErrorKind::AlreadyExists => EnvdError::AlreadyExists(message),
            ErrorKind::CommandNotFound => EnvdError::CannotRun {
                exit_code: 127,
                message,
            },
            ErrorKind::NotExecutable => EnvdError::CannotRun {
                exit_code: 126,
                message,
            },
            ErrorKind::Internal => EnvdError::Unavailable(message),
            ErrorKind::Unauthorized => {
                EnvdError::Unavailable(format!("envd refused the connection: {message}"))
            }
        }
    }

    pub(crate) fn unexpected(what: &str, answer: impl std::fmt::Debug) -> Self {
        EnvdError::Unavailable(format!("unexpected answer to {what}: {answer:?}"))
    }
}

impl From<envd_proto::ProtoError> for EnvdError {
    fn from(e: envd_proto::ProtoError) -> Self {
        EnvdError::Unavailable(e.to_string())
    }
}
