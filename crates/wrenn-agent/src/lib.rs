//! The Wrenn host agent: owns the VMs of one host.
//!
//! [`CapsuleManager`] is the entry point and this host's side of the [`wrenn_host::Host`]
//! boundary: it turns a [`wrenn_api::CapsuleSpec`] into a running VM (image → disk overlay →
//! network slot → VMM → envd ready) and tears every piece down again. Each piece lives in its
//! own module with one job:
//!
//! - `images`: kernel, initramfs and template root filesystems, built once and cached by recipe.
//! - `disk`: per-capsule copy-on-write overlays.
//! - [`net`]: network slots (netns + TAP + veth + NAT) and the host's firewall table.
//! - `egress`: a capsule's egress policy as its slot's firewall table.
//! - [`vmm`]: the VMM trait and its QEMU `microvm` driver, the KVM probe, QMP.
//! - `metrics`: the per-capsule sample rings.
//! - [`uplink`]: registration with a control plane, credentials, heartbeats.
//!
//! Guest operations (exec, files, terminals) go through the `envd-client` crate; the control
//! plane ↔ agent transport is in `wrenn-host`.

mod cgroup;
mod cmd;
mod config;
mod console;
mod disk;
mod egress;
mod error;
mod failpoint;
mod images;
mod manager;
mod metrics;
pub mod net;
mod oci;
pub mod uplink;
pub mod vmm;

pub use config::{AccelChoice, AgentConfig, DEFAULT_DISK_RESERVE_MB};
pub use manager::{CapsuleManager, AGENT_VERSION};
