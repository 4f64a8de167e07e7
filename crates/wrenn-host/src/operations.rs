//! The host operations, written once.
//!
//! [`host_operations!`] takes the list of operations and generates from it:
//! - the [`Host`] trait (each operation as an async method, plus [`Host::envd`]);
//! - [`Call`], one operation with its arguments as it crosses the wire (JSON, tagged `op`);
//! - [`Call::run`], which performs a call on any `Host` (the gRPC server's whole dispatch);
//! - `impl Host` for the hosts that answer `Call`s as such: [`RemoteHost`], which sends each
//!   to a remote agent (the gRPC client), and the test double `testing::FakeHost`.
//!
//! So a new host operation is one line in the list below plus its implementation in the
//! agent's `CapsuleManager`; the transport and the test double need nothing.

use envd_client::EnvdClient;
use serde::{Deserialize, Serialize};
use wrenn_api::{CapsuleSpec, MetricPoint, MetricsRange, NetworkPolicy};

use crate::error::HostError;
use crate::rpc::RemoteHost;
use crate::types::*;

/// What a host answers at once: lists, capacity, metrics, lookups.
pub const QUERY_DEADLINE: std::time::Duration = std::time::Duration::from_secs(15);
/// What moves a VM or its files: create (a template snapshot may be made first), pause and
/// resume (a whole memory state written or read), snapshots, installs of copied snapshots.
pub const OPERATION_DEADLINE: std::time::Duration = std::time::Duration::from_secs(600);
/// An OCI image import (the agent ends its own pull after 30 minutes).
pub const IMPORT_DEADLINE: std::time::Duration = std::time::Duration::from_secs(35 * 60);

