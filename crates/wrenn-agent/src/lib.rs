//! The Wrenn host agent: owns the VMs of one host.
//!
//! [`CapsuleManager`] is the entry point: it turns a [`wrenn_api::CapsuleSpec`] into a running VM
//! (image → disk overlay → network slot → VMM → envd ready) and tears every piece down again.
//! Each piece lives in its own module with one job:
//!
//! - [`images`]: kernel, initramfs and template root filesystems, built once and cached by recipe.
//! - [`disk`]: per-capsule copy-on-write overlays.
//! - [`net`]: network slots (netns + TAP + veth + NAT) and the host's firewall table.
//! - [`vmm`]: the VMM trait and its QEMU `microvm` driver, the KVM probe, QMP.
//! - [`envd_client`]: the host side of the envd protocol; [`lifeline`]: the serial fallback.
//! - [`rpc`]: the control plane ↔ agent service (gRPC over mutual TLS), both ends.

pub mod cmd;
pub mod config;
pub mod disk;
pub mod envd_client;
pub mod envd_conn;
pub mod error;
pub mod images;
pub mod lifeline;
pub mod manager;
pub mod metrics;
pub mod net;
pub mod rpc;
pub mod vmm;

pub use config::AgentConfig;
pub use envd_client::{EnvdClient, FileReader, FileWriter, PtyEvent, PtySession};
pub use error::AgentError;
pub use manager::{
    CapsuleInfo, CapsuleManager, ExecEvent, ExecOutput, ExecStream, HostCapacity, Phase,
    SnapshotMeta, StartedProcess, UserSnapshot,
};
