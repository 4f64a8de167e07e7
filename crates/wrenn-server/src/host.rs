//! How the control plane reaches host agents.
//!
//! [`HostClient`] is the whole contract; [`LocalHost`] implements it for the agent embedded in
//! the same process (`wrenn up`), [`RemoteHost`] for an agent on another machine (gRPC over
//! mutual TLS; guest operations through its envd tunnel).

use std::sync::Arc;

use async_trait::async_trait;
use wrenn_agent::rpc::client::RemoteAgent;
use wrenn_agent::{
    AgentError, CapsuleInfo, CapsuleManager, ExecOutput, ExecStream, SnapshotMeta, StartedProcess,
    UserSnapshot,
};
use wrenn_api::CapsuleSpec;

#[async_trait]
pub trait HostClient: Send + Sync {
    fn host_id(&self) -> &str;
    /// Where a remote agent listens (`None` for the agent in this process).
    fn address(&self) -> Option<&str> {
        None
    }
    async fn templates(&self) -> Result<Vec<String>, AgentError>;
    /// Running capsules whose VM died since the last call, with the reason (each is already
    /// cleaned up on the host).
    async fn reap_dead(&self) -> Result<Vec<(String, String)>, AgentError>;
    /// The most one capsule can have on this host.
    async fn capacity(&self) -> Result<wrenn_agent::HostCapacity, AgentError>;
    /// Base templates (root filesystems) with their image sizes in bytes.
    async fn base_templates(&self)
        -> Result<Vec<(String, u64, std::time::SystemTime)>, AgentError>;
    /// Boots a capsule from a template, or restores it from a user snapshot (`from`).
    async fn create(
        &self,
        id: &str,
        spec: &CapsuleSpec,
        from: Option<&UserSnapshot>,
    ) -> Result<CapsuleInfo, AgentError>;
    /// A live snapshot of a running capsule, stored on its host as `snapshot_id`.
    async fn snapshot(&self, id: &str, snapshot_id: &str) -> Result<SnapshotMeta, AgentError>;
    /// Metric points for an API `range` (running capsules live, paused ones as saved).
    async fn metrics(
        &self,
        id: &str,
        range: &str,
    ) -> Result<Vec<wrenn_agent::metrics::MetricPoint>, AgentError>;
    /// Idempotent; files in use by capsules stay until those are gone.
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AgentError>;
    /// Idempotent: destroying an unknown capsule succeeds with `false`.
    async fn destroy(&self, id: &str) -> Result<bool, AgentError>;
    /// Saves a running capsule to files and frees its VM. On error it runs on, or was destroyed
    /// (see [`HostClient::list`]).
    async fn pause(&self, id: &str) -> Result<(), AgentError>;
    /// Restores a paused capsule; on error it stays paused.
    async fn resume(&self, id: &str) -> Result<CapsuleInfo, AgentError>;
    async fn exec(&self, id: &str, spec: envd_proto::ExecSpec) -> Result<ExecOutput, AgentError>;
    async fn start_process(
        &self,
        id: &str,
        spec: envd_proto::StartSpec,
    ) -> Result<StartedProcess, AgentError>;
    async fn list_processes(&self, id: &str) -> Result<Vec<envd_proto::ProcessInfo>, AgentError>;
    async fn signal_process(
        &self,
        id: &str,
        selector: &str,
        signal: envd_proto::Signal,
    ) -> Result<(), AgentError>;
    async fn exec_stream(
        &self,
        id: &str,
        spec: envd_proto::ExecSpec,
    ) -> Result<ExecStream, AgentError>;
    /// The guest agent of a running capsule, for file transfers.
    async fn envd(&self, id: &str) -> Result<wrenn_agent::EnvdClient, AgentError>;
    async fn list(&self) -> Result<Vec<CapsuleInfo>, AgentError>;
}

/// The host agent running in this process.
pub struct LocalHost {
    pub id: String,
    pub manager: Arc<CapsuleManager>,
}