macro_rules! host_operations {
    ($(
        $(#[$doc:meta])*
        fn $name:ident($($arg:ident : $ty:ty),* $(,)?) -> $ret:ty;
    )*) => {
        /// A host of capsules: the agent's `CapsuleManager` on its own machine, or a
        /// [`RemoteHost`] reached over gRPC. Every operation is idempotent or says why not.
        #[async_trait::async_trait]
        pub trait Host: Send + Sync {
            $(
                $(#[$doc])*
                async fn $name(&self, $($arg: $ty),*) -> Result<$ret, HostError>;
            )*

            /// A client for the guest agent of running capsule `id` (exec, processes,
            /// terminals, files): TCP through the capsule's network slot on its own host, a
            /// tunnel through the agent from anywhere else.
            async fn envd(&self, id: &str) -> Result<EnvdClient, HostError>;

            /// The bytes of file `file` (`state` or `disk.qcow2`) of snapshot `snapshot_id`
            /// held on this host: the source of a copy to another host.
            async fn read_snapshot_file(
                &self,
                snapshot_id: &str,
                file: &str,
            ) -> Result<ByteStream, HostError>;

            /// Receives one file of snapshot copy `transfer` (see [`Host::install_snapshot`]);
            /// kept only when it matches `digest`, otherwise nothing of it stays.
            async fn write_snapshot_file(
                &self,
                transfer: &str,
                digest: &FileDigest,
                body: ByteStream,
            ) -> Result<(), HostError>;
        }

        /// One host operation with its arguments, as it crosses the wire.
        #[derive(Debug, Serialize, Deserialize)]
        #[serde(tag = "op", rename_all = "snake_case")]
        #[allow(non_camel_case_types)]
        pub enum Call {
            $( $name { $($arg: $ty),* }, )*
        }

        impl Call {
            /// How long a host may take to answer this call before the caller gives up on it
            /// (see [`QUERY_DEADLINE`] and the others).
            pub fn deadline(&self) -> std::time::Duration {
                match self.name() {
                    "templates" | "base_templates" | "capacity" | "list" | "reap_dead"
                    | "metrics" | "machine" | "shape_snapshots" | "holds_snapshot"
                    | "snapshot_manifest" => QUERY_DEADLINE,
                    "import_image" => IMPORT_DEADLINE,
                    _ => OPERATION_DEADLINE,
                }
            }

            /// The operation's name (for logs).
            pub fn name(&self) -> &'static str {
                match self {
                    $( Call::$name { .. } => stringify!($name), )*
                }
            }

            /// Performs the call on `host`; its answer as JSON.
            pub async fn run(self, host: &dyn Host) -> Result<serde_json::Value, HostError> {
                match self {
                    $( Call::$name { $($arg),* } => answer(host.$name($($arg),*).await?), )*
                }
            }
        }

        /// Hosts that answer [`Call`]s ([`RemoteHost`] sends them to an agent; the test
        /// double answers them in memory) are `Host`s without a line per operation. Every call
        /// has a deadline (`deadline_for`, by default [`Call::deadline`]): a host that does not
        /// answer in time is unreachable for that call, so a silent host holds up only the
        /// request that asked it.
        macro_rules! host_by_dispatch {
            ($t:ty) => {
                #[async_trait::async_trait]
                impl Host for $t {
                    $(
                        async fn $name(&self, $($arg: $ty),*) -> Result<$ret, HostError> {
                            let call = Call::$name { $($arg),* };
                            let limit = self.deadline_for(&call);
                            match tokio::time::timeout(limit, self.dispatch(call)).await {
                                Ok(answer) => decode(answer?),
                                Err(_) => Err(HostError::Unreachable(format!(
                                    "the host did not answer {} within {limit:?}",
                                    stringify!($name)
                                ))),
                            }
                        }
                    )*

                    async fn envd(&self, id: &str) -> Result<EnvdClient, HostError> {
                        self.dial_envd(id)
                    }

                    async fn read_snapshot_file(
                        &self,
                        snapshot_id: &str,
                        file: &str,
                    ) -> Result<ByteStream, HostError> {
                        self.read_file(snapshot_id, file).await
                    }

                    async fn write_snapshot_file(
                        &self,
                        transfer: &str,
                        digest: &FileDigest,
                        body: ByteStream,
                    ) -> Result<(), HostError> {
                        self.write_file(transfer, digest, body).await
                    }
                }
            };
        }

        host_by_dispatch!(RemoteHost);
        #[cfg(feature = "testing")]
        host_by_dispatch!(crate::testing::FakeHost);
    };
}

host_operations! {
    /// Templates this host can boot (their names).
    fn templates() -> Vec<String>;
    /// Templates this host can boot, with the size of their root filesystem image and when it
    /// was built.
    fn base_templates() -> Vec<BaseTemplate>;
    /// The most one capsule can have on this host.
    fn capacity() -> HostCapacity;
    /// Every capsule this host holds, running or paused.
    fn list() -> Vec<CapsuleInfo>;
    /// Running capsules whose VM died since the last call, with the reason (each already
    /// cleaned up on the host).
    fn reap_dead() -> Vec<DeadCapsule>;
    /// Boots a capsule from a template, or restores it from a user snapshot (`from`), and
    /// returns once its envd answers. On failure nothing is left behind.
    fn create(id: String, spec: CapsuleSpec, from: Option<UserSnapshot>) -> CapsuleInfo;
    /// Destroys a capsule and everything it holds; `false` when it did not exist.
    fn destroy(id: String) -> bool;
    /// Saves a running capsule to files and frees its VM. On error it runs on, or was
    /// destroyed (see [`Host::list`]).
    fn pause(id: String) -> ();
    /// Restores a paused capsule; on error it stays paused.
    fn resume(id: String) -> CapsuleInfo;
    /// Replaces a capsule's egress policy: in its slot's firewall at once while it runs, in
    /// the record it resumes from while it is paused.
    fn set_network(id: String, policy: NetworkPolicy) -> ();
    /// A live snapshot of a running capsule, stored on this host as `snapshot_id`.
    fn snapshot(id: String, snapshot_id: String) -> SnapshotMeta;
    /// Deletes a user snapshot (idempotent); files in use by capsules stay until those are
    /// gone.
    fn delete_snapshot(snapshot_id: String) -> ();
    /// Metric points of a capsule (running ones live, paused ones as saved at pause).
    fn metrics(id: String, range: MetricsRange) -> Vec<MetricPoint>;
    /// Keeps user snapshot `snapshot_id` in this host's template cache under `key` (a digest
    /// of what made it), so a later control plane can adopt it instead of building it again.
    /// The host adds what it boots with (kernel, envd, VMM, base images) to the key.
    fn cache_template(snapshot_id: String, key: String) -> ();
    /// Links the template cached under `key`, if this host has one, in as user snapshot
    /// `snapshot_id`.
    fn adopt_template(key: String, snapshot_id: String) -> Option<SnapshotMeta>;
    /// Pulls OCI image `reference` and makes it a disk of `disk_mb` MiB stored as user snapshot
    /// `snapshot_id` (boot it with `disk_only`). Its user, environment and working directory
    /// become the defaults of commands in capsules booted from it.
    fn import_image(
        reference: String,
        credentials: Option<RegistryCredentials>,
        snapshot_id: String,
        disk_mb: u64,
    ) -> ImportedImage;
    /// Whether this host holds snapshot `snapshot_id` (not deleted).
    fn holds_snapshot(snapshot_id: String) -> bool;
    /// The files of snapshot `snapshot_id` with their digests, for a copy to another host.
    fn snapshot_manifest(snapshot_id: String) -> SnapshotManifest;
    /// Makes the files received for `transfer` ([`Host::write_snapshot_file`]) snapshot
    /// `manifest.meta.id` on this host, once every file of the manifest has arrived intact; a
    /// memory snapshot only when it was made under this host's machine. Holding it already is
    /// success (the transfer's files are dropped).
    fn install_snapshot(transfer: String, manifest: SnapshotManifest) -> SnapshotMeta;
    /// Drops what transfer `transfer` received so far (a copy that failed).
    fn abort_transfer(transfer: String) -> ();
    /// The machine a memory snapshot must have been saved under to restore here.
    fn machine() -> String;
    /// The per-shape template snapshots this host holds (disk use, users, last use).
    fn shape_snapshots() -> Vec<ShapeSnapshot>;
}

fn answer<T: Serialize>(t: T) -> Result<serde_json::Value, HostError> {
    serde_json::to_value(t).map_err(|e| HostError::Vmm(format!("unencodable answer: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(answer: serde_json::Value) -> Result<T, HostError> {
    serde_json::from_value(answer)
        .map_err(|e| HostError::Unreachable(format!("unreadable answer from the host: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_tagged_by_operation_name() {
        let c = Call::metrics {
            id: "cl-1".into(),
            range: MetricsRange::OneHour,
        };
        assert_eq!(c.name(), "metrics");
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"op": "metrics", "id": "cl-1", "range": "1h"})
        );
        let back: Call = serde_json::from_value(json).unwrap();
        assert!(matches!(back, Call::metrics { .. }));
        assert!(serde_json::from_value::<Call>(serde_json::json!({"op": "format_disk"})).is_err());
    }
}
