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

impl CapsuleService {
    /// The guest agent of capsule `id` of `team_id` for a proxied request, resuming the
    /// capsule first when it is paused, and the hold that keeps it busy meanwhile.
    pub async fn proxy_target(
        &self,
        team_id: &str,
        id: &str,
        actor: &EventActor,
    ) -> Result<(envd_client::EnvdClient, Busy)> {
        use CapsuleStatus::*;
        let deadline = tokio::time::Instant::now() + WAKE_TIMEOUT;
        let mut resumed = false;
        loop {
            let row = self.owned(team_id, id).await?;
            match row.capsule.status {
                Running => {
                    let host = self.pool.client_for(&row).await?;
                    let busy = self.hold(id);
                    return Ok((host.envd(id).await.map_err(from_host)?, busy));
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
