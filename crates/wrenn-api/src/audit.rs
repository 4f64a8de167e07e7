//! The audit log's wire types (the spec's `AuditLogEntry` and its page).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditLogEntry {
    pub id: String,
    /// The team the entry is about (`None`: platform-wide, e.g. a regular host).
    pub team_id: Option<String>,
    /// `user`, `api_key`, `host` or `system`.
    pub actor_type: String,
    pub actor_id: String,
    pub actor_name: String,
    pub resource_type: String,
    pub resource_id: String,
    pub action: String,
    /// `team` (every member sees it) or `admin` (owners, admins and platform admins).
    pub scope: String,
    /// `success` or `failure`.
    pub status: String,
    pub metadata: serde_json::Map<String, serde_json::Value>,
    pub created_at: DateTime<Utc>,
}

/// Where the next (older) page starts.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditCursor {
    pub before: DateTime<Utc>,
    pub before_id: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditLogPage {
    pub entries: Vec<AuditLogEntry>,
    /// `None` on the last page.
    pub next_cursor: Option<AuditCursor>,
}
