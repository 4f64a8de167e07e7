//! The boundary between the control plane and the hosts that run capsules, written once.
//!
//! - [`Host`]: every operation the control plane asks of a host (lifecycle, snapshots,
//!   metrics, capacity) plus an envd connection for everything inside a guest. The agent's
//!   `CapsuleManager` implements it in its own process; [`RemoteHost`] implements it for an
//!   agent on another machine.
//! - [`HostError`]: what went wrong, the same on both sides of the network.
//! - [`serve`] and [`RemoteHost`]: the gRPC transport (tonic, mutual TLS). Its service has four
//!   methods whatever the number of operations: `Call` (any operation, as JSON), `Tunnel`
//!   (the bytes of one envd connection), and `ReadFile`/`WriteFile` (one file of a snapshot
//!   copied between hosts).
//!
//! Adding a host operation: one line in `operations.rs`, its body in the agent's manager.

mod error;
mod operations;
mod rpc;
#[cfg(feature = "testing")]
pub mod testing;
mod types;

pub use error::HostError;
pub use operations::Host;
pub use rpc::{host_cert_name, serve, RemoteHost, TlsMaterial};
pub use types::*;
