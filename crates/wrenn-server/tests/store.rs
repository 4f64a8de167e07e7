//! The store against both backends: a real SQLite file and the real PostgreSQL of this machine
//! (`WRENN_TEST_POSTGRES_URL`, default `postgres://postgres@127.0.0.1:5432/postgres`; each test
//! gets its own database, dropped at the end).

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{Duration, NaiveDate, TimeZone, Utc};
use wrenn_api::{CapsuleStatus, CreateCapsuleRequest, ProxyAccess};
use wrenn_api::{HostStatus, UserStatus};
use wrenn_server::sealing::Sealer;
use wrenn_server::store::{NewTeam, NewTemplate, Store, TeamLoad};

#[macro_use]
mod common;
use common::*;

on_both_backends!(
    api_keys_resolve_to_their_team_only_by_hash,
    capsule_state_moves_only_along_allowed_transitions,
    activity_never_moves_backwards,
    templates_are_unique_per_team,
    stats_samples_peaks_usage_and_pruning,
    host_tokens_are_single_use_and_secrets_stable,
    audit_pages_follow_their_cursor_and_filters,
    channels_are_unique_per_team_and_deliveries_idempotent,
    a_lease_has_one_holder_until_it_expires,
    oauth_flows_are_single_use_and_bound_to_their_provider,
    proxy_access_defaults_private_and_token_generations_only_grow,
);

async fn proxy_access_defaults_private_and_token_generations_only_grow(store: Store) {
    team(&store).await;
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    store
        .insert_capsule("cl-1", "team-1", "host-1", &spec)
        .await
        .unwrap();
    assert!(store.proxy_access("cl-none").await.unwrap().is_none());
    let row = store.proxy_access("cl-1").await.unwrap().unwrap();
    assert_eq!(row.team_id, "team-1");
    assert_eq!(row.access, ProxyAccess::default());
    assert_eq!(row.token_generation, 0);
    // Revoking before any access was set creates the row.
    store.revoke_proxy_tokens("cl-1").await.unwrap();
    assert_eq!(
        store
            .proxy_access("cl-1")
            .await
            .unwrap()
            .unwrap()
            .token_generation,
        1
    );
    let public = ProxyAccess {
        public: false,
        public_ports: vec![80, 3000],
    };
    store.set_proxy_access("cl-1", &public).await.unwrap();
    let row = store.proxy_access("cl-1").await.unwrap().unwrap();
    assert_eq!(row.access, public);
    assert_eq!(row.token_generation, 1, "setting access keeps the tokens");
    store.revoke_proxy_tokens("cl-1").await.unwrap();
    let row = store.proxy_access("cl-1").await.unwrap().unwrap();
    assert_eq!((row.access, row.token_generation), (public, 2));
    let all = ProxyAccess {
        public: true,
        public_ports: vec![],
    };
    store.set_proxy_access("cl-1", &all).await.unwrap();
    assert_eq!(
        store.proxy_access("cl-1").await.unwrap().unwrap().access,
        all
    );
}

async fn oauth_flows_are_single_use_and_bound_to_their_provider(store: Store) {
    let now = Utc::now();
    let later = now + Duration::minutes(10);
    store
        .put_oauth_flow("s1", "github", None, later, now)
        .await
        .unwrap();
    store
        .put_oauth_flow("s2", "github", Some("usr-1"), later, now)
        .await
        .unwrap();
    assert!(store
        .take_oauth_flow("s1", "gitlab")
        .await
        .unwrap()
        .is_none());
    let (user, exp) = store
        .take_oauth_flow("s1", "github")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (user, exp.timestamp_millis()),
        (None, later.timestamp_millis())
    );
    assert!(
        store
            .take_oauth_flow("s1", "github")
            .await
            .unwrap()
            .is_none(),
        "single use"
    );
    let (user, _) = store
        .take_oauth_flow("s2", "github")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(user.as_deref(), Some("usr-1"));
    // Expired flows are forgotten when new ones start.
    store
        .put_oauth_flow(
            "old",
            "github",
            None,
            now - Duration::minutes(1),
            now - Duration::minutes(11),
        )
        .await
        .unwrap();
    store
        .put_oauth_flow("s3", "github", None, later, now)
        .await
        .unwrap();
    assert!(store
        .take_oauth_flow("old", "github")
        .await
        .unwrap()
        .is_none());
}

