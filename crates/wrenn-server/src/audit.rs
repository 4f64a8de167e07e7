//! The audit log: who did what to which resource, when, and whether it worked.
//!
//! Every state-changing action writes one entry where it happens: capsule, snapshot and host
//! liveness entries come from the events the capsule service publishes ([`from_event`]); keys,
//! members, teams, users, hosts and channels write theirs in their services. Writing an entry
//! never fails the action: a database error is logged and the action stands.
//!
//! Scopes: `team` entries (what the team's members and keys did, and the system did to the
//! team's capsules) are shown to every member; `admin` entries (what platform admins did to
//! the team or its users through the admin API, platform hosts) to the team's owners and
//! admins. Platform admins see everything.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use wrenn_api::id::new_id;
use wrenn_api::{ApiError, AuditCursor, AuditLogEntry, AuditLogPage, Event, EventActor, EventKind};

use crate::store::{AuditQuery, Store};

pub const ID_PREFIX: &str = "log-";
pub const DEFAULT_PAGE: u32 = 50;
pub const MAX_PAGE: u32 = 200;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Team,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Team => "team",
            Scope::Admin => "admin",
        }
    }
}

/// One entry to write; build with [`Record::new`] and the chained setters.
#[derive(Debug, Clone)]
pub struct Record {
    team_id: Option<String>,
    actor: EventActor,
    resource_type: String,
    resource_id: String,
    action: String,
    scope: Scope,
    ok: bool,
    metadata: Map<String, Value>,
}

impl Record {
    pub fn new(actor: &EventActor, resource_type: &str, resource_id: &str, action: &str) -> Self {
        Self {
            team_id: None,
            actor: actor.clone(),
            resource_type: resource_type.into(),
            resource_id: resource_id.into(),
            action: action.into(),
            scope: Scope::Team,
            ok: true,
            metadata: Map::new(),
        }
    }

    pub fn team(mut self, team_id: Option<&str>) -> Self {
        self.team_id = team_id.map(Into::into);
        self
    }

    pub fn admin(mut self) -> Self {
        self.scope = Scope::Admin;
        self
    }

    /// Marks the action failed, keeping why.
    pub fn failed(mut self, error: &str) -> Self {
        self.ok = false;
        self.metadata.insert("error".into(), error.into());
        self
    }

    pub fn meta(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }
}

/// The audit entry an event stands for, if any: capsule actions (auto-pause by the TTL reaper
/// included), snapshot templates, hosts marked down and up. State changes are not entries of
/// their own: the action or host event that caused them is.
pub fn from_event(ev: &Event) -> Option<Record> {
    // A team's own (BYOC) host concerns its members; a platform host its operators.
    let host_scope = if ev.team_id.is_some() {
        Scope::Team
    } else {
        Scope::Admin
    };
    let (resource, action, scope) = match ev.event {
        EventKind::CapsuleCreate => ("capsule", "create", Scope::Team),
        EventKind::CapsulePause => ("capsule", "pause", Scope::Team),
        EventKind::CapsuleResume => ("capsule", "resume", Scope::Team),
        EventKind::CapsuleDestroy => ("capsule", "destroy", Scope::Team),
        EventKind::SnapshotCreate => ("snapshot", "create", Scope::Team),
        EventKind::SnapshotDelete => ("snapshot", "delete", Scope::Team),
        EventKind::HostDown => ("host", "marked_down", host_scope),
        EventKind::HostUp => ("host", "marked_up", host_scope),
        EventKind::BuildCreate => ("build", "create", Scope::Admin),
        EventKind::BuildCancel => ("build", "cancel", Scope::Admin),
        EventKind::BuildFinish => ("build", "finish", Scope::Admin),
        EventKind::CapsuleStateChanged => return None,
    };
    let mut r =
        Record::new(&ev.actor, resource, &ev.resource.id, action).team(ev.team_id.as_deref());
    if scope == Scope::Admin {
        r = r.admin();
    }
    for (k, v) in &ev.metadata {
        r = r.meta(k, v.as_str());
    }
    if ev.outcome.as_deref() == Some("error") {
        r = r.failed(ev.error.as_deref().unwrap_or("failed"));
    }
    Some(r)
}

/// Who reads a page, and so which entries it may hold.
pub enum Reader {
    /// A member of `team_id`; `elevated` (owner or admin) also sees admin-scope entries.
    Team { team_id: String, elevated: bool },
    /// A platform admin: every team's entries and platform-wide ones.
    Platform,
}

/// The query of a page: `before` + `before_id` (cursor), `limit`, and filters `resource_type`
/// and `action` (each repeated or comma-separated; admins also `team_id`).
#[derive(Debug, Default)]
pub struct PageParams {
    pub before: Option<DateTime<Utc>>,
    pub before_id: Option<String>,
    pub limit: u32,
    pub resource_types: Vec<String>,
    pub actions: Vec<String>,
    pub team_id: Option<String>,
}

