//! The control plane's side: a remote agent, called over mutual TLS.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Request;

use super::generated::agent_client::AgentClient;
use super::wire::*;
use super::{from_status, TlsMaterial, CAPSULE_ID_KEY};
use crate::envd_client::EnvdDial;
use crate::envd_conn::EnvdStream;
use crate::error::{AgentError, Result};
use crate::{CapsuleInfo, EnvdClient, HostCapacity, SnapshotMeta, UserSnapshot};

#[derive(Clone)]
pub struct RemoteAgent {
    address: String,
    client: AgentClient<Channel>,
}

impl std::fmt::Debug for RemoteAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteAgent({})", self.address)
    }
}

impl RemoteAgent {
    /// A client for the agent at `address` (`ip:port`); connects on first use.
    pub fn new(address: &str, tls: &TlsMaterial) -> Result<Self> {
        let sock: std::net::SocketAddr = address
            .parse()
            .map_err(|_| AgentError::InvalidRequest(format!("bad agent address {address:?}")))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_cert))
            .identity(Identity::from_pem(&tls.cert, &tls.key))
            .domain_name(sock.ip().to_string());
        let channel = Channel::from_shared(format!("https://{address}"))
            .map_err(|e| AgentError::InvalidRequest(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| AgentError::InvalidRequest(format!("TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            address: address.to_string(),
            client: AgentClient::new(channel),
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn c(&self) -> AgentClient<Channel> {
        self.client.clone()
    }

    pub async fn templates(&self) -> Result<Vec<String>> {
        Ok(self
            .c()
            .templates(Empty {})
            .await
            .map_err(from_status)?
            .into_inner()
            .names)
    }

    pub async fn reap_dead(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .c()
            .reap_dead(Empty {})
            .await
            .map_err(from_status)?
            .into_inner()
            .dead)
    }

    pub async fn capacity(&self) -> Result<HostCapacity> {
        let c = self
            .c()
            .capacity(Empty {})
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(HostCapacity {
            cpus: c.cpus,
            memory_mb: c.memory_mb,
            disk_free_mb: c.disk_free_mb,
        })
    }

    pub async fn base_templates(&self) -> Result<Vec<(String, u64, std::time::SystemTime)>> {
        let list = self
            .c()
            .base_templates(Empty {})
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(list
            .templates
            .into_iter()
            .map(|t| {
                let built = std::time::UNIX_EPOCH + Duration::from_millis(t.built_ms.max(0) as u64);
                (t.name, t.size_bytes, built)
            })
            .collect())
    }

    pub async fn create(
        &self,
        id: &str,
        spec: &wrenn_api::CapsuleSpec,
        from: Option<&UserSnapshot>,
    ) -> Result<CapsuleInfo> {
        let req = CreateRequest {
            id: id.into(),
            spec: spec.clone(),
            from_snapshot: from.map(|s| s.id.clone()),
        };
        Ok(self
            .c()
            .create(req)
            .await
            .map_err(from_status)?
            .into_inner()
            .into())
    }

    pub async fn snapshot(&self, id: &str, snapshot_id: &str) -> Result<SnapshotMeta> {
        let req = SnapshotRequest {
            id: id.into(),
            snapshot_id: snapshot_id.into(),
        };
        Ok(self
            .c()
            .snapshot(req)
            .await
            .map_err(from_status)?
            .into_inner())
    }

    pub async fn metrics(&self, id: &str, range: &str) -> Result<Vec<crate::metrics::MetricPoint>> {
        let req = MetricsRequest {
            id: id.into(),
            range: range.into(),
        };
        Ok(self
            .c()
            .metrics(req)
            .await
            .map_err(from_status)?
            .into_inner()
            .points)
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        self.c()
            .delete_snapshot(Id { id: id.into() })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    pub async fn destroy(&self, id: &str) -> Result<bool> {
        Ok(self
            .c()
            .destroy(Id { id: id.into() })
            .await
            .map_err(from_status)?
            .into_inner()
            .value)
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        self.c()
            .pause(Id { id: id.into() })
            .await
            .map_err(from_status)?;
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<CapsuleInfo> {
        Ok(self
            .c()
            .resume(Id { id: id.into() })
            .await
            .map_err(from_status)?
            .into_inner()
            .into())
    }

    pub async fn list(&self) -> Result<Vec<CapsuleInfo>> {
        let list = self
            .c()
            .list(Empty {})
            .await
            .map_err(from_status)?
            .into_inner();
        Ok(list.capsules.into_iter().map(Into::into).collect())
    }

    /// The guest agent of capsule `id`, reached through the agent's tunnel.
    pub fn envd(&self, id: &str) -> EnvdClient {
        EnvdClient::remote(Arc::new(Tunnel {
            agent: self.clone(),
            capsule: id.to_string(),
        }))
    }
}

/// Dials a capsule's envd through its agent.
#[derive(Debug)]
struct Tunnel {
    agent: RemoteAgent,
    capsule: String,
}

/// How much of a tunnel's traffic is buffered on this side.
const TUNNEL_BUFFER: usize = 64 * 1024;

#[async_trait::async_trait]
impl EnvdDial for Tunnel {
    async fn dial(&self) -> Result<Box<dyn EnvdStream>> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert(
            CAPSULE_ID_KEY,
            self.capsule
                .parse()
                .map_err(|_| AgentError::InvalidRequest("bad capsule id".into()))?,
        );
        let mut inbound = self
            .agent
            .c()
            .tunnel(req)
            .await
            .map_err(from_status)?
            .into_inner();
        let (ours, theirs) = tokio::io::duplex(TUNNEL_BUFFER);
        let (mut rd, mut wr) = tokio::io::split(theirs);
        // Bytes written by the caller go out as messages…
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx.send(Bytes::copy_from_slice(&buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }
            }
        });
        // …and messages from envd come back as bytes to read.
        tokio::spawn(async move {
            while let Some(Ok(chunk)) = inbound.next().await {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            let _ = wr.shutdown().await;
        });
        Ok(Box::new(ours))
    }
}
