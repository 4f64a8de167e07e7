//! Boots real VMs through the capsule manager (needs root, QEMU and network namespaces).

use std::path::PathBuf;

use envd_client::ExecOutput;
use envd_proto::{CommandSpec, ExecSpec};
use wrenn_agent::{AgentConfig, CapsuleManager};
use wrenn_api::CreateCapsuleRequest;
use wrenn_host::{Host, HostError, Phase};

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn config(name: &str) -> AgentConfig {
    let ws = workspace();
    let data = ws.join("target/test-data").join(name);
    let _ = std::fs::remove_dir_all(&data);
    let envd = std::env::var("WRENN_ENVD")
        .map(PathBuf::from)
        .unwrap_or_else(|_| ws.join("target/x86_64-unknown-linux-gnu/release/envd"));
    let mut cfg = AgentConfig::new(data, envd);
    cfg.images_dir = std::env::var("WRENN_IMAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| ws.join("target/wrenn-images"));
    // A distinct address range per test binary so parallel test binaries never share slots.
    cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 200, 0);
    cfg
}

/// A foreground command in capsule `id`, through the host boundary's guest connection.
async fn exec(mgr: &CapsuleManager, id: &str, spec: ExecSpec) -> Result<ExecOutput, HostError> {
    Ok(mgr.envd(id).await?.exec(spec).await?)
}

