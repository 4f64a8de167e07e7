//! The agent's side: the service over any [`Host`], served with mutual TLS.

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
use super::{ReadFileArgs, TlsMaterial, WriteFileArgs, ARGS_KEY, CAPSULE_ID_KEY};
use crate::error::HostError;
use crate::operations::Call;
use crate::Host;

struct AgentService {
    host: Arc<dyn Host>,
}

#[tonic::async_trait]
impl Agent for AgentService {
    async fn call(&self, r: Request<Call>) -> Result<Response<serde_json::Value>, Status> {
        let call = r.into_inner();
        let op = call.name();
        match call.run(self.host.as_ref()).await {
            Ok(answer) => Ok(Response::new(answer)),
            Err(e) => {
                tracing::debug!(op, error = %e, "host operation failed");
                Err(e.into())
            }
        }
    }

    type TunnelStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

    /// Connects to the capsule's envd and pipes bytes both ways until either side ends.
    async fn tunnel(
        &self,
        r: Request<Streaming<Bytes>>,
    ) -> Result<Response<Self::TunnelStream>, Status> {
        let id = r
            .metadata()
            .get(CAPSULE_ID_KEY)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| Status::invalid_argument("tunnel without x-capsule-id"))?
            .to_string();
        let envd = self.host.envd(&id).await?;
        let conn = envd.open().await.map_err(HostError::from)?;
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
        Ok(Response::new(Box::pin(out) as Self::TunnelStream))
    }

    type ReadFileStream = Pin<Box<dyn Stream<Item = Result<Bytes, Status>> + Send>>;

    async fn read_file(&self, r: Request<Bytes>) -> Result<Response<Self::ReadFileStream>, Status> {
        let a: ReadFileArgs = args(r.metadata())?;
        let body = self
            .host
            .read_snapshot_file(&a.snapshot_id, &a.file)
            .await?;
        Ok(Response::new(
            Box::pin(body.map(|r| r.map_err(Status::from))) as Self::ReadFileStream,
        ))
    }

    async fn write_file(&self, r: Request<Streaming<Bytes>>) -> Result<Response<Bytes>, Status> {
        let a: WriteFileArgs = args(r.metadata())?;
        let body = r
            .into_inner()
            .map(|r| r.map_err(|s| HostError::Unreachable(format!("upload: {}", s.message()))));
        self.host
            .write_snapshot_file(&a.transfer, &a.digest, Box::pin(body))
            .await?;
        Ok(Response::new(Bytes::new()))
    }
}

/// The JSON arguments a file method carries in its metadata.
fn args<T: serde::de::DeserializeOwned>(meta: &tonic::metadata::MetadataMap) -> Result<T, Status> {
    let raw = meta
        .get(ARGS_KEY)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| Status::invalid_argument("missing x-args"))?;
    serde_json::from_str(raw).map_err(|e| Status::invalid_argument(format!("bad x-args: {e}")))
}

/// Serves `host` on `addr` with mutual TLS until `shutdown` completes.
pub async fn serve(
    host: Arc<dyn Host>,
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
        .add_service(AgentServer::new(AgentService { host }))
        .serve_with_shutdown(addr, shutdown)
        .await
}