async fn a_lease_has_one_holder_until_it_expires(store: Store) {
    let t0 = Utc::now();
    let ttl = Duration::seconds(30);
    assert!(store.hold_lease("sampler", "cp-a", t0, ttl).await.unwrap());
    assert!(!store
        .hold_lease("sampler", "cp-b", t0 + Duration::seconds(10), ttl)
        .await
        .unwrap());
    // The holder renews; the other still waits.
    assert!(store
        .hold_lease("sampler", "cp-a", t0 + Duration::seconds(20), ttl)
        .await
        .unwrap());
    assert!(!store
        .hold_lease("sampler", "cp-b", t0 + Duration::seconds(40), ttl)
        .await
        .unwrap());
    // Another lease is independent.
    assert!(store.hold_lease("other", "cp-b", t0, ttl).await.unwrap());
    // Expired (the holder stopped renewing): the other takes it, and the first is refused.
    assert!(store
        .hold_lease("sampler", "cp-b", t0 + Duration::seconds(51), ttl)
        .await
        .unwrap());
    assert!(!store
        .hold_lease("sampler", "cp-a", t0 + Duration::seconds(52), ttl)
        .await
        .unwrap());
}

fn audit_entry(
    id: &str,
    team: Option<&str>,
    at: chrono::DateTime<Utc>,
    action: &str,
    scope: &str,
) -> wrenn_api::AuditLogEntry {
    wrenn_api::AuditLogEntry {
        id: id.into(),
        team_id: team.map(Into::into),
        actor_type: "user".into(),
        actor_id: "usr-1".into(),
        actor_name: "a@x.io".into(),
        resource_type: "capsule".into(),
        resource_id: "cl-1".into(),
        action: action.into(),
        scope: scope.into(),
        status: "success".into(),
        metadata: serde_json::json!({"reason": "ttl_expired", "n": 3})
            .as_object()
            .unwrap()
            .clone(),
        created_at: at,
    }
}

