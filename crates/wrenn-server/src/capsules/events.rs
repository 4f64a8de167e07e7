//! [`Emitter`]: every capsule, template and host event is published from here, after its
//! audit entry (if it stands for one) is written.

use std::sync::Arc;

use wrenn_api::{CapsuleStatus, Event, EventActor, EventKind, EventResource};

use crate::audit::{self, AuditLog};
use crate::events::EventBus;
use crate::store::Store;

/// Publishes capsule events with the capsule as it is now (cheap to clone into tasks).
#[derive(Clone)]
pub struct Emitter {
    store: Store,
    bus: Arc<EventBus>,
    audit: AuditLog,
}

impl Emitter {
    pub fn new(store: Store, bus: Arc<EventBus>) -> Self {
        Self {
            audit: AuditLog::new(store.clone()),
            store,
            bus,
        }
    }

    /// Writes the event's audit entry (if it stands for one), then publishes it.
    async fn emit(&self, ev: Event) {
        if let Some(r) = audit::from_event(&ev) {
            self.audit.record(r).await;
        }
        self.bus.publish(ev);
    }

    /// A capsule event, carrying the capsule as it is now and its team.
    async fn about_capsule(
        &self,
        event: EventKind,
        id: &str,
        actor: EventActor,
        outcome: Option<std::result::Result<(), String>>,
        metadata: std::collections::BTreeMap<String, String>,
    ) {
        let row = self.store.capsule(id).await.ok().flatten();
        self.emit(Event {
            event,
            outcome: outcome
                .as_ref()
                .map(|o| if o.is_ok() { "success" } else { "error" }.into()),
            resource: EventResource {
                id: id.to_string(),
                kind: "capsule".into(),
            },
            actor,
            metadata,
            error: outcome.and_then(|o| o.err()),
            team_id: row.as_ref().map(|r| r.team_id.clone()),
            sandbox: row.map(|r| r.capsule),
            timestamp: chrono::Utc::now(),
        })
        .await;
    }

    /// A capsule action (`capsule.create`, `.pause`, `.resume`, `.destroy`) with its outcome
    /// (`Err` carries the error).
    pub async fn action(
        &self,
        action: EventKind,
        id: &str,
        actor: &EventActor,
        outcome: std::result::Result<(), String>,
        metadata: &[(&str, &str)],
    ) {
        let metadata = metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.about_capsule(action, id, actor.clone(), Some(outcome), metadata)
            .await;
    }

    /// `capsule.destroy` by the system: what a failed create had made was torn down.
    pub async fn cleaned_up_after_failed_create(
        &self,
        id: &str,
        outcome: std::result::Result<(), String>,
    ) {
        let actor = EventActor::system("create-cleanup");
        let reason = [("reason", "cleanup_after_create_error")];
        self.action(EventKind::CapsuleDestroy, id, &actor, outcome, &reason)
            .await;
    }

    /// `capsule.state.changed` from `from` to `to`.
    pub async fn changed(
        &self,
        id: &str,
        from: CapsuleStatus,
        to: CapsuleStatus,
        reason: Option<&str>,
    ) {
        let mut metadata: std::collections::BTreeMap<String, String> =
            [("from", from.as_str()), ("to", to.as_str())]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
        if let Some(r) = reason {
            metadata.insert("reason".into(), r.into());
        }
        self.about_capsule(
            EventKind::CapsuleStateChanged,
            id,
            EventActor::system("wrenn"),
            None,
            metadata,
        )
        .await;
    }

    /// `host.down` or `host.up`, noticed by the liveness monitor.
    pub async fn host(&self, kind: EventKind, host: &wrenn_api::Host) {
        let monitor = EventActor::system("host-monitor");
        let team = host.team_id.as_deref();
        self.other(kind, "host", &host.id, team, &monitor, None)
            .await;
    }

    /// `template.build.finish`: success, or the reason the build failed.
    pub async fn build_finished(
        &self,
        build_id: &str,
        actor: &EventActor,
        outcome: std::result::Result<(), &str>,
    ) {
        self.emit(Event {
            event: EventKind::BuildFinish,
            outcome: Some(if outcome.is_ok() { "success" } else { "error" }.into()),
            resource: EventResource {
                id: build_id.to_string(),
                kind: "build".into(),
            },
            actor: actor.clone(),
            metadata: Default::default(),
            error: outcome.err().map(Into::into),
            sandbox: None,
            team_id: None,
            timestamp: chrono::Utc::now(),
        })
        .await;
    }

    /// An event about something other than a capsule (templates, hosts).
    pub async fn other(
        &self,
        event: EventKind,
        kind: &str,
        id: &str,
        team_id: Option<&str>,
        actor: &EventActor,
        outcome: Option<bool>,
    ) {
        self.emit(Event {
            event,
            outcome: outcome.map(|ok| if ok { "success" } else { "error" }.into()),
            resource: EventResource {
                id: id.to_string(),
                kind: kind.into(),
            },
            actor: actor.clone(),
            metadata: Default::default(),
            error: None,
            sandbox: None,
            team_id: team_id.map(Into::into),
            timestamp: chrono::Utc::now(),
        })
        .await;
    }
}
