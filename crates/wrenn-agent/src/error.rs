//! The agent's error type; the control plane maps each variant to an API error.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum AgentError {
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
    /// The host could not be reached (a remote agent's connection failed).
    #[error("host unreachable: {0}")]
    Unreachable(String),
}

pub type Result<T> = std::result::Result<T, AgentError>;