impl PageParams {
    /// Parses a raw query string; anything malformed is a 400 naming the parameter.
    pub fn parse(query: Option<&str>) -> Result<Self, ApiError> {
        let mut p = PageParams {
            limit: DEFAULT_PAGE,
            ..Default::default()
        };
        for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match k.as_ref() {
                "before" => {
                    p.before = Some(
                        DateTime::parse_from_rfc3339(&v)
                            .map(|t| t.with_timezone(&Utc))
                            .map_err(|_| {
                                ApiError::invalid(format!(
                                    "before must be an RFC 3339 date-time, got {v:?}"
                                ))
                            })?,
                    )
                }
                "before_id" => p.before_id = Some(v.into_owned()),
                "limit" => {
                    p.limit = v
                        .parse::<u32>()
                        .ok()
                        .filter(|n| (1..=MAX_PAGE).contains(n))
                        .ok_or_else(|| {
                            ApiError::invalid(format!(
                                "limit must be an integer from 1 to {MAX_PAGE}, got {v:?}"
                            ))
                        })?
                }
                "resource_type" => p.resource_types.extend(split_list(&v)),
                "action" => p.actions.extend(split_list(&v)),
                "team_id" => p.team_id = Some(v.into_owned()),
                _ => {}
            }
        }
        if p.before_id.is_some() && p.before.is_none() {
            return Err(ApiError::invalid(
                "before_id needs before: pass both from next_cursor",
            ));
        }
        Ok(p)
    }
}

fn split_list(v: &str) -> impl Iterator<Item = String> + '_ {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
}

#[derive(Clone)]
pub struct AuditLog {
    store: Store,
}

impl AuditLog {
    pub fn new(store: Store) -> Self {
        Self { store }
    }

    /// Writes an entry now; a failure is logged, never returned.
    pub async fn record(&self, r: Record) {
        let entry = AuditLogEntry {
            id: new_id(ID_PREFIX),
            team_id: r.team_id,
            actor_type: r.actor.kind,
            actor_id: r.actor.id,
            actor_name: r.actor.name,
            resource_type: r.resource_type,
            resource_id: r.resource_id,
            action: r.action,
            scope: r.scope.as_str().into(),
            status: if r.ok { "success" } else { "failure" }.into(),
            metadata: r.metadata,
            created_at: Utc::now(),
        };
        if let Err(e) = self.store.insert_audit(&entry).await {
            tracing::warn!(error = %e, action = %entry.action, resource_id = %entry.resource_id, "audit entry not written");
        }
    }

    /// One page, newest first, with the cursor of the next one (`None` at the end).
    pub async fn page(&self, reader: Reader, p: PageParams) -> Result<AuditLogPage, ApiError> {
        let (team_id, scopes) = match reader {
            Reader::Team { team_id, elevated } => (
                Some(team_id),
                if elevated {
                    vec![]
                } else {
                    vec![Scope::Team.as_str().to_string()]
                },
            ),
            Reader::Platform => (p.team_id.clone(), vec![]),
        };
        let q = AuditQuery {
            team_id,
            scopes,
            resource_types: p.resource_types,
            actions: p.actions,
            before: p.before.map(|t| (t, p.before_id.unwrap_or_default())),
            // One more than asked tells whether another page exists.
            limit: p.limit + 1,
        };
        let mut entries = self.store.audit_page(&q).await?;
        let next_cursor = if entries.len() > p.limit as usize {
            entries.truncate(p.limit as usize);
            entries.last().map(|e| AuditCursor {
                before: e.created_at,
                before_id: e.id.clone(),
            })
        } else {
            None
        };
        Ok(AuditLogPage {
            entries,
            next_cursor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_params_are_checked() {
        let p = PageParams::parse(None).unwrap();
        assert_eq!(p.limit, 50);
        let p = PageParams::parse(Some(
            "limit=200&action=create,pause&action=destroy&resource_type=capsule",
        ))
        .unwrap();
        assert_eq!(p.limit, 200);
        assert_eq!(p.actions, ["create", "pause", "destroy"]);
        assert_eq!(p.resource_types, ["capsule"]);
        for bad in [
            "limit=0",
            "limit=201",
            "limit=x",
            "before=yesterday",
            "before_id=log-1",
        ] {
            assert!(PageParams::parse(Some(bad)).is_err(), "{bad}");
        }
        let p =
            PageParams::parse(Some("before=2026-11-30T10:00:00.123456Z&before_id=log-a")).unwrap();
        assert_eq!(p.before.unwrap().timestamp_subsec_micros(), 123456);
    }

    #[test]
    fn events_map_to_entries() {
        let ev = Event {
            event: EventKind::CapsulePause,
            outcome: Some("error".into()),
            resource: wrenn_api::EventResource {
                id: "cl-1".into(),
                kind: "capsule".into(),
            },
            actor: EventActor::system("ttl-reaper"),
            metadata: [("reason".to_string(), "ttl_expired".to_string())].into(),
            error: Some("boom".into()),
            sandbox: None,
            team_id: Some("team-1".into()),
            timestamp: Utc::now(),
        };
        let r = from_event(&ev).unwrap();
        assert_eq!(
            (r.resource_type.as_str(), r.action.as_str()),
            ("capsule", "pause")
        );
        assert!(!r.ok);
        assert_eq!(r.metadata["reason"], "ttl_expired");
        assert_eq!(r.metadata["error"], "boom");
        let mut ev = ev;
        ev.event = EventKind::CapsuleStateChanged;
        assert!(from_event(&ev).is_none());
        ev.event = EventKind::HostDown;
        assert_eq!(from_event(&ev).unwrap().scope, Scope::Team);
        ev.team_id = None;
        assert_eq!(from_event(&ev).unwrap().scope, Scope::Admin);
        assert_eq!(from_event(&ev).unwrap().action, "marked_down");
    }
}
