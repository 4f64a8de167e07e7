//! The capsule service's races and failure paths against an in-memory host
//! (`wrenn_host::testing::FakeHost`) and a real SQLite file: no VM, each test well under a
//! second. The real-VM paths are covered end to end by `tests/e2e`.

use std::sync::Arc;
use std::time::Duration;

use wrenn_api::{
    Capsule, CapsuleStatus, CreateCapsuleRequest, ErrorCode, Event, EventActor, ExecRequest,
};
use wrenn_host::testing::FakeHost;
use wrenn_host::{HostCapacity, HostError, Phase};

use super::{CapsuleService, ExecOutcome};
use crate::events::EventBus;
use crate::hosts::pool::{HostPool, Overcommit};
use crate::store::{NewTeam, Store};

struct World {
    svc: CapsuleService,
    host: Arc<FakeHost>,
    store: Store,
    bus: Arc<EventBus>,
    team: String,
}

fn user() -> EventActor {
    EventActor {
        kind: "user".into(),
        id: "usr-test".into(),
        name: "test@example.test".into(),
    }
}

/// A control plane's capsule service with one online host (the fake) and one team.
async fn world(name: &str) -> World {
    let dir =
        std::env::temp_dir().join(format!("wrenn-capsule-tests-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let store = Store::open_sqlite(&dir.join("wrenn.db")).await.unwrap();
    let capacity = HostCapacity {
        cpus: 4,
        memory_mb: 8192,
        disk_free_mb: 100_000,
        disk_reserve_mb: 0,
    };
    let host_id = crate::hosts::ensure_embedded_host(&store, &dir, &capacity)
        .await
        .unwrap();
    let host = FakeHost::new();
    let pool = HostPool::new(store.clone(), None, Overcommit::default());
    pool.add(&host_id, host.clone());
    let team = "team-capsuletests000000000001".to_string();
    store
        .create_admin_with_team(
            "usr-capsuletests0000000000001",
            "admin@example.test",
            "Admin",
            None,
            NewTeam {
                id: &team,
                name: "Test",
                slug: "aaaaaa-bbbbbb",
            },
        )
        .await
        .unwrap();
    let bus = Arc::new(EventBus::local());
    let svc = CapsuleService::new(store.clone(), Arc::new(pool), bus.clone());
    World {
        svc,
        host,
        store,
        bus,
        team,
    }
}

impl World {
    async fn status(&self, id: &str) -> CapsuleStatus {
        self.svc.get(&self.team, id).await.unwrap().status
    }

    /// Waits (bounded) until the capsule is `want`.
    async fn wait_for(&self, id: &str, want: CapsuleStatus) -> Capsule {
        for _ in 0..500 {
            let c = self.svc.get(&self.team, id).await.unwrap();
            if c.status == want {
                return c;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "capsule {id} is {:?}, never {want:?}",
            self.status(id).await
        );
    }

    async fn create(&self, timeout_sec: i64) -> Capsule {
        let req = CreateCapsuleRequest {
            timeout_sec: Some(timeout_sec),
            ..Default::default()
        };
        self.svc.create(&self.team, req, &user()).await.unwrap()
    }

    async fn running(&self) -> String {
        let c = self.create(0).await;
        self.wait_for(&c.id, CapsuleStatus::Running).await;
        c.id
    }
}

/// Events published so far on `rx`, as `event[:outcome or to]`.
fn drain(rx: &mut tokio::sync::broadcast::Receiver<Arc<Event>>) -> Vec<String> {
    let mut out = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        let detail = ev
            .outcome
            .clone()
            .or_else(|| ev.metadata.get("to").cloned())
            .unwrap_or_default();
        out.push(format!("{}:{detail}", ev.event));
    }
    out
}

#[tokio::test]
async fn a_destroy_during_create_leaves_no_vm_behind() {
    let w = world("destroy-during-create").await;
    w.host.hold("create");
    let c = w.create(0).await;
    assert_eq!(c.status, CapsuleStatus::Starting);
    w.host.waiting("create", 1).await;

    let d = w.svc.destroy(&w.team, &c.id, &user()).await.unwrap();
    assert!(
        matches!(d.status, CapsuleStatus::Stopping | CapsuleStatus::Stopped),
        "{:?}",
        d.status
    );
    w.wait_for(&c.id, CapsuleStatus::Stopped).await;
    // The host finishes the create after all: the VM nobody wants is destroyed at once.
    w.host.release("create");
    for _ in 0..500 {
        if w.host.capsule(&c.id).is_none() && w.host.count("destroy") == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(w.host.capsule(&c.id).is_none(), "{:?}", w.host.calls());
    assert_eq!(w.host.count("destroy"), 2, "{:?}", w.host.calls());
    assert_eq!(w.status(&c.id).await, CapsuleStatus::Stopped);
}

#[tokio::test]
async fn a_pause_during_a_running_exec_ends_the_exec_instead_of_hanging_it() {
    let w = Arc::new(world("pause-during-exec").await);
    let id = w.running().await;
    w.host.hold("exec");
    let exec = {
        let (w, id) = (w.clone(), id.clone());
        tokio::spawn(async move {
            let req = ExecRequest {
                cmd: "sleep 100".into(),
                args: vec![],
                timeout_sec: None,
                background: false,
                tag: None,
                envs: Default::default(),
                cwd: None,
            };
            w.svc.exec(&w.team, &id, req).await
        })
    };
    w.host.waiting("exec", 1).await;
    assert!(
        w.svc.activity.is_busy(&id),
        "an attached exec holds the capsule"
    );
    // The inactivity timer never pauses a capsule with a command attached…
    assert!(w.svc.idle_capsules().await.unwrap().is_empty());

    // …but the user may.
    let p = w.svc.pause(&w.team, &id, &user()).await.unwrap();
    // The fake host pauses at once: the answer may already say so.
    assert!(
        matches!(p.status, CapsuleStatus::Pausing | CapsuleStatus::Paused),
        "{:?}",
        p.status
    );
    w.wait_for(&id, CapsuleStatus::Paused).await;
    let out = tokio::time::timeout(Duration::from_secs(5), exec)
        .await
        .expect("the exec ended with its VM")
        .unwrap();
    match out {
        Err(e) => assert_eq!(e.code, ErrorCode::AgentError, "{}", e.message),
        Ok(ExecOutcome::Foreground(r)) => panic!("the exec finished: {r:?}"),
        Ok(ExecOutcome::Background(_)) => panic!("not a background exec"),
    }
    assert!(!w.svc.activity.is_busy(&id), "the ended exec let go");
    w.host.release("exec");
}

#[tokio::test]
async fn a_host_failure_mid_create_marks_the_capsule_error_and_says_so() {
    let w = world("host-failure-mid-create").await;
    let mut rx = w.bus.subscribe();
    w.host
        .fail_next("create", HostError::Vmm("VM exited during boot".into()));
    let c = w.create(0).await;
    w.wait_for(&c.id, CapsuleStatus::Error).await;
    let row = w.store.capsule(&c.id).await.unwrap().unwrap();
    assert!(
        row.error
            .as_deref()
            .unwrap_or_default()
            .contains("VM exited during boot"),
        "{:?}",
        row.error
    );
    assert!(w.host.capsule(&c.id).is_none());
    let mut seen = Vec::new();
    for _ in 0..500 {
        seen.extend(drain(&mut rx));
        if seen.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        seen,
        [
            "capsule.create:error",
            "capsule.state.changed:error",
            "capsule.destroy:success"
        ]
    );

    // A host that cannot be reached at all fails the same way.
    w.host.fail_next(
        "create",
        HostError::Unreachable("connection refused".into()),
    );
    let c = w.create(0).await;
    w.wait_for(&c.id, CapsuleStatus::Error).await;
    let row = w.store.capsule(&c.id).await.unwrap().unwrap();
    assert!(row.error.unwrap_or_default().contains("connection refused"));
}

#[tokio::test]
async fn a_second_resume_while_one_is_in_flight_is_refused() {
    let w = world("double-resume").await;
    let id = w.running().await;
    w.svc.pause(&w.team, &id, &user()).await.unwrap();
    w.wait_for(&id, CapsuleStatus::Paused).await;

    w.host.hold("resume");
    let first = w.svc.resume(&w.team, &id, &user()).await.unwrap();
    assert_eq!(first.status, CapsuleStatus::Resuming);
    w.host.waiting("resume", 1).await;
    let second = w.svc.resume(&w.team, &id, &user()).await.unwrap_err();
    assert_eq!(second.code, ErrorCode::InvalidState, "{}", second.message);

    w.host.release("resume");
    w.wait_for(&id, CapsuleStatus::Running).await;
    assert_eq!(w.host.count("resume"), 1, "{:?}", w.host.calls());
    assert_eq!(w.host.capsule(&id).unwrap().phase, Phase::Running);
    // And once running, a resume is refused too.
    let third = w.svc.resume(&w.team, &id, &user()).await.unwrap_err();
    assert_eq!(third.code, ErrorCode::InvalidState);
}

#[tokio::test]
async fn a_ping_that_lands_while_the_reaper_decides_keeps_the_capsule_running() {
    let w = world("reaper-vs-ping").await;
    let pinged = w.create(60).await.id;
    let idle = w.create(60).await.id;
    w.wait_for(&pinged, CapsuleStatus::Running).await;
    w.wait_for(&idle, CapsuleStatus::Running).await;
    // Both were last used two hours ago.
    let long_ago = chrono::Utc::now() - chrono::Duration::hours(2);
    for id in [&pinged, &idle] {
        w.store.backdate_activity(id, long_ago).await.unwrap();
    }

    // The reaper finds both idle; then, before it pauses them, one is pinged.
    let found = w.svc.idle_capsules().await.unwrap();
    assert_eq!(found.len(), 2);
    w.svc.ping(&w.team, &pinged).await.unwrap();
    for c in &found {
        let began = w.svc.auto_pause(c).await.unwrap();
        assert_eq!(began, c.id == idle, "{}", c.id);
    }
    w.wait_for(&idle, CapsuleStatus::Paused).await;
    assert_eq!(w.status(&pinged).await, CapsuleStatus::Running);
    assert_eq!(w.host.count("pause"), 1, "{:?}", w.host.calls());
    let row = w.store.capsule(&idle).await.unwrap().unwrap();
    assert_eq!(row.capsule.status, CapsuleStatus::Paused);

    // A ping after the pause began is refused rather than lost.
    let again = w.svc.ping(&w.team, &idle).await.unwrap_err();
    assert_eq!(again.code, ErrorCode::InvalidState);
}

#[tokio::test]
async fn a_vm_that_dies_turns_its_capsule_error_with_the_reason() {
    let w = world("dead-vm").await;
    let id = w.running().await;
    w.host
        .kill(&id, "the VM exited unexpectedly (qemu: killed)");
    w.svc.record_dead_vms().await.unwrap();
    w.wait_for(&id, CapsuleStatus::Error).await;
    let row = w.store.capsule(&id).await.unwrap().unwrap();
    assert!(row
        .error
        .unwrap_or_default()
        .contains("exited unexpectedly"));
}

#[tokio::test]
async fn a_host_down_to_its_disk_reserve_takes_no_capsule_and_resumes_none() {
    let w = world("disk-reserve").await;
    let id = w.running().await;
    w.svc.pause(&w.team, &id, &user()).await.unwrap();
    w.wait_for(&id, CapsuleStatus::Paused).await;

    w.host.set_capacity(HostCapacity {
        cpus: 4,
        memory_mb: 8192,
        disk_free_mb: 2000,
        disk_reserve_mb: 2048,
    });
    let e = w
        .svc
        .create(&w.team, CreateCapsuleRequest::default(), &user())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InsufficientStorage, "{}", e.message);
    assert_eq!(e.code.status(), 507);
    assert!(e.message.contains("2048 MiB"), "{}", e.message);
    let e = w.svc.resume(&w.team, &id, &user()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::InsufficientStorage, "{}", e.message);
    assert_eq!(w.status(&id).await, CapsuleStatus::Paused, "left as it was");
    assert_eq!(w.host.count("resume"), 0);
    assert_eq!(w.host.count("create"), 1, "{:?}", w.host.calls());

    // Room again: both work.
    w.host.set_capacity(HostCapacity {
        cpus: 4,
        memory_mb: 8192,
        disk_free_mb: 100_000,
        disk_reserve_mb: 2048,
    });
    w.svc.resume(&w.team, &id, &user()).await.unwrap();
    w.wait_for(&id, CapsuleStatus::Running).await;
    w.create(0).await;
}

#[tokio::test]
async fn an_egress_policy_reaches_the_host_and_changes_only_once_the_host_applied_it() {
    let w = world("egress").await;
    let policy = wrenn_api::NetworkPolicy {
        internet: false,
        allow_out: vec!["PyPI.org".into(), "203.0.113.7".into()],
        deny_out: vec![],
    };
    let req = CreateCapsuleRequest {
        network: Some(policy.clone()),
        ..Default::default()
    };
    let c = w.svc.create(&w.team, req, &user()).await.unwrap();
    // Normalised before it is kept or sent anywhere.
    let want = policy.validate().unwrap();
    assert_eq!(want.allow_out, ["203.0.113.7/32", "pypi.org"]);
    assert_eq!(c.network, want);
    w.wait_for(&c.id, CapsuleStatus::Running).await;
    assert_eq!(w.host.network_of(&c.id), Some(want.clone()));

    // A host that cannot apply a new policy leaves the old one in force and on record.
    let open = wrenn_api::NetworkPolicy::default();
    w.host
        .fail_next("set_network", HostError::Vmm("nft failed".into()));
    let err = w
        .svc
        .set_network(&w.team, &c.id, &open, &user())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::AgentError);
    assert_eq!(w.svc.network(&w.team, &c.id).await.unwrap(), want);

    w.svc
        .set_network(&w.team, &c.id, &open, &user())
        .await
        .unwrap();
    assert_eq!(w.host.network_of(&c.id), Some(open.clone()));
    assert_eq!(w.svc.get(&w.team, &c.id).await.unwrap().network, open);

    // Bad entries are the caller's error; other teams' capsules do not exist.
    let bad = wrenn_api::NetworkPolicy {
        deny_out: vec!["2001:db8::/32".into()],
        ..Default::default()
    };
    let err = w
        .svc
        .set_network(&w.team, &c.id, &bad, &user())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidRequest);
    assert!(err.message.contains("deny_out"), "{}", err.message);
    let err = w
        .svc
        .set_network("team-other", &c.id, &open, &user())
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
}

