//! The store against a real SQLite file.

use std::collections::BTreeMap;

use wrenn_api::{CapsuleStatus, CreateCapsuleRequest};
use wrenn_server::store::Store;

async fn fresh(name: &str) -> Store {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Store::open_sqlite(&dir.join("wrenn.db")).await.unwrap()
}

#[tokio::test]
async fn api_keys_resolve_to_their_team_only_by_hash() {
    let store = fresh("store-keys").await;
    store
        .create_admin_with_team("usr-1", "a@b.c", "A", "team-1", "A's Team", "aaaaaa-bbbbbb")
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
        .create_admin_with_team("usr-2", "a@b.c", "B", "team-2", "B's Team", "cccccc-dddddd")
        .await
        .is_err());
}

#[tokio::test]
async fn capsule_state_moves_only_along_allowed_transitions() {
    let store = fresh("store-capsules").await;
    store
        .create_admin_with_team("usr-1", "a@b.c", "A", "team-1", "A's Team", "aaaaaa-bbbbbb")
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