#[async_trait]
impl HostClient for LocalHost {
    fn host_id(&self) -> &str {
        &self.id
    }
    async fn templates(&self) -> Result<Vec<String>, AgentError> {
        Ok(self.manager.templates())
    }
    async fn reap_dead(&self) -> Result<Vec<(String, String)>, AgentError> {
        Ok(self.manager.reap_dead_vms().await)
    }
    async fn capacity(&self) -> Result<wrenn_agent::HostCapacity, AgentError> {
        Ok(self.manager.capacity())
    }
    async fn base_templates(
        &self,
    ) -> Result<Vec<(String, u64, std::time::SystemTime)>, AgentError> {
        Ok(self.manager.base_templates())
    }
    async fn create(
        &self,
        id: &str,
        spec: &CapsuleSpec,
        from: Option<&UserSnapshot>,
    ) -> Result<CapsuleInfo, AgentError> {
        self.manager.create(id, spec, from).await
    }
    async fn snapshot(&self, id: &str, snapshot_id: &str) -> Result<SnapshotMeta, AgentError> {
        self.manager.snapshot(id, snapshot_id).await
    }
    async fn metrics(
        &self,
        id: &str,
        range: &str,
    ) -> Result<Vec<wrenn_agent::metrics::MetricPoint>, AgentError> {
        self.manager.metrics(id, range)
    }
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AgentError> {
        self.manager.delete_snapshot(snapshot_id).await
    }
    async fn destroy(&self, id: &str) -> Result<bool, AgentError> {
        self.manager.destroy(id).await
    }
    async fn pause(&self, id: &str) -> Result<(), AgentError> {
        self.manager.pause(id).await
    }
    async fn resume(&self, id: &str) -> Result<CapsuleInfo, AgentError> {
        self.manager.resume(id).await
    }
    async fn exec(&self, id: &str, spec: envd_proto::ExecSpec) -> Result<ExecOutput, AgentError> {
        self.manager.exec(id, spec).await
    }
    async fn start_process(
        &self,
        id: &str,
        spec: envd_proto::StartSpec,
    ) -> Result<StartedProcess, AgentError> {
        self.manager.start_process(id, spec).await
    }
    async fn list_processes(&self, id: &str) -> Result<Vec<envd_proto::ProcessInfo>, AgentError> {
        self.manager.list_processes(id).await
    }
    async fn signal_process(
        &self,
        id: &str,
        selector: &str,
        signal: envd_proto::Signal,
    ) -> Result<(), AgentError> {
        self.manager.signal_process(id, selector, signal).await
    }
    async fn exec_stream(
        &self,
        id: &str,
        spec: envd_proto::ExecSpec,
    ) -> Result<ExecStream, AgentError> {
        self.manager.exec_stream(id, spec).await
    }
    async fn envd(&self, id: &str) -> Result<wrenn_agent::EnvdClient, AgentError> {
        self.manager.envd_client(id).await
    }
    async fn list(&self) -> Result<Vec<CapsuleInfo>, AgentError> {
        Ok(self.manager.list().await)
    }
}

/// A host agent on another machine.
pub struct RemoteHost {
    id: String,
    agent: RemoteAgent,
}

impl RemoteHost {
    pub fn new(id: &str, agent: RemoteAgent) -> Self {
        Self {
            id: id.to_string(),
            agent,
        }
    }
}

#[async_trait]
impl HostClient for RemoteHost {
    fn host_id(&self) -> &str {
        &self.id
    }
    fn address(&self) -> Option<&str> {
        Some(self.agent.address())
    }
    async fn templates(&self) -> Result<Vec<String>, AgentError> {
        self.agent.templates().await
    }
    async fn reap_dead(&self) -> Result<Vec<(String, String)>, AgentError> {
        self.agent.reap_dead().await
    }
    async fn capacity(&self) -> Result<wrenn_agent::HostCapacity, AgentError> {
        self.agent.capacity().await
    }
    async fn base_templates(
        &self,
    ) -> Result<Vec<(String, u64, std::time::SystemTime)>, AgentError> {
        self.agent.base_templates().await
    }
    async fn create(
        &self,
        id: &str,
        spec: &CapsuleSpec,
        from: Option<&UserSnapshot>,
    ) -> Result<CapsuleInfo, AgentError> {
        self.agent.create(id, spec, from).await
    }
    async fn snapshot(&self, id: &str, snapshot_id: &str) -> Result<SnapshotMeta, AgentError> {
        self.agent.snapshot(id, snapshot_id).await
    }
    async fn metrics(
        &self,
        id: &str,
        range: &str,
    ) -> Result<Vec<wrenn_agent::metrics::MetricPoint>, AgentError> {
        self.agent.metrics(id, range).await
    }
    async fn delete_snapshot(&self, snapshot_id: &str) -> Result<(), AgentError> {
        self.agent.delete_snapshot(snapshot_id).await
    }
    async fn destroy(&self, id: &str) -> Result<bool, AgentError> {
        self.agent.destroy(id).await
    }
    async fn pause(&self, id: &str) -> Result<(), AgentError> {
        self.agent.pause(id).await
    }
    async fn resume(&self, id: &str) -> Result<CapsuleInfo, AgentError> {
        self.agent.resume(id).await
    }
    async fn exec(&self, id: &str, spec: envd_proto::ExecSpec) -> Result<ExecOutput, AgentError> {
        self.agent.envd(id).exec(spec).await
    }
    async fn start_process(
        &self,
        id: &str,
        spec: envd_proto::StartSpec,
    ) -> Result<StartedProcess, AgentError> {
        self.agent.envd(id).start(spec).await
    }
    async fn list_processes(&self, id: &str) -> Result<Vec<envd_proto::ProcessInfo>, AgentError> {
        self.agent.envd(id).list_processes().await
    }
    async fn signal_process(
        &self,
        id: &str,
        selector: &str,
        signal: envd_proto::Signal,
    ) -> Result<(), AgentError> {
        self.agent.envd(id).signal(selector, signal).await
    }
    async fn exec_stream(
        &self,
        id: &str,
        spec: envd_proto::ExecSpec,
    ) -> Result<ExecStream, AgentError> {
        self.agent.envd(id).exec_stream(spec).await
    }
    async fn envd(&self, id: &str) -> Result<wrenn_agent::EnvdClient, AgentError> {
        Ok(self.agent.envd(id))
    }
    async fn list(&self) -> Result<Vec<CapsuleInfo>, AgentError> {
        self.agent.list().await
    }
}