fn sh(cmd: &str) -> ExecSpec {
    ExecSpec {
        command: CommandSpec {
            cmd: cmd.into(),
            ..Default::default()
        },
        timeout_ms: 10_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_destroy_leaves_nothing_behind() {
    let cfg = config("agent-lifecycle");
    let capsules_dir = cfg.capsules_dir();
    let mgr = CapsuleManager::start(cfg).await.expect("agent starts");
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    let info = mgr
        .create("cl-agenttest0000000000000000001".into(), spec.clone(), None)
        .await
        .expect("capsule boots");
    assert_eq!(info.guest_ip, "10.200.0.2");
    assert_eq!(info.metadata["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(info.metadata["kernel_version"].contains("cloud-amd64"));

    let out = exec(&mgr, &info.id, sh("echo hello; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit_code, 3);
    assert!(!out.timed_out);

    let out = exec(
        &mgr,
        &info.id,
        ExecSpec {
            command: CommandSpec {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), "echo $FOO; pwd".into()],
                envs: [("FOO".to_string(), "bar".to_string())].into(),
                cwd: Some("/tmp".into()),
                user: None,
            },
            timeout_ms: 10_000,
        },
    )
    .await
    .unwrap();
    assert_eq!(out.stdout, b"bar\n/tmp\n");

    let t = std::time::Instant::now();
    let out = exec(
        &mgr,
        &info.id,
        ExecSpec {
            timeout_ms: 1_000,
            ..sh("echo start; sleep 30")
        },
    )
    .await
    .unwrap();
    assert!(out.timed_out);
    assert_eq!(out.stdout, b"start\n");
    assert!(t.elapsed() < std::time::Duration::from_secs(8));

    let netns = format!(
        "/run/netns/{}",
        wrenn_agent::net::Slot::new(std::net::Ipv4Addr::new(10, 201, 200, 0), 0).netns
    );
    assert!(std::path::Path::new(&netns).exists());
    assert!(mgr.destroy(info.id.clone()).await.unwrap());
    assert!(
        !mgr.destroy(info.id.clone()).await.unwrap(),
        "second destroy is a no-op"
    );
    assert!(!std::path::Path::new(&netns).exists(), "netns removed");
    assert!(!capsules_dir.join(&info.id).exists(), "capsule dir removed");
    assert!(mgr.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envd_that_never_answers_fails_the_create_and_leaves_nothing() {
    let mut cfg = config("agent-boot-timeout");
    cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 210, 0);
    // A guest agent that starts but never answers (a script that sleeps in envd's place):
    // neither the template snapshot nor the cold boot can finish, so the create must fail and
    // clean up.
    let fake = workspace().join("target/test-data/envd-that-sleeps");
    std::fs::create_dir_all(fake.parent().unwrap()).unwrap();
    std::fs::write(&fake, "#!/bin/sh\nexec sleep 100000\n").unwrap();
    cfg.envd_path = fake;
    cfg.boot_timeout = std::time::Duration::from_secs(3);
    let capsules_dir = cfg.capsules_dir();
    let slot = wrenn_agent::net::Slot::new(cfg.slot_base, 0);
    let mgr = CapsuleManager::start(cfg).await.expect("agent starts");
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    let id = "cl-agenttest0000000000000000002";
    let err = mgr.create(id.into(), spec.clone(), None).await.unwrap_err();
    assert!(err.to_string().contains("envd did not answer"), "{err}");
    assert!(!std::path::Path::new("/run/netns")
        .join(&slot.netns)
        .exists());
    assert!(!capsules_dir.join(id).exists());
    assert!(!qemu_running(id));
    assert!(mgr.list().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_readopts_live_vms_and_cleans_up_dead_ones() {
    let mut cfg = config("agent-restart");
    cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 220, 0);
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    let (live, dead) = (
        "cl-agenttest0000000000000000003",
        "cl-agenttest0000000000000000004",
    );
    {
        let mgr = CapsuleManager::start(cfg.clone())
            .await
            .expect("agent starts");
        mgr.create(live.into(), spec.clone(), None)
            .await
            .expect("boots");
        mgr.create(dead.into(), spec.clone(), None)
            .await
            .expect("boots");
        // The agent goes away without destroying anything (a crash or an upgrade).
    }
    // While it is down, one VM dies.
    kill_qemu(dead);
    let mgr = CapsuleManager::start(cfg.clone())
        .await
        .expect("agent restarts");
    let ids: Vec<String> = mgr
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(ids, vec![live.to_string()]);
    let out = exec(&mgr, live, sh("echo still here")).await.unwrap();
    assert_eq!(out.stdout, b"still here\n");
    assert!(
        !cfg.capsules_dir().join(dead).exists(),
        "dead capsule's files removed"
    );
    let before = qemu_pids(live);
    let state = std::fs::read_to_string(cfg.capsules_dir().join(live).join("state.json"))
        .unwrap_or_default();
    assert!(mgr.destroy(live.into()).await.unwrap());
    let after = qemu_pids(live);
    if !after.is_empty() {
        kill_qemu(live);
        panic!("VM survived destroy: pids before {before:?}, after {after:?}; state {state}");
    }
    let base_slots = wrenn_agent::net::existing_slots(cfg.slot_base, cfg.max_slots);
    assert!(base_slots.is_empty(), "slots left: {base_slots:?}");
}

/// Pause/resume across agent restarts, including crashes in the middle of either: every
/// capsule lands on a whole side (running, or paused with its saved state) and nothing leaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_capsules_and_interrupted_transitions_survive_an_agent_restart() {
    let mut cfg = config("agent-pause");
    cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 230, 0);
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    let (paused, mid_pause, mid_resume) = (
        "cl-agenttest0000000000000000005",
        "cl-agenttest0000000000000000006",
        "cl-agenttest0000000000000000007",
    );
    let set_phase = |id: &str, phase: &str| {
        let path = cfg.capsules_dir().join(id).join("state.json");
        let mut state: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        state["phase"] = phase.into();
        std::fs::write(&path, serde_json::to_vec(&state).unwrap()).unwrap();
    };
    {
        let mgr = CapsuleManager::start(cfg.clone())
            .await
            .expect("agent starts");
        for id in [paused, mid_pause, mid_resume] {
            mgr.create(id.into(), spec.clone(), None)
                .await
                .expect("boots");
            exec(&mgr, id, sh("echo kept > /root/mark")).await.unwrap();
        }
        mgr.pause(paused.into()).await.expect("pauses");
        assert!(!qemu_running(paused), "a paused capsule has no VM");
        assert!(
            exec(&mgr, paused, sh("true")).await.is_err(),
            "no exec while paused"
        );
        mgr.pause(mid_resume.into()).await.expect("pauses");
        // Crashes: one after recording "pausing" but before saving anything, one after
        // recording "resuming" but before its VM started.
        set_phase(mid_pause, "pausing");
        set_phase(mid_resume, "resuming");
    }
    let mgr = CapsuleManager::start(cfg.clone())
        .await
        .expect("agent restarts");
    let mut phases: Vec<(String, Phase)> = mgr
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|c| (c.id, c.phase))
        .collect();
    phases.sort();
    assert_eq!(
        phases,
        vec![
            (paused.to_string(), Phase::Paused),
            (mid_pause.to_string(), Phase::Running),
            (mid_resume.to_string(), Phase::Paused),
        ]
    );
    let out = exec(&mgr, mid_pause, sh("cat /root/mark")).await.unwrap();
    assert_eq!(out.stdout, b"kept\n");
    for id in [paused, mid_resume] {
        mgr.resume(id.into())
            .await
            .expect("resumes after the restart");
        let out = exec(&mgr, id, sh("cat /root/mark")).await.unwrap();
        assert_eq!(out.stdout, b"kept\n");
    }
    mgr.destroy_all().await;
    for id in [paused, mid_pause, mid_resume] {
        assert!(!qemu_running(id));
        assert!(!cfg.capsules_dir().join(id).exists());
    }
    let slots = wrenn_agent::net::existing_slots(cfg.slot_base, cfg.max_slots);
    assert!(slots.is_empty(), "slots left: {slots:?}");
}

fn qemu_pids(id: &str) -> Vec<u32> {
    wrenn_agent::vmm::qemu::find_by_name(id)
}

fn qemu_running(id: &str) -> bool {
    !qemu_pids(id).is_empty()
}

fn kill_qemu(id: &str) {
    for pid in qemu_pids(id) {
        // SAFETY: kill(2) on a pid verified to be this capsule's QEMU.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
    for _ in 0..200 {
        if !qemu_running(id) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("qemu of {id} did not die");
}

/// A snapshot copied between two agents: the receiver keeps a file only when it has the
/// manifest's size and SHA-256, installs nothing while a file is missing, and leaves no
/// transfer behind either way. (Files are written by hand: the copy does not look inside.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_copies_are_checked_by_digest() {
    use futures_util::StreamExt;
    use wrenn_host::{ByteStream, SnapshotMeta};

    fn stream(chunks: Vec<&'static [u8]>) -> ByteStream {
        futures_util::stream::iter(chunks.into_iter().map(|c| Ok(bytes::Bytes::from_static(c))))
            .boxed()
    }
    async fn collect(mut s: ByteStream) -> Vec<u8> {
        let mut v = Vec::new();
        while let Some(c) = s.next().await {
            v.extend_from_slice(&c.unwrap());
        }
        v
    }

    let mut from_cfg = config("agent-copy-from");
    from_cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 240, 0);
    let mut to_cfg = config("agent-copy-to");
    to_cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 250, 0);
    let (from, to) = (
        CapsuleManager::start(from_cfg.clone()).await.unwrap(),
        CapsuleManager::start(to_cfg.clone()).await.unwrap(),
    );
    let id = "snap-copytest";
    let dir = from_cfg.data_dir.join("snapshots").join(id);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("disk.qcow2"), b"the disk").unwrap();
    std::fs::write(dir.join("state"), b"the memory").unwrap();
    let meta = SnapshotMeta {
        id: id.into(),
        vcpus: 1,
        memory_mb: 512,
        disk_mb: 1024,
        size_bytes: 18,
        machine: Some(from.machine().await.unwrap()),
    };
    std::fs::write(dir.join("meta.json"), serde_json::to_vec(&meta).unwrap()).unwrap();

    let manifest = from.snapshot_manifest(id.into()).await.unwrap();
    let names: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["state", "disk.qcow2"]);
    let disk = manifest.files[1].clone();
    let body = from.read_snapshot_file(id, "disk.qcow2").await.unwrap();
    assert_eq!(collect(body).await, b"the disk");
    assert!(from.read_snapshot_file(id, "../meta.json").await.is_err());
    assert!(!to.holds_snapshot(id.into()).await.unwrap());

    let transfers = to_cfg.data_dir.join("transfers");
    let leftovers = || -> Vec<PathBuf> {
        std::fs::read_dir(&transfers)
            .into_iter()
            .flatten()
            .flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|e| e.path())
            .collect()
    };
    // Same size, other bytes; short; long: refused, nothing kept.
    for bad in [
        vec![b"the dusk" as &[u8]],
        vec![b"the"],
        vec![b"the disk", b"!"],
    ] {
        let e = to
            .write_snapshot_file("xfer-1", &disk, stream(bad))
            .await
            .unwrap_err();
        assert!(matches!(e, HostError::InvalidRequest(_)), "{e}");
        assert_eq!(leftovers(), Vec::<PathBuf>::new());
    }
    // The disk alone, as for a base template: installed without the memory.
    to.write_snapshot_file("xfer-1", &disk, stream(vec![b"the ", b"disk"]))
        .await
        .unwrap();
    let mut missing = manifest.clone();
    assert!(to
        .install_snapshot("xfer-1".into(), missing.clone())
        .await
        .is_err());
    assert!(!to.holds_snapshot(id.into()).await.unwrap());
    assert!(
        leftovers().is_empty(),
        "a failed install drops the transfer"
    );

    to.write_snapshot_file("xfer-2", &disk, stream(vec![b"the disk"]))
        .await
        .unwrap();
    missing.files.retain(|f| f.name == "disk.qcow2");
    let installed = to.install_snapshot("xfer-2".into(), missing).await.unwrap();
    assert_eq!(installed, meta);
    assert!(to.holds_snapshot(id.into()).await.unwrap());
    let copy = to_cfg.data_dir.join("snapshots").join(id);
    assert_eq!(std::fs::read(copy.join("disk.qcow2")).unwrap(), b"the disk");
    assert!(!copy.join("state").exists());
    assert!(leftovers().is_empty());

    // Memory made under another machine does not restore here: refused.
    let mut foreign = manifest.clone();
    foreign.meta.id = "snap-copytest2".into();
    foreign.meta.machine = Some("qemu 1.0 cpu=pentium / tcg / kernel 2.6".into());
    let state = manifest.files[0].clone();
    to.write_snapshot_file("xfer-3", &state, stream(vec![b"the memory"]))
        .await
        .unwrap();
    to.write_snapshot_file("xfer-3", &disk, stream(vec![b"the disk"]))
        .await
        .unwrap();
    let e = to
        .install_snapshot("xfer-3".into(), foreign)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("saved under"), "{e}");
    // Nor memory whose machine was never recorded.
    let mut unknown = manifest.clone();
    unknown.meta.id = "snap-copytest3".into();
    unknown.meta.machine = None;
    for f in &manifest.files {
        let body = from.read_snapshot_file(id, &f.name).await.unwrap();
        to.write_snapshot_file("xfer-4", f, body).await.unwrap();
    }
    assert!(to.install_snapshot("xfer-4".into(), unknown).await.is_err());
    assert!(leftovers().is_empty());
    // The same machine: installed with its memory.
    for f in &manifest.files {
        let body = from.read_snapshot_file(id, &f.name).await.unwrap();
        to.write_snapshot_file("xfer-5", f, body).await.unwrap();
    }
    let mut same = manifest.clone();
    same.meta.id = "snap-copytest4".into();
    to.install_snapshot("xfer-5".into(), same).await.unwrap();
    let copy = to_cfg.data_dir.join("snapshots").join("snap-copytest4");
    assert_eq!(std::fs::read(copy.join("state")).unwrap(), b"the memory");
    assert!(!to.holds_snapshot("snap-copytest2".into()).await.unwrap());
    assert!(leftovers().is_empty());
}

