//! How hosts coming, going and reporting move their capsules.

use tracing::{info, warn};
use wrenn_api::{CapsuleStatus, EventActor, EventKind};

use super::{CapsuleService, OrLog};

#[async_trait::async_trait]
impl crate::hosts::HostEvents for CapsuleService {
    async fn host_online(&self, host: &wrenn_api::Host) {
        self.pool.status_changed(&host.id);
        self.pool.connect(host);
    }

    async fn host_down(&self, host: &wrenn_api::Host) {
        self.pool.status_changed(&host.id);
        self.events.host(EventKind::HostDown, host).await;
        match self.mark_missing(&host.id).await {
            Ok(n) => warn!(host_id = %host.id, capsules = n, "host down: its capsules are missing"),
            Err(e) => {
                warn!(host_id = %host.id, error = %e.message, "cannot mark the capsules of a lost host")
            }
        }
    }

    async fn host_back(&self, host: &wrenn_api::Host) {
        self.pool.status_changed(&host.id);
        self.events.host(EventKind::HostUp, host).await;
        if let Some(client) = self.client(&host.id) {
            if let Err(e) = self.reconcile_host(&host.id, &client).await {
                warn!(host_id = %host.id, error = %e.message, "reconcile after the host came back failed");
            }
        }
    }

    async fn host_deleted(&self, host: &wrenn_api::Host, capsule_ids: &[String]) {
        use CapsuleStatus::*;
        let client = self.client(&host.id);
        for id in capsule_ids {
            if let Some(c) = &client {
                if let Err(e) = c.destroy(id.clone()).await {
                    warn!(capsule_id = %id, host_id = %host.id, error = %e, "destroy with its host failed");
                }
            }
            self.store
                .transition(id, &CapsuleStatus::LIVE, Stopped)
                .await
                .or_log("recording a capsule stopped with its host", id, &host.id);
        }
    }

    async fn capsule_event(&self, host_id: &str, ev: &wrenn_api::SandboxEvent) {
        use CapsuleStatus::*;
        let row = match self.store.capsule(&ev.sandbox_id).await {
            Ok(Some(r)) if r.host_id.as_deref() == Some(host_id) => r,
            Ok(_) => {
                warn!(capsule_id = %ev.sandbox_id, host_id, event = %ev.event, "event for a capsule not on this host: ignored");
                return;
            }
            Err(e) => {
                warn!(error = %e, "capsule event: store error");
                return;
            }
        };
        let id = &row.capsule.id;
        let moved = match ev.event.as_str() {
            "sandbox.auto_paused" => self
                .store
                .transition(id, &[Running, Missing], Paused)
                .await
                .map(|ok| ok.then_some(Paused)),
            "sandbox.stopped" => self
                .store
                .transition(
                    id,
                    &[
                        Pending, Starting, Running, Pausing, Paused, Resuming, Missing, Stopping,
                    ],
                    Stopped,
                )
                .await
                .map(|ok| ok.then_some(Stopped)),
            "sandbox.error" => self
                .store
                .mark_error(
                    id,
                    ev.reason.as_deref().unwrap_or("the host reported an error"),
                )
                .await
                .map(|_| (!row.capsule.status.is_terminal()).then_some(Error)),
            other => {
                info!(capsule_id = %id, host_id, event = other, "unknown capsule event accepted");
                Ok(None)
            }
        };
        // What the host reported goes on the event bus like any other change; a pause the
        // host made on its own is also an action (by the host) for the audit log.
        if let Ok(Some(to)) = &moved {
            if *to == Paused {
                let host = EventActor {
                    kind: "host".into(),
                    id: host_id.to_string(),
                    name: host_id.to_string(),
                };
                let reason = ev.reason.as_deref().unwrap_or("host_auto_paused");
                self.events
                    .action(
                        EventKind::CapsulePause,
                        id,
                        &host,
                        Ok(()),
                        &[("reason", reason)],
                    )
                    .await;
            }
            self.events
                .changed(id, row.capsule.status, *to, Some(&ev.event))
                .await;
        }
        let done = moved.map(|_| ());
        if let Err(e) = done {
            warn!(capsule_id = %id, error = %e, "capsule event not applied");
        }
    }
}
