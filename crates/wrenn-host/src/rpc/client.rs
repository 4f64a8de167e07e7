//! The control plane's side: a remote agent, called over mutual TLS. `impl Host for
//! RemoteHost` is generated with the operations (`operations.rs`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use envd_client::{EnvdClient, EnvdDial, EnvdError, EnvdStream};
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic::Request;

use super::generated::agent_client::AgentClient;
use super::{ReadFileArgs, TlsMaterial, WriteFileArgs, ARGS_KEY, CAPSULE_ID_KEY};
use crate::error::HostError;
use crate::operations::Call;
use crate::{ByteStream, FileDigest};

/// A host agent on another machine.
#[derive(Clone)]
pub struct RemoteHost {
    address: String,
    client: AgentClient<Channel>,
}

impl std::fmt::Debug for RemoteHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RemoteHost({})", self.address)
    }
}

impl RemoteHost {
    /// A client for host `host_id`'s agent at `address` (`ip:port`); connects on first use,
    /// and only to an agent whose certificate names `host_id`.
    pub fn new(host_id: &str, address: &str, tls: &TlsMaterial) -> Result<Self, HostError> {
        address
            .parse::<std::net::SocketAddr>()
            .map_err(|_| HostError::InvalidRequest(format!("bad agent address {address:?}")))?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&tls.ca_cert))
            .identity(Identity::from_pem(&tls.cert, &tls.key))
            .domain_name(super::host_cert_name(host_id));
        let channel = Channel::from_shared(format!("https://{address}"))
            .map_err(|e| HostError::InvalidRequest(e.to_string()))?
            .tls_config(tls)
            .map_err(|e| HostError::InvalidRequest(format!("TLS: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(Duration::from_secs(15))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            address: address.to_string(),
            client: AgentClient::new(channel),
        })
    }

    /// Sends one host operation; its answer as JSON.
    /// How long the agent may take to answer `call`.
    pub(crate) fn deadline_for(&self, call: &Call) -> std::time::Duration {
        call.deadline()
    }

    pub(crate) async fn dispatch(&self, call: Call) -> Result<serde_json::Value, HostError> {
        Ok(self.client.clone().call(call).await?.into_inner())
    }

    /// One file of a snapshot on the agent, streamed.
    pub(crate) async fn read_file(
        &self,
        snapshot_id: &str,
        file: &str,
    ) -> Result<ByteStream, HostError> {
        let mut req = Request::new(Bytes::new());
        set_args(
            &mut req,
            &ReadFileArgs {
                snapshot_id: snapshot_id.to_string(),
                file: file.to_string(),
            },
        )?;
        let body = self.client.clone().read_file(req).await?.into_inner();
        Ok(Box::pin(body.map(|r| r.map_err(HostError::from))))
    }

    /// Streams one file of a snapshot copy to the agent. An error of `body` ends the upload
    /// (the agent then finds the file short and keeps nothing) and is the answer.
    pub(crate) async fn write_file(
        &self,
        transfer: &str,
        digest: &FileDigest,
        body: ByteStream,
    ) -> Result<(), HostError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
        let pump = tokio::spawn(async move {
            let mut body = body;
            while let Some(chunk) = body.next().await {
                // The agent stopped reading: its answer says why.
                if tx.send(chunk?).await.is_err() {
                    break;
                }
            }
            Ok::<(), HostError>(())
        });
        let chunks = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut req = Request::new(chunks);
        set_args(
            &mut req,
            &WriteFileArgs {
                transfer: transfer.to_string(),
                digest: digest.clone(),
            },
        )?;
        let answer = self.client.clone().write_file(req).await;
        pump.await
            .map_err(|e| HostError::Vmm(format!("upload task: {e}")))??;
        answer?;
        Ok(())
    }

    /// The guest agent of capsule `id`, reached through the agent's tunnel.
    pub(crate) fn dial_envd(&self, id: &str) -> Result<EnvdClient, HostError> {
        Ok(EnvdClient::remote(Arc::new(Tunnel {
            host: self.clone(),
            capsule: id.to_string(),
        })))
    }
}

/// Puts a file method's arguments in the request's metadata.
fn set_args<T, A: serde::Serialize>(req: &mut Request<T>, args: &A) -> Result<(), HostError> {
    let json = serde_json::to_string(args)
        .map_err(|e| HostError::InvalidRequest(format!("arguments: {e}")))?;
    let value = json
        .parse()
        .map_err(|_| HostError::InvalidRequest("arguments are not valid metadata".into()))?;
    req.metadata_mut().insert(ARGS_KEY, value);
    Ok(())
}

/// Dials a capsule's envd through its agent.
#[derive(Debug)]
struct Tunnel {
    host: RemoteHost,
    capsule: String,
}

/// How much of a tunnel's traffic is buffered on this side.
const TUNNEL_BUFFER: usize = 64 * 1024;

#[async_trait::async_trait]
impl EnvdDial for Tunnel {
    async fn dial(&self) -> Result<Box<dyn EnvdStream>, EnvdError> {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let mut req = Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut().insert(
            CAPSULE_ID_KEY,
            self.capsule
                .parse()
                .map_err(|_| EnvdError::InvalidRequest("bad capsule id".into()))?,
        );
        let mut inbound = self
            .host
            .client
            .clone()
            .tunnel(req)
            .await
            .map_err(|s| EnvdError::from(HostError::from(s)))?
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