async fn audit_pages_follow_their_cursor_and_filters(store: Store) {
    use wrenn_server::store::AuditQuery;
    let t0 = Utc.with_ymd_and_hms(2026, 11, 30, 10, 0, 0).unwrap();
    // Five entries, two of them at the very same microsecond (the id breaks the tie), one
    // in another team and one platform-wide.
    let at = |us: i64| t0 + Duration::microseconds(us);
    for (id, team, t, action, scope) in [
        ("log-a", Some("team-1"), at(1), "create", "team"),
        ("log-b", Some("team-1"), at(2), "pause", "admin"),
        ("log-c", Some("team-1"), at(2), "resume", "team"),
        ("log-d", Some("team-1"), at(3), "destroy", "team"),
        ("log-e", Some("team-2"), at(4), "create", "team"),
        ("log-f", None, at(5), "marked_down", "admin"),
    ] {
        store
            .insert_audit(&audit_entry(id, team, t, action, scope))
            .await
            .unwrap();
    }
    let page = |before: Option<(chrono::DateTime<Utc>, String)>, limit| AuditQuery {
        team_id: Some("team-1".into()),
        before,
        limit,
        ..Default::default()
    };
    let first = store.audit_page(&page(None, 2)).await.unwrap();
    let ids: Vec<_> = first.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, ["log-d", "log-c"]);
    assert_eq!(first[0].metadata["n"], 3);
    assert_eq!(first[0].created_at, at(3), "microseconds survive");
    let last = first.last().unwrap();
    let second = store
        .audit_page(&page(Some((last.created_at, last.id.clone())), 2))
        .await
        .unwrap();
    let ids: Vec<_> = second.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(
        ids,
        ["log-b", "log-a"],
        "the tie at one instant is split by id"
    );
    // Members' view: team scope only.
    let q = AuditQuery {
        team_id: Some("team-1".into()),
        scopes: vec!["team".into()],
        limit: 10,
        ..Default::default()
    };
    assert_eq!(store.audit_page(&q).await.unwrap().len(), 3);
    // Filters; platform view.
    let q = AuditQuery {
        actions: vec!["create".into(), "marked_down".into()],
        limit: 10,
        ..Default::default()
    };
    let ids: Vec<_> = store
        .audit_page(&q)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(ids, ["log-f", "log-e", "log-a"]);
    let q = AuditQuery {
        resource_types: vec!["host".into()],
        limit: 10,
        ..Default::default()
    };
    assert!(store.audit_page(&q).await.unwrap().is_empty());

    // A purged user's entries stay, without their name.
    let user = "usr-gone".to_string();
    assert!(store
        .insert_user(
            &user,
            "gone@x.io",
            "Gone",
            None,
            UserStatus::Active,
            t0 - Duration::days(30)
        )
        .await
        .unwrap());
    let mut e = audit_entry("log-g", Some("team-1"), at(6), "create", "team");
    e.actor_id = user.clone();
    store.insert_audit(&e).await.unwrap();
    let mut added = audit_entry("log-h", Some("team-1"), at(7), "add", "team");
    added.resource_type = "member".into();
    added.resource_id = user.clone();
    added.metadata = serde_json::json!({"email": "gone@x.io"})
        .as_object()
        .unwrap()
        .clone();
    store.insert_audit(&added).await.unwrap();
    store
        .soft_delete_user(&user, &[], t0 - Duration::days(20))
        .await
        .unwrap();
    assert_eq!(
        store.purge_deleted_users(t0).await.unwrap(),
        vec![user.clone()]
    );
    let q = AuditQuery {
        team_id: Some("team-1".into()),
        limit: 2,
        ..Default::default()
    };
    let kept = store.audit_page(&q).await.unwrap();
    assert_eq!(kept[0].id, "log-h");
    assert!(kept[0].metadata.is_empty(), "no email left about them");
    assert_eq!(
        (kept[1].id.as_str(), kept[1].actor_name.as_str()),
        ("log-g", "deleted-user")
    );
}

