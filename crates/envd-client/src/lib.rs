//! The host side of the envd protocol (see the `envd-proto` crate): everything the platform
//! asks of a capsule's guest agent — exec and exec streams, background processes, terminals,
//! files, health, and the post-restore fix-up.
//!
//! One [`EnvdClient`] per capsule; each operation opens its own connection. On the capsule's
//! own host that is TCP through the capsule's network slot, with the serial lifeline as a
//! fallback that repairs the guest network; elsewhere it is a byte stream some other way
//! ([`EnvdDial`]: the control plane tunnels through the capsule's host agent). Either way the
//! bytes and the rules are the same.
//!
//! Invariants:
//! - Every call has a deadline: connects, one-answer requests, and a foreground exec (its own
//!   timeout plus a grace period). Streams (exec, attach, terminals, file transfers) are bounded
//!   by their consumer instead, and fail at once when the capsule's VM stops
//!   ([`EnvdClient::with_cancellation`]).
//! - A foreground exec keeps at most [`MAX_CAPTURE_BYTES`] per stream; the rest is counted.

mod client;
mod conn;
mod error;
mod exec;
mod files;
mod lifeline;
mod pty;

pub use client::{EnvdClient, EnvdDial, EnvdHealth, StartedProcess};
pub use conn::{EnvdConn, EnvdStream};
pub use error::{EnvdError, Result};
pub use exec::{ExecEvent, ExecOutput, ExecStream, MAX_CAPTURE_BYTES};
pub use files::{FileReader, FileWriter};
pub use pty::{PtyEvent, PtySession};

/// The protocol types that appear in this crate's API.
pub use envd_proto::{
    CommandSpec, ExecSpec, FileEntry, ProcessInfo, PtySpec, Signal, StartSpec, TemplateDefaults,
    ENVD_PORT, MAX_TEMPLATE_DEFAULTS_BYTES, TEMPLATE_DEFAULTS_PATH,
};
