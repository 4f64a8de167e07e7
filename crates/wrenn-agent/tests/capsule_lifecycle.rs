//! Boots real VMs through the capsule manager (needs root, QEMU and network namespaces).

use std::path::PathBuf;

use envd_proto::ExecSpec;
use wrenn_agent::{AgentConfig, CapsuleManager};
use wrenn_api::CreateCapsuleRequest;

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

fn sh(cmd: &str) -> ExecSpec {
    ExecSpec {
        cmd: cmd.into(),
        timeout_ms: 10_000,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_destroy_leaves_nothing_behind() {
    let cfg = config("agent-lifecycle");
    let capsules_dir = cfg.capsules_dir();
    let mgr = CapsuleManager::start(cfg).await.expect("agent starts");
    let spec = CreateCapsuleRequest::default().validate().unwrap();
    let info = mgr
        .create("cl-agenttest0000000000000000001", &spec)
        .await
        .expect("capsule boots");
    assert_eq!(info.guest_ip, "10.200.0.2");
    assert_eq!(info.metadata["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(info.metadata["kernel_version"].contains("cloud-amd64"));

    let out = mgr
        .exec(&info.id, sh("echo hello; echo err >&2; exit 3"))
        .await
        .unwrap();
    assert_eq!(out.stdout, b"hello\n");
    assert_eq!(out.stderr, b"err\n");
    assert_eq!(out.exit_code, 3);
    assert!(!out.timed_out);

    let out = mgr
        .exec(
            &info.id,
            ExecSpec {
                cmd: "/bin/sh".into(),
                args: vec!["-c".into(), "echo $FOO; pwd".into()],
                envs: [("FOO".to_string(), "bar".to_string())].into(),
                cwd: Some("/tmp".into()),
                timeout_ms: 10_000,
            },
        )
        .await
        .unwrap();
    assert_eq!(out.stdout, b"bar\n/tmp\n");

    let t = std::time::Instant::now();
    let out = mgr
        .exec(
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
    assert!(mgr.destroy(&info.id).await.unwrap());
    assert!(
        !mgr.destroy(&info.id).await.unwrap(),
        "second destroy is a no-op"
    );
    assert!(!std::path::Path::new(&netns).exists(), "netns removed");
    assert!(!capsules_dir.join(&info.id).exists(), "capsule dir removed");
    assert!(mgr.list().await.is_empty());
}