async fn channels_are_unique_per_team_and_deliveries_idempotent(store: Store) {
    use wrenn_server::store::ChannelRow;
    let now = Utc::now();
    let row = |id: &str, team: &str, name: &str, events: &[&str]| ChannelRow {
        id: id.into(),
        team_id: team.into(),
        name: name.into(),
        provider: "webhook".into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        sealed_config: BTreeMap::from([("url".to_string(), "sealed".to_string())]),
        created_at: now,
        updated_at: now,
    };
    assert!(store
        .insert_channel(&row("ch-1", "team-1", "ops", &["capsule.create"]))
        .await
        .unwrap());
    assert!(!store
        .insert_channel(&row("ch-2", "team-1", "ops", &["host.down"]))
        .await
        .unwrap());
    assert!(store
        .insert_channel(&row("ch-3", "team-2", "ops", &["host.down"]))
        .await
        .unwrap());
    assert!(store
        .insert_channel(&row("ch-4", "team-1", "dev", &["host.down"]))
        .await
        .unwrap());
    assert!(
        store.channel("team-2", "ch-1").await.unwrap().is_none(),
        "another team's"
    );
    let teams = ["team-1".to_string(), "team-2".to_string()];
    let ids = |v: Vec<ChannelRow>| v.into_iter().map(|c| c.id).collect::<Vec<_>>();
    assert_eq!(
        ids(store
            .subscribed_channels(&teams, "host.down")
            .await
            .unwrap()),
        ["ch-3", "ch-4"]
    );
    assert_eq!(
        ids(store
            .subscribed_channels(&teams[..1], "capsule.create")
            .await
            .unwrap()),
        ["ch-1"]
    );
    // Renaming onto a taken name is refused; an unknown channel is None.
    let ev = ["host.up".to_string()];
    assert_eq!(
        store
            .update_channel("team-1", "ch-4", "ops", &ev, now)
            .await
            .unwrap(),
        Some(false)
    );
    assert_eq!(
        store
            .update_channel("team-1", "ch-4", "dev2", &ev, now)
            .await
            .unwrap(),
        Some(true)
    );
    assert_eq!(
        store
            .update_channel("team-2", "ch-4", "x", &ev, now)
            .await
            .unwrap(),
        None
    );
    // A delivery id is recorded once.
    assert!(store
        .insert_delivery("d-1", "ch-1", "capsule.create", now)
        .await
        .unwrap());
    assert!(!store
        .insert_delivery("d-1", "ch-1", "capsule.create", now)
        .await
        .unwrap());
    store
        .update_delivery("d-1", "delivered", 3, None, now)
        .await
        .unwrap();
    let d = store.delivery("d-1").await.unwrap().unwrap();
    assert_eq!((d.status.as_str(), d.attempts), ("delivered", 3));
    assert_eq!(store.deliveries("ch-1", 10).await.unwrap().len(), 1);
    assert!(store.delete_channel("team-1", "ch-1").await.unwrap());
    assert!(store.deliveries("ch-1", 10).await.unwrap().is_empty());
    assert!(!store.delete_channel("team-1", "ch-1").await.unwrap());
}

async fn host_tokens_are_single_use_and_secrets_stable(store: Store) {
    let now = Utc::now();
    let host = wrenn_api::Host {
        id: "host-1".into(),
        kind: "regular".into(),
        team_id: None,
        provider: None,
        availability_zone: None,
        arch: None,
        cpu_cores: None,
        memory_mb: None,
        disk_gb: None,
        address: None,
        status: HostStatus::Pending,
        last_heartbeat_at: None,
        created_by: "usr-1".into(),
        created_at: now,
        updated_at: now,
    };
    store.insert_host(&host).await.unwrap();
    // Registration: one use; a newer token replaces older ones.
    store
        .put_host_token(
            "r1",
            "host-1",
            "registration",
            now + Duration::hours(1),
            now,
        )
        .await
        .unwrap();
    store
        .put_host_token(
            "r2",
            "host-1",
            "registration",
            now + Duration::hours(1),
            now,
        )
        .await
        .unwrap();
    assert!(store.take_registration_token("r1").await.unwrap().is_none());
    assert_eq!(
        store
            .take_registration_token("r2")
            .await
            .unwrap()
            .unwrap()
            .0,
        "host-1"
    );
    assert!(store.take_registration_token("r2").await.unwrap().is_none());
    // Refresh: revoked on use; expired ones never work.
    store
        .put_host_token("f1", "host-1", "refresh", now + Duration::days(60), now)
        .await
        .unwrap();
    store
        .put_host_token("f2", "host-1", "refresh", now - Duration::seconds(1), now)
        .await
        .unwrap();
    assert_eq!(
        store
            .revoke_refresh_token("f1", now)
            .await
            .unwrap()
            .as_deref(),
        Some("host-1")
    );
    assert!(store
        .revoke_refresh_token("f1", now)
        .await
        .unwrap()
        .is_none());
    assert!(store
        .revoke_refresh_token("f2", now)
        .await
        .unwrap()
        .is_none());
    // Status moves only from the states named.
    assert!(!store
        .set_host_status(
            "host-1",
            HostStatus::Unreachable,
            &[HostStatus::Online],
            now
        )
        .await
        .unwrap());
    assert!(store
        .set_host_status("host-1", HostStatus::Online, &[], now)
        .await
        .unwrap());
    assert!(store
        .set_host_status(
            "host-1",
            HostStatus::Unreachable,
            &[HostStatus::Online],
            now
        )
        .await
        .unwrap());
    // Tags and deletion.
    store.add_host_tag("host-1", "gpu").await.unwrap();
    store.add_host_tag("host-1", "gpu").await.unwrap();
    assert_eq!(store.host_tags("host-1").await.unwrap(), ["gpu"]);
    assert!(store.delete_host("host-1").await.unwrap());
    assert!(store.host("host-1").await.unwrap().is_none());
    // A platform secret is made once; later callers read the first value.
    let a = store.platform_secret("k", || "first".into()).await.unwrap();
    let b = store
        .platform_secret("k", || "second".into())
        .await
        .unwrap();
    assert_eq!((a.as_str(), b.as_str()), ("first", "first"));
    // With a sealer, values are stored sealed; a plaintext one is sealed in place the first
    // time it is read; another key, or none, cannot open them.
    let key = |hex: &str| Arc::new(Sealer::from_hex(&hex.repeat(32)).unwrap());
    let sealed = store.clone().seal_secrets_with(key("ab"));
    assert_eq!(
        sealed
            .platform_secret("k", || unreachable!())
            .await
            .unwrap(),
        "first"
    );
    assert!(store
        .stored_secret("k")
        .await
        .unwrap()
        .unwrap()
        .starts_with("sealed:"));
    assert_eq!(
        sealed
            .platform_secret("k", || unreachable!())
            .await
            .unwrap(),
        "first"
    );
    assert_eq!(
        sealed.platform_secret("k2", || "new".into()).await.unwrap(),
        "new"
    );
    let raw = store.stored_secret("k2").await.unwrap().unwrap();
    assert!(raw.starts_with("sealed:") && !raw.contains("new"), "{raw}");
    let other = store.clone().seal_secrets_with(key("cd"));
    assert!(other
        .platform_secret("k2", || unreachable!())
        .await
        .is_err());
    assert!(store
        .platform_secret("k2", || unreachable!())
        .await
        .is_err());
}

