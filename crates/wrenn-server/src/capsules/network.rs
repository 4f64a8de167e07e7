//! A capsule's egress policy (`GET`/`PUT /v1/capsules/{id}/network`): kept in its row, sent to
//! its host with the create, and changed on the host first whenever the host holds the capsule
//! (running: at once, in its slot's firewall; paused: in the record it resumes from).

use std::time::Duration;

use wrenn_api::{ApiError, CapsuleStatus, EventActor, NetworkPolicy};

use super::{CapsuleService, Result};
use crate::error::from_host;

/// How long the host may take to apply a policy (it resolves the policy's domains first).
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl CapsuleService {
    /// `GET /v1/capsules/{id}/network`.
    pub async fn network(&self, team_id: &str, id: &str) -> Result<NetworkPolicy> {
        Ok(self.owned(team_id, id).await?.capsule.network)
    }

    /// `PUT /v1/capsules/{id}/network`: replaces the capsule's egress policy.
    pub async fn set_network(
        &self,
        team_id: &str,
        id: &str,
        policy: &NetworkPolicy,
        actor: &EventActor,
    ) -> Result<NetworkPolicy> {
        use CapsuleStatus::*;
        let policy = policy.validate().map_err(ApiError::invalid)?;
        let row = self.owned(team_id, id).await?;
        match row.capsule.status {
            Running | Paused | Pausing | Resuming | Snapshotting => {}
            Missing => {
                return Err(ApiError::new(
                    wrenn_api::ErrorCode::HostUnavailable,
                    format!("capsule {id} is missing: its host is not reachable right now"),
                ))
            }
            other => {
                return Err(ApiError::invalid_state(format!(
                    "capsule {id} is {}: its network policy can change once it runs or is paused",
                    other.as_str()
                )))
            }
        }
        let host = self.pool.client_for(&row).await?;
        match tokio::time::timeout(
            APPLY_TIMEOUT,
            host.set_network(id.to_string(), policy.clone()),
        )
        .await
        {
            Ok(r) => r.map_err(from_host)?,
            Err(_) => {
                return Err(ApiError::new(
                    wrenn_api::ErrorCode::HostUnavailable,
                    format!("the capsule's host did not apply the policy within {APPLY_TIMEOUT:?}"),
                ))
            }
        }
        self.store.set_capsule_network(id, &policy).await?;
        tracing::info!(capsule_id = id, internet = policy.internet, allow_out = ?policy.allow_out, deny_out = ?policy.deny_out, actor = %actor.name, "egress policy changed");
        Ok(policy)
    }
}