/// Per-shape template snapshots carry their users: one is never collected while a capsule sits
/// on it, and is collected once unused (here with no idle time); the next create makes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unused_shape_snapshots_are_collected() {
    let mut cfg = config("agent-shape-gc");
    cfg.slot_base = std::net::Ipv4Addr::new(10, 201, 236, 0);
    cfg.max_slots = 4;
    let mgr = CapsuleManager::start(cfg).await.unwrap();
    // A shape of its own (384 MiB), so its snapshot is this test's.
    let spec = CreateCapsuleRequest {
        memory_mb: Some(384),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let id = "cl-agenttest0000000000000000007";
    let ours = |list: Vec<wrenn_host::ShapeSnapshot>| {
        list.into_iter()
            .filter(|s| s.image.as_deref() == Some("minimal") && s.users > 0)
            .collect::<Vec<_>>()
    };
    mgr.create(id.into(), spec.clone(), None).await.unwrap();
    let used = ours(mgr.shape_snapshots().await.unwrap());
    let mine = used
        .iter()
        .find(|s| s.users == 1)
        .expect("the capsule's snapshot lists it as a user")
        .clone();
    assert!(mine.bytes > 0 && mine.last_used.is_some(), "{mine:?}");
    let removed = mgr.collect_shape_snapshots(std::time::Duration::ZERO).await;
    assert!(
        !removed.iter().any(|d| d.ends_with(&mine.key)),
        "a snapshot in use was collected"
    );
    let out = exec(&mgr, id, sh("echo alive")).await.unwrap();
    assert_eq!(out.stdout, b"alive\n");

    assert!(mgr.destroy(id.into()).await.unwrap());
    let after = mgr.shape_snapshots().await.unwrap();
    let now = after.iter().find(|s| s.key == mine.key).unwrap();
    assert_eq!(now.users, 0);
    let removed = mgr.collect_shape_snapshots(std::time::Duration::ZERO).await;
    assert!(
        removed.iter().any(|d| d.ends_with(&mine.key)),
        "{removed:?}"
    );
    assert!(!mgr
        .shape_snapshots()
        .await
        .unwrap()
        .iter()
        .any(|s| s.key == mine.key));

    // Made again on the next create of that shape.
    mgr.create(id.into(), spec, None).await.unwrap();
    assert_eq!(
        exec(&mgr, id, sh("echo again")).await.unwrap().stdout,
        b"again\n"
    );
    assert!(mgr.destroy(id.into()).await.unwrap());
}
