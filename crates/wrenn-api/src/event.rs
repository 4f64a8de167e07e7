//! Platform events: what the SSE streams carry (the spec's `SSEEvent`).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::Capsule;

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
    pub event: String,
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
