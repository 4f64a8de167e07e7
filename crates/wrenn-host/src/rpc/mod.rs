//! The gRPC transport of the [`crate::Host`] boundary (tonic over mutual TLS).
//!
//! The control plane calls the agent. `Call` carries one host operation as JSON and answers
//! with its result (an error as JSON in the status message); `Tunnel` is a bidirectional byte
//! stream the agent connects to one capsule's envd, so the control plane's `EnvdClient` works
//! unchanged across the network. `ReadFile` and `WriteFile` stream one file of a snapshot out
//! of and into an agent, so the control plane can copy a template between hosts. The agent's
//! server certificate and the control plane's client certificate are both signed by the
//! platform CA; each side accepts only the other's. An agent's certificate names its host id
//! ([`host_cert_name`]) and the control plane checks that name, not the address: an agent
//! cannot answer for another host, even from that host's address.

mod client;
pub(crate) mod codec;
mod server;

#[allow(clippy::all, missing_docs)]
pub(crate) mod generated {
    include!(concat!(env!("OUT_DIR"), "/wrenn.host.Agent.rs"));
}

pub use client::RemoteHost;
pub use server::serve;

/// The DNS name an agent's certificate carries for host `host_id` (a subject alternative
/// name beside its IP address), and the name the control plane requires when it connects.
pub fn host_cert_name(host_id: &str) -> String {
    format!("{host_id}.hosts.wrenn.internal")
}

/// Metadata key naming the capsule a tunnel is for.
const CAPSULE_ID_KEY: &str = "x-capsule-id";
/// Metadata key holding the JSON arguments of `ReadFile` and `WriteFile`.
const ARGS_KEY: &str = "x-args";

/// `ReadFile`'s arguments.
#[derive(serde::Serialize, serde::Deserialize)]
struct ReadFileArgs {
    snapshot_id: String,
    file: String,
}

/// `WriteFile`'s arguments.
#[derive(serde::Serialize, serde::Deserialize)]
struct WriteFileArgs {
    transfer: String,
    digest: crate::FileDigest,
}

/// PEM material for one side of the mutual TLS.
#[derive(Debug, Clone)]
pub struct TlsMaterial {
    pub ca_cert: String,
    pub cert: String,
    pub key: String,
}