#[tokio::test]
async fn a_silent_host_delays_no_other_and_its_calls_give_up() {
    let w = world("silent-host").await;
    let id = w.running().await;
    // A host that accepts calls and never answers, first in the order passes take.
    let silent = FakeHost::new();
    silent.hold("reap_dead");
    silent.hold("list");
    w.svc.pool.add("a-silent-host", silent.clone());

    // The dead-VM pass records the good host's dead VM while the silent one still holds it.
    w.host
        .kill(&id, "the VM exited unexpectedly (qemu: killed)");
    let svc = Arc::new(w.svc);
    let pass = tokio::spawn({
        let svc = svc.clone();
        async move { svc.record_dead_vms().await }
    });
    silent.waiting("reap_dead", 1).await;
    let mut status = CapsuleStatus::Running;
    for _ in 0..200 {
        status = svc.get(&w.team, &id).await.unwrap().status;
        if status == CapsuleStatus::Error {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        status,
        CapsuleStatus::Error,
        "the good host waited for the silent one"
    );
    assert!(!pass.is_finished());
    silent.release("reap_dead");
    pass.await.unwrap().unwrap();

    // Every call has a deadline: the silent host's list gives up and says so.
    silent.set_deadline(Duration::from_millis(200));
    let started = std::time::Instant::now();
    let err = wrenn_host::Host::list(&*silent).await.unwrap_err();
    assert!(matches!(err, HostError::Unreachable(_)), "{err}");
    assert!(err.to_string().contains("did not answer list"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(2));
    // ... so the start-up reconcile ends too.
    tokio::time::timeout(Duration::from_secs(5), svc.reconcile(chrono::Utc::now()))
        .await
        .expect("reconcile waited for a silent host")
        .unwrap();
}

#[tokio::test]
async fn a_reconcile_never_destroys_a_capsule_it_has_a_row_for() {
    // A host that went quiet: its capsules are `missing`; when it is reconciled again it still
    // holds them, and they come back instead of being destroyed as unknown.
    let w = world("missing-known").await;
    let id = w.running().await;
    let host_id = w
        .store
        .capsule(&id)
        .await
        .unwrap()
        .unwrap()
        .host_id
        .unwrap();
    assert_eq!(w.svc.mark_missing(&host_id).await.unwrap(), 1);
    assert_eq!(w.status(&id).await, CapsuleStatus::Missing);
    w.svc.reconcile(chrono::Utc::now()).await.unwrap();
    assert_eq!(w.status(&id).await, CapsuleStatus::Running);
    assert!(
        !w.host.calls().iter().any(|c| c == &format!("destroy {id}")),
        "{:?}",
        w.host.calls()
    );
}

#[tokio::test]
async fn concurrent_creates_never_pass_a_team_quota_together() {
    let w = world("quota-race").await;
    let limits = wrenn_api::quota::QuotaOverrides {
        capsules: Some(3),
        ..Default::default()
    };
    w.svc.set_quota(&w.team, limits).await.unwrap();
    let actor = user();
    let creates = (0..8).map(|_| {
        let req = CreateCapsuleRequest {
            timeout_sec: Some(0),
            ..Default::default()
        };
        w.svc.create(&w.team, req, &actor)
    });
    let results = futures_util::future::join_all(creates).await;
    let made = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(made, 3, "{results:?}");
    for e in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(e.code, ErrorCode::QuotaExceeded);
        assert!(e.message.contains("capsules limit is 3"), "{}", e.message);
    }
    let q = w.svc.quota(&w.team).await.unwrap();
    assert_eq!((q.usage.capsules, q.limits.capsules), (3, 3));
}

#[tokio::test]
async fn a_resume_past_the_vcpu_quota_is_refused_and_leaves_the_capsule_paused() {
    let w = world("quota-resume").await;
    let id = w.running().await;
    w.svc.pause(&w.team, &id, &user()).await.unwrap();
    w.wait_for(&id, CapsuleStatus::Paused).await;
    let none = wrenn_api::quota::QuotaOverrides {
        vcpus: Some(0),
        ..Default::default()
    };
    w.svc.set_quota(&w.team, none).await.unwrap();
    let e = w.svc.resume(&w.team, &id, &user()).await.unwrap_err();
    assert_eq!(e.code, ErrorCode::QuotaExceeded, "{}", e.message);
    assert_eq!(w.status(&id).await, CapsuleStatus::Paused);
    w.svc.set_quota(&w.team, Default::default()).await.unwrap();
    w.svc.resume(&w.team, &id, &user()).await.unwrap();
    w.wait_for(&id, CapsuleStatus::Running).await;
}

#[tokio::test]
async fn a_create_accepted_during_the_start_up_reconcile_is_not_taken_for_lost() {
    let w = world("startup-reconcile").await;
    let started = chrono::Utc::now();
    w.host.hold("list");
    w.host.hold("create");
    let reconcile = w.svc.reconcile(started);
    let meanwhile = async {
        w.host.waiting("list", 1).await;
        // The API serves while the host is slow to list: a create lands in between.
        let c = w.create(0).await;
        w.host.waiting("create", 1).await;
        w.host.release("list");
        c
    };
    let (done, c) = tokio::join!(reconcile, meanwhile);
    done.unwrap();
    assert_eq!(
        w.status(&c.id).await,
        CapsuleStatus::Starting,
        "not marked lost"
    );
    w.host.release("create");
    w.wait_for(&c.id, CapsuleStatus::Running).await;
}
