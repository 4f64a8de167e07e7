//! What the port proxy needs from a capsule: its guest agent once it runs. A paused capsule is
//! resumed by the request (auto-resume), one on its way is waited for; either within
//! [`WAKE_TIMEOUT`], after which the caller is told to retry (503, which the SDK's code runner
//! retries). Proxy traffic counts as activity: each request touches the capsule, and an open
//! connection (a WebSocket, a stream) holds it busy while it lasts.

use std::time::Duration;

use wrenn_api::{ApiError, CapsuleStatus, ErrorCode, EventActor};

use super::{Busy, CapsuleService, Result};
use crate::error::from_host;

/// How long a proxied request waits for its capsule to run.
const WAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running capsule's way in for the proxy.
pub struct ProxyTarget {
    pub envd: envd_client::EnvdClient,
    /// Keeps the capsule in use while the request (or its stream) lasts.
    pub busy: Busy,
    /// Names this run of the capsule: it changes when the capsule is paused and resumed, so
    /// connections kept from an earlier run are not reused.
    pub run: String,
}

impl CapsuleService {
    /// The guest agent of capsule `id` of `team_id` for a proxied request, resuming the
    /// capsule first when it is paused.
    pub async fn proxy_target(
        &self,
        team_id: &str,
        id: &str,
        actor: &EventActor,
    ) -> Result<ProxyTarget> {
        use CapsuleStatus::*;
        let deadline = tokio::time::Instant::now() + WAKE_TIMEOUT;
        let mut resumed = false;
        loop {
            let row = self.owned(team_id, id).await?;
            match row.capsule.status {
                Running => {
                    let host = self.pool.client_for(&row).await?;
                    let busy = self.hold(id);
                    return Ok(ProxyTarget {
                        envd: host.envd(id).await.map_err(from_host)?,
                        busy,
                        run: format!(
                            "{}/{}",
                            row.host_id.unwrap_or_default(),
                            row.capsule.last_updated.timestamp_micros()
                        ),
                    });
                }
                Paused if !resumed => {
                    resumed = true;
                    match self.resume(team_id, id, actor).await {
                        Ok(_) => {}
                        // Someone else resumed it meanwhile: wait like them.
                        Err(e) if e.code == ErrorCode::InvalidState => {}
                        Err(e) => return Err(e),
                    }
                }
                Stopped | Error => {
                    return Err(ApiError::not_found(format!(
                        "capsule {id} is {}",
                        row.capsule.status.as_str()
                    )))
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ApiError::new(
                    ErrorCode::HostUnavailable,
                    format!(
                        "capsule {id} is {} and not running yet; try again",
                        row.capsule.status.as_str()
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