async fn team(store: &Store) {
    store
        .create_admin_with_team(
            "usr-1",
            "a@b.c",
            "A",
            None,
            NewTeam {
                id: "team-1",
                name: "A's Team",
                slug: "aaaaaa-bbbbbb",
            },
        )
        .await
        .unwrap();
}

async fn activity_never_moves_backwards(store: Store) {
    team(&store).await;
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    store
        .insert_capsule("cl-1", "team-1", "host-1", &spec)
        .await
        .unwrap();
    let t1 = Utc.with_ymd_and_hms(2030, 1, 1, 0, 0, 10).unwrap();
    let t0 = t1 - Duration::seconds(5);
    store
        .record_activity(&[("cl-1".to_string(), t1)])
        .await
        .unwrap();
    store
        .record_activity(&[("cl-1".to_string(), t0), ("cl-unknown".to_string(), t0)])
        .await
        .unwrap();
    let c = store.capsule("cl-1").await.unwrap().unwrap().capsule;
    assert_eq!(c.last_active_at, Some(t1));
    store.touch_capsule("cl-1").await.unwrap();
    store.set_pause_reason("cl-1", "ttl_expired").await.unwrap();
    assert_eq!(
        store.pause_reason("cl-1").await.unwrap().as_deref(),
        Some("ttl_expired")
    );
}

