//! Platform events: what the SSE streams carry (the spec's `SSEEvent`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Capsule;

/// What happened (the spec's `SSEEvent.event`, less the stream's own `connected`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum EventKind {
    #[serde(rename = "capsule.create")]
    CapsuleCreate,
    #[serde(rename = "capsule.pause")]
    CapsulePause,
    #[serde(rename = "capsule.resume")]
    CapsuleResume,
    #[serde(rename = "capsule.destroy")]
    CapsuleDestroy,
    #[serde(rename = "capsule.state.changed")]
    CapsuleStateChanged,
    #[serde(rename = "template.snapshot.create")]
    SnapshotCreate,
    #[serde(rename = "template.snapshot.delete")]
    SnapshotDelete,
    #[serde(rename = "host.up")]
    HostUp,
    /// Extension: a template build was submitted.
    #[serde(rename = "template.build.create")]
    BuildCreate,
    /// Extension: a template build was cancelled.
    #[serde(rename = "template.build.cancel")]
    BuildCancel,
    /// Extension: a template build ended (outcome success, or error with the reason).
    #[serde(rename = "template.build.finish")]
    BuildFinish,
    #[serde(rename = "host.down")]
    HostDown,
}

impl EventKind {
    pub const ALL: [EventKind; 12] = [
        EventKind::CapsuleCreate,
        EventKind::CapsulePause,
        EventKind::CapsuleResume,
        EventKind::CapsuleDestroy,
        EventKind::CapsuleStateChanged,
        EventKind::SnapshotCreate,
        EventKind::SnapshotDelete,
        EventKind::HostUp,
        EventKind::HostDown,
        EventKind::BuildCreate,
        EventKind::BuildCancel,
        EventKind::BuildFinish,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::CapsuleCreate => "capsule.create",
            EventKind::CapsulePause => "capsule.pause",
            EventKind::CapsuleResume => "capsule.resume",
            EventKind::CapsuleDestroy => "capsule.destroy",
            EventKind::CapsuleStateChanged => "capsule.state.changed",
            EventKind::SnapshotCreate => "template.snapshot.create",
            EventKind::SnapshotDelete => "template.snapshot.delete",
            EventKind::HostUp => "host.up",
            EventKind::HostDown => "host.down",
            EventKind::BuildCreate => "template.build.create",
            EventKind::BuildCancel => "template.build.cancel",
            EventKind::BuildFinish => "template.build.finish",
        }
    }

    /// Events a notification channel may subscribe to: the spec's list (all but state changes
    /// and the build events, which only the admin event stream carries).
    pub fn for_channels() -> impl Iterator<Item = EventKind> {
        Self::ALL.into_iter().filter(|k| {
            !matches!(
                k,
                EventKind::CapsuleStateChanged
                    | EventKind::BuildCreate
                    | EventKind::BuildCancel
                    | EventKind::BuildFinish
            )
        })
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventResource {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EventActor {
    /// `user`, `api_key` or `system`.
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    pub name: String,
}

impl EventActor {
    pub fn system(name: &str) -> Self {
        Self {
            kind: "system".into(),
            id: "system".into(),
            name: name.into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub event: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    pub resource: EventResource,
    pub actor: EventActor,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The capsule as it is now (capsule events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<Capsule>,
    /// The team the event belongs to (`None`: platform-wide, e.g. a regular host).
    #[serde(default)]
    pub team_id: Option<String>,
    pub timestamp: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_kinds_keep_their_wire_names() {
        for k in EventKind::ALL {
            assert_eq!(EventKind::parse(k.as_str()), Some(k));
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert_eq!(EventKind::for_channels().count(), 8);
        assert!(EventKind::for_channels().all(|k| k != EventKind::CapsuleStateChanged));
    }
}
