//! The agent's side: the service over a [`CapsuleManager`], served with mutual TLS.

// tonic fixes the error type of every method (`Status`, large): nothing to choose here.
#![allow(clippy::result_large_err)]

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use tokio::io::AsyncWriteExt;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status, Streaming};

use super::generated::agent_server::{Agent, AgentServer};
use super::wire::*;
use super::{to_status, TlsMaterial, CAPSULE_ID_KEY};
use crate::{CapsuleManager, UserSnapshot};

pub struct AgentService {
    manager: Arc<CapsuleManager>,
}

impl AgentService {
    pub fn new(manager: Arc<CapsuleManager>) -> Self {
        Self { manager }
    }
}

type Answer<T> = Result<Response<T>, Status>;

fn ok<T>(t: T) -> Answer<T> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn templates(&self, _: Request<Empty>) -> Answer<Names> {
        ok(Names {
            names: self.manager.templates(),
        })
    }

    async fn reap_dead(&self, _: Request<Empty>) -> Answer<DeadList> {
        ok(DeadList {
            dead: self.manager.reap_dead_vms().await,
        })
    }

    async fn capacity(&self, _: Request<Empty>) -> Answer<Capacity> {
        let c = self.manager.capacity();
        ok(Capacity {
            cpus: c.cpus,
            memory_mb: c.memory_mb,
            disk_free_mb: c.disk_free_mb,
        })
    }

    async fn base_templates(&self, _: Request<Empty>) -> Answer<BaseTemplateList> {
        let templates = self
            .manager
            .base_templates()
            .into_iter()
            .map(|(name, size_bytes, built)| BaseTemplate {
                name,
                size_bytes,
                built_ms: built
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_millis() as i64)
                    .unwrap_or(0),
            })
            .collect();
        ok(BaseTemplateList { templates })
    }

    async fn create(&self, r: Request<CreateRequest>) -> Answer<Info> {
        let r = r.into_inner();
        let from = r.from_snapshot.map(|id| UserSnapshot { id });
        self.manager
            .create(&r.id, &r.spec, from.as_ref())
            .await
            .map(|i| Response::new(i.into()))
            .map_err(to_status)
    }

    async fn snapshot(&self, r: Request<SnapshotRequest>) -> Answer<SnapshotMeta> {
        let r = r.into_inner();
        self.manager
            .snapshot(&r.id, &r.snapshot_id)
            .await
            .map(Response::new)
            .map_err(to_status)
    }

    async fn metrics(&self, r: Request<MetricsRequest>) -> Answer<MetricList> {
        let r = r.into_inner();
        self.manager
            .metrics(&r.id, &r.range)
            .map(|points| Response::new(MetricList { points }))
            .map_err(to_status)
    }

    async fn delete_snapshot(&self, r: Request<Id>) -> Answer<Empty> {
        self.manager
            .delete_snapshot(&r.into_inner().id)
            .await
            .map(|_| Response::new(Empty {}))
            .map_err(to_status)
    }

    async fn destroy(&self, r: Request<Id>) -> Answer<Flag> {
        self.manager
            .destroy(&r.into_inner().id)
            .await
            .map(|value| Response::new(Flag { value }))
            .map_err(to_status)
    }

    async fn pause(&self, r: Request<Id>) -> Answer<Empty> {
        self.manager
            .pause(&r.into_inner().id)
            .await
            .map(|_| Response::new(Empty {}))
            .map_err(to_status)
    }

    async fn resume(&self, r: Request<Id>) -> Answer<Info> {
        self.manager
            .resume(&r.into_inner().id)
            .await
            .map(|i| Response::new(i.into()))
            .map_err(to_status)
    }

    async fn list(&self, _: Request<Empty>) -> Answer<InfoList> {
        ok(InfoList {
            capsules: self
                .manager
                .list()
                .await
                .into_iter()
                .map(Info::from)
                .collect(),
        })
    }

    type TunnelStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

    /// Connects to the capsule's envd and pipes bytes both ways until either side ends.
    async fn tunnel(&self, r: Request<Streaming<Bytes>>) -> Answer<Self::TunnelStream> {
        let id = r
            .metadata()
            .get(CAPSULE_ID_KEY)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::invalid_argument("tunnel without x-capsule-id"))?
            .to_string();
        let envd = self.manager.envd_client(&id).await.map_err(to_status)?;
        let conn = envd.open().await.map_err(to_status)?;
        let (rd, mut wr) = tokio::io::split(conn);
        let mut inbound = r.into_inner();
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = inbound.next().await {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            // The control plane closed its side: so does envd's connection.
            let _ = wr.shutdown().await;
        });
        let out = tokio_util::io::ReaderStream::with_capacity(rd, 64 * 1024)
            .map(|r| r.map_err(|e| Status::unavailable(format!("envd: {e}"))));
        ok(Box::pin(out) as Self::TunnelStream)
    }
}

/// Serves the agent service on `addr` with mutual TLS until `shutdown` completes.
pub async fn serve(
    manager: Arc<CapsuleManager>,
    addr: SocketAddr,
    tls: &TlsMaterial,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(&tls.cert, &tls.key))
        .client_ca_root(Certificate::from_pem(&tls.ca_cert));
    Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(15)))
        .add_service(AgentServer::new(AgentService::new(manager)))
        .serve_with_shutdown(addr, shutdown)
        .await
}