async fn templates_are_unique_per_team(store: Store) {
    team(&store).await;
    let t = NewTemplate {
        team_id: "team-1",
        name: "py",
        snapshot_id: "snap-1",
        host_id: "host-1",
        source_capsule: "cl-1",
        vcpus: 2,
        memory_mb: 1024,
        disk_size_mb: 5120,
        size_bytes: 123_456_789_012,
        origin: Default::default(),
    };
    assert!(store.insert_template(&t).await.unwrap());
    assert!(!store
        .insert_template(&NewTemplate {
            snapshot_id: "snap-2",
            origin: Default::default(),
            ..t
        })
        .await
        .unwrap());
    let row = store.template("team-1", "py").await.unwrap().unwrap();
    assert_eq!(row.snapshot_id, "snap-1");
    assert_eq!(row.template.size_bytes, 123_456_789_012);
    assert_eq!(row.template.vcpus, Some(2));
    assert_eq!(store.list_templates("team-1").await.unwrap().len(), 1);
    assert!(store.template("team-2", "py").await.unwrap().is_none());
    // Copies on other hosts: recorded once, orphaned when their template goes.
    for _ in 0..2 {
        store
            .add_template_copy("snap-1", "host-b", 5_000_000_000)
            .await
            .unwrap();
    }
    store
        .add_template_copy("snap-1", "host-c", 1)
        .await
        .unwrap();
    assert_eq!(
        store.template_copies("snap-1").await.unwrap(),
        ["host-b", "host-c"]
    );
    assert!(store.orphaned_template_copies().await.unwrap().is_empty());
    assert_eq!(
        store.template_copy_bytes("snap-1").await.unwrap(),
        5_000_000_001
    );
    assert!(store
        .delete_template("team-1", "py")
        .await
        .unwrap()
        .is_some());
    let orphans = store.orphaned_template_copies().await.unwrap();
    assert_eq!(orphans.len(), 2, "{orphans:?}");
    store
        .remove_template_copy("snap-1", "host-b")
        .await
        .unwrap();
    assert_eq!(store.template_copies("snap-1").await.unwrap(), ["host-c"]);
    assert!(store
        .delete_template("team-1", "py")
        .await
        .unwrap()
        .is_none());
}

async fn stats_samples_peaks_usage_and_pruning(store: Store) {
    team(&store).await;
    let spec = CreateCapsuleRequest {
        vcpus: Some(2),
        memory_mb: Some(512),
        ..Default::default()
    }
    .validate()
    .unwrap();
    store
        .insert_capsule("cl-1", "team-1", "host-1", &spec)
        .await
        .unwrap();
    store
        .insert_capsule("cl-2", "team-1", "host-1", &spec)
        .await
        .unwrap();
    store
        .transition("cl-2", &[CapsuleStatus::Starting], CapsuleStatus::Paused)
        .await
        .unwrap();
    let now = TeamLoad {
        running: 1,
        vcpus: 2,
        memory_mb: 512,
    };
    assert_eq!(store.team_load("team-1").await.unwrap(), now);
    assert_eq!(
        store.load_by_team().await.unwrap(),
        vec![("team-1".to_string(), now)]
    );

    let t0 = Utc.with_ymd_and_hms(2030, 1, 1, 12, 0, 0).unwrap();
    let big = TeamLoad {
        running: 3,
        vcpus: 6,
        memory_mb: 1536,
    };
    store
        .insert_stats_samples(t0, &[("team-1".to_string(), big)])
        .await
        .unwrap();
    store
        .insert_stats_samples(t0 + Duration::seconds(10), &[("team-1".to_string(), now)])
        .await
        .unwrap();
    let samples = store
        .stats_samples("team-1", t0 + Duration::seconds(1))
        .await
        .unwrap();
    assert_eq!(samples, vec![(t0 + Duration::seconds(10), now)]);
    assert_eq!(store.stats_peaks("team-1", t0).await.unwrap(), big);
    assert_eq!(
        store.stats_peaks("team-2", t0).await.unwrap(),
        TeamLoad::default()
    );
    assert_eq!(
        store
            .prune_stats_samples(t0 + Duration::seconds(5))
            .await
            .unwrap(),
        1
    );

    let day = NaiveDate::from_ymd_opt(2030, 1, 1).unwrap();
    for _ in 0..3 {
        store
            .add_usage(day, &[("team-1".to_string(), 0.5, 128.25)])
            .await
            .unwrap();
    }
    let days = store
        .usage_days("team-1", day - Duration::days(1), day)
        .await
        .unwrap();
    assert_eq!(days, vec![(day, 1.5, 384.75)]);
    assert!(store
        .usage_days("team-1", day + Duration::days(1), day + Duration::days(2))
        .await
        .unwrap()
        .is_empty());
}

async fn api_keys_resolve_to_their_team_only_by_hash(store: Store) {
    store
        .create_admin_with_team(
            "usr-1",
            "a@b.c",
            "A",
            None,
            NewTeam {
                id: "team-1",
                name: "A's Team",
                slug: "aaaaaa-bbbbbb",
            },
        )
        .await
        .unwrap();
    store
        .create_api_key(
            "key-1",
            "team-1",
            "k",
            "hash-1",
            "wrn_123456",
            Some("usr-1"),
        )
        .await
        .unwrap();
    let owner = store.api_key_by_hash("hash-1").await.unwrap().unwrap();
    assert_eq!(
        (owner.key_id.as_str(), owner.team_id.as_str()),
        ("key-1", "team-1")
    );
    assert!(store.api_key_by_hash("hash-2").await.unwrap().is_none());
    assert_eq!(store.count_users().await.unwrap(), 1);
    // The same email twice is refused by the database itself.
    assert!(store
        .create_admin_with_team(
            "usr-2",
            "a@b.c",
            "B",
            None,
            NewTeam {
                id: "team-2",
                name: "B's Team",
                slug: "cccccc-dddddd"
            }
        )
        .await
        .is_err());
}

async fn capsule_state_moves_only_along_allowed_transitions(store: Store) {
    store
        .create_admin_with_team(
            "usr-1",
            "a@b.c",
            "A",
            None,
            NewTeam {
                id: "team-1",
                name: "A's Team",
                slug: "aaaaaa-bbbbbb",
            },
        )
        .await
        .unwrap();
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    let row = store
        .insert_capsule("cl-1", "team-1", "host-1", &spec)
        .await
        .unwrap();
    assert_eq!(row.capsule.status, CapsuleStatus::Starting);
    assert_eq!(row.capsule.started_at, None);
    assert_eq!(store.list_live_capsules("team-1").await.unwrap().len(), 1);
    assert!(store.list_live_capsules("team-2").await.unwrap().is_empty());

    let meta: BTreeMap<String, String> = [("envd_version".to_string(), "0.1.0".to_string())].into();
    assert!(store
        .mark_running("cl-1", "10.200.0.2", "10.201.0.2", &meta)
        .await
        .unwrap());
    // Only a starting capsule becomes running.
    assert!(!store.mark_running("cl-1", "x", "y", &meta).await.unwrap());
    let c = store.capsule("cl-1").await.unwrap().unwrap().capsule;
    assert_eq!(c.status, CapsuleStatus::Running);
    assert_eq!(c.host_ip, "10.201.0.2");
    assert_eq!(c.metadata.unwrap()["envd_version"], "0.1.0");
    assert!(c.started_at.is_some() && c.last_active_at.is_some());

    assert!(store
        .transition("cl-1", &[CapsuleStatus::Running], CapsuleStatus::Stopping)
        .await
        .unwrap());
    assert!(!store
        .transition("cl-1", &[CapsuleStatus::Running], CapsuleStatus::Stopping)
        .await
        .unwrap());
    assert!(store
        .transition("cl-1", &[CapsuleStatus::Stopping], CapsuleStatus::Stopped)
        .await
        .unwrap());
    // Terminal states are not left, and stopped capsules leave the list but keep their row.
    store.mark_error("cl-1", "late failure").await.unwrap();
    let row = store.capsule("cl-1").await.unwrap().unwrap();
    assert_eq!(row.capsule.status, CapsuleStatus::Stopped);
    assert!(row.error.is_none());
    assert!(store.list_live_capsules("team-1").await.unwrap().is_empty());
    assert_eq!(
        store
            .capsules_on_host("host-1", &[CapsuleStatus::Stopped])
            .await
            .unwrap()
            .len(),
        1
    );
}
