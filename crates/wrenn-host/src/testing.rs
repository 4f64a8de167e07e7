//! An in-memory [`Host`] for fast tests of what sits above the boundary (the control plane's
//! services, the agent's uplink): no VM, no network, every outcome chosen by the test.
//!
//! - Capsules live in a map; `create` makes one `Running`, `pause`/`resume` move it, `destroy`
//!   removes it.
//! - [`FakeHost::hold`] makes the next calls of an operation wait until the test releases them
//!   (to interleave a destroy with a create, say); [`FakeHost::fail_next`] makes the next call
//!   fail with a chosen error.
//! - `envd` answers with a guest agent in memory that speaks the real protocol: health, and
//!   exec (which waits on [`FakeHost::hold`]`("exec")` and then prints the command's text).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};

use envd_client::{EnvdClient, EnvdDial, EnvdError, EnvdStream};
use envd_proto::{read_frame, write_frame, write_json, Frame, FrameKind, Request, Response};
use serde_json::Value;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::operations::Call;
use crate::{BaseTemplate, CapsuleInfo, DeadCapsule, HostCapacity, HostError, Phase, SnapshotMeta};

/// A gate on one operation: calls wait at it while it is held.
#[derive(Default)]
struct Gate {
    held: bool,
    /// Calls waiting right now.
    waiting: usize,
    /// Counts releases: a call waits for the release after its arrival, even if the gate is
    /// held again before it wakes.
    releases: u64,
}

#[derive(Default)]
struct State {
    capsules: BTreeMap<String, CapsuleInfo>,
    dead: Vec<DeadCapsule>,
    failures: HashMap<String, VecDeque<HostError>>,
    gates: HashMap<String, Gate>,
    /// Every call, as `"op id"` (or `"op"`), in order.
    calls: Vec<String>,
    /// Per capsule: cancelled when its VM stops (pause, destroy, death), which fails every
    /// guest connection made before, as the real agent does.
    vm_gone: HashMap<String, CancellationToken>,
    /// Each capsule's egress policy, as created or last set.
    networks: HashMap<String, wrenn_api::NetworkPolicy>,
}

impl State {
    fn vm_stopped(&mut self, id: &str) {
        if let Some(t) = self.vm_gone.remove(id) {
            t.cancel();
        }
    }
}

/// See the module documentation.
pub struct FakeHost {
    /// Itself, for the guest agent it hands out (which waits at its gates).
    me: Weak<FakeHost>,
    state: Mutex<State>,
    changed: Notify,
    capacity: Mutex<HostCapacity>,
    /// Every call's deadline instead of the real one ([`FakeHost::set_deadline`]).
    deadline: Mutex<Option<std::time::Duration>>,
}

impl FakeHost {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            state: Mutex::default(),
            changed: Notify::new(),
            capacity: Mutex::new(HostCapacity {
                cpus: 4,
                memory_mb: 8192,
                disk_free_mb: 100_000,
                disk_reserve_mb: 0,
            }),
            deadline: Mutex::new(None),
        })
    }

    /// Gives every call to this host `d` as its deadline (a silent host, say, gives up fast).
    pub fn set_deadline(&self, d: std::time::Duration) {
        *self.deadline.lock().unwrap_or_else(|e| e.into_inner()) = Some(d);
    }

    pub(crate) fn deadline_for(&self, call: &Call) -> std::time::Duration {
        self.deadline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .unwrap_or_else(|| call.deadline())
    }

    /// What the host reports as its capacity from now on.
    pub fn set_capacity(&self, capacity: HostCapacity) {
        *self.capacity.lock().unwrap_or_else(|e| e.into_inner()) = capacity;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The egress policy capsule `id` holds on this host (created with or set since).
    pub fn network_of(&self, id: &str) -> Option<wrenn_api::NetworkPolicy> {
        self.lock().networks.get(id).cloned()
    }

    /// Calls of `op` from now on wait until [`FakeHost::release`].
    pub fn hold(&self, op: &str) {
        self.lock().gates.entry(op.to_string()).or_default().held = true;
    }

    /// Lets every waiting and future call of `op` through.
    pub fn release(&self, op: &str) {
        if let Some(g) = self.lock().gates.get_mut(op) {
            g.held = false;
            g.releases += 1;
        }
        self.changed.notify_waiters();
    }

    /// Waits until `n` calls of `op` are waiting at its gate.
    pub async fn waiting(&self, op: &str, n: usize) {
        loop {
            let notified = self.changed.notified();
            if self.lock().gates.get(op).is_some_and(|g| g.waiting >= n) {
                return;
            }
            notified.await;
        }
    }

    /// The next call of `op` fails with `e` (after its gate, if held).
    pub fn fail_next(&self, op: &str, e: HostError) {
        self.lock()
            .failures
            .entry(op.to_string())
            .or_default()
            .push_back(e);
    }

    /// Every call so far, as `"op id"` (or `"op"` for calls without an id).
    pub fn calls(&self) -> Vec<String> {
        self.lock().calls.clone()
    }

    /// How many calls of `op` were made.
    pub fn count(&self, op: &str) -> usize {
        self.lock()
            .calls
            .iter()
            .filter(|c| c.split(' ').next() == Some(op))
            .count()
    }

    /// The capsule as this host holds it.
    pub fn capsule(&self, id: &str) -> Option<CapsuleInfo> {
        self.lock().capsules.get(id).cloned()
    }

    /// Puts a capsule on this host directly.
    pub fn put(&self, id: &str, phase: Phase) {
        self.lock().capsules.insert(id.to_string(), info(id, phase));
    }

    /// The capsule's VM dies: it is gone, and the next `reap_dead` reports it.
    pub fn kill(&self, id: &str, reason: &str) {
        let mut s = self.lock();
        s.capsules.remove(id);
        s.vm_stopped(id);
        s.dead.push(DeadCapsule {
            id: id.to_string(),
            reason: reason.to_string(),
        });
    }

    /// Records the call, waits at the operation's gate, then takes a planned failure if any.
    async fn enter(&self, op: &str, id: Option<&str>) -> Result<(), HostError> {
        {
            let mut s = self.lock();
            s.calls.push(match id {
                Some(id) => format!("{op} {id}"),
                None => op.to_string(),
            });
        }
        self.wait_at_gate(op).await;
        match self
            .lock()
            .failures
            .get_mut(op)
            .and_then(VecDeque::pop_front)
        {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn wait_at_gate(&self, op: &str) {
        let arrived = {
            let mut s = self.lock();
            match s.gates.get_mut(op) {
                Some(g) if g.held => {
                    g.waiting += 1;
                    g.releases
                }
                _ => return,
            }
        };
        // Tells `waiting` (before this call's own wait begins: no self-wakeup).
        self.changed.notify_waiters();
        loop {
            let notified = self.changed.notified();
            {
                let mut s = self.lock();
                if let Some(g) = s.gates.get_mut(op).filter(|g| g.releases != arrived) {
                    g.waiting -= 1;
                    return;
                }
            }
            notified.await;
        }
    }

    fn with_capsule<T>(
        &self,
        id: &str,
        f: impl FnOnce(&mut CapsuleInfo) -> Result<T, HostError>,
    ) -> Result<T, HostError> {
        let mut s = self.lock();
        let c = s
            .capsules
            .get_mut(id)
            .ok_or_else(|| HostError::NotFound(format!("capsule {id} not found on this host")))?;
        f(c)
    }
}

fn info(id: &str, phase: Phase) -> CapsuleInfo {
    CapsuleInfo {
        id: id.to_string(),
        phase,
        template: "minimal".into(),
        guest_ip: "10.200.0.2".into(),
        host_ip: "10.201.0.2".into(),
        metadata: BTreeMap::from([("accelerator".to_string(), "fake".to_string())]),
    }
}

impl FakeHost {
    /// Answers one host operation (what `impl Host for FakeHost` calls). An operation this
    /// double does not know answers `InvalidRequest`, so a new one needs nothing here until a
    /// test wants it.
    pub(crate) async fn dispatch(&self, call: Call) -> Result<Value, HostError> {
        let op = call.name();
        let id = match &call {
            Call::create { id, .. }
            | Call::destroy { id }
            | Call::pause { id }
            | Call::resume { id }
            | Call::set_network { id, .. }
            | Call::snapshot { id, .. }
            | Call::metrics { id, .. } => Some(id.clone()),
            Call::delete_snapshot { snapshot_id } => Some(snapshot_id.clone()),
            _ => None,
        };
        self.enter(op, id.as_deref()).await?;
        match call {
            Call::templates {} => answer(vec!["minimal".to_string()]),
            Call::base_templates {} => answer(vec![BaseTemplate {
                name: "minimal".into(),
                size_bytes: 1 << 30,
                built_at: chrono::Utc::now(),
            }]),
            Call::capacity {} => answer(*self.capacity.lock().unwrap_or_else(|e| e.into_inner())),
            Call::list {} => answer(self.lock().capsules.values().cloned().collect::<Vec<_>>()),
            Call::reap_dead {} => answer(std::mem::take(&mut self.lock().dead)),
            Call::create { id, spec, .. } => {
                let mut s = self.lock();
                if s.capsules.contains_key(&id) {
                    return Err(HostError::InvalidState(format!(
                        "capsule {id} already exists"
                    )));
                }
                let c = info(&id, Phase::Running);
                s.networks.insert(id.clone(), spec.network);
                s.capsules.insert(id, c.clone());
                answer(c)
            }
            Call::destroy { id } => {
                let mut s = self.lock();
                s.vm_stopped(&id);
                answer(s.capsules.remove(&id).is_some())
            }
            Call::pause { id } => {
                self.moved(&id, Phase::Running, Phase::Paused)?;
                self.lock().vm_stopped(&id);
                answer(())
            }
            Call::resume { id } => answer(self.moved(&id, Phase::Paused, Phase::Running)?),
            Call::set_network { id, policy } => {
                self.with_capsule(&id, |_| Ok(()))?;
                self.lock().networks.insert(id, policy);
                answer(())
            }
            Call::snapshot { id, snapshot_id } => {
                self.with_capsule(&id, |_| Ok(()))?;
                answer(SnapshotMeta {
                    machine: None,
                    id: snapshot_id,
                    vcpus: 1,
                    memory_mb: 512,
                    disk_mb: 1024,
                    size_bytes: 1 << 20,
                })
            }
            Call::delete_snapshot { .. } => answer(()),
            Call::metrics { id, .. } => {
                self.with_capsule(&id, |_| Ok(()))?;
                answer(Vec::<wrenn_api::MetricPoint>::new())
            }
            #[allow(unreachable_patterns)]
            _ => Err(HostError::InvalidRequest(format!(
                "{op} is not supported by the fake host"
            ))),
        }
    }

    /// Moves a capsule from phase `from` to `to`.
    fn moved(&self, id: &str, from: Phase, to: Phase) -> Result<CapsuleInfo, HostError> {
        self.with_capsule(id, |c| {
            if c.phase != from {
                return Err(HostError::InvalidState(format!(
                    "capsule {id} is not {from:?}"
                )));
            }
            c.phase = to;
            Ok(c.clone())
        })
    }

    /// A client for the capsule's in-memory guest agent (running capsules only).
    /// The double holds no files: copying snapshots between hosts is tested with real agents.
    pub(crate) async fn read_file(
        &self,
        snapshot_id: &str,
        _file: &str,
    ) -> Result<crate::ByteStream, HostError> {
        Err(HostError::NotFound(format!(
            "FakeHost holds no files of {snapshot_id}"
        )))
    }

    pub(crate) async fn write_file(
        &self,
        transfer: &str,
        _digest: &crate::FileDigest,
        _body: crate::ByteStream,
    ) -> Result<(), HostError> {
        Err(HostError::InvalidRequest(format!(
            "FakeHost keeps no files (transfer {transfer})"
        )))
    }

    pub(crate) fn dial_envd(&self, id: &str) -> Result<EnvdClient, HostError> {
        self.lock().calls.push(format!("envd {id}"));
        self.with_capsule(id, |c| match c.phase {
            Phase::Running => Ok(()),
            _ => Err(HostError::InvalidState(format!(
                "capsule {id} is not running"
            ))),
        })?;
        let vm_gone = self
            .lock()
            .vm_gone
            .entry(id.to_string())
            .or_default()
            .clone();
        Ok(EnvdClient::remote(Arc::new(FakeEnvd {
            host: self.me.clone(),
        }))
        .with_cancellation(vm_gone))
    }
}

fn answer<T: serde::Serialize>(t: T) -> Result<Value, HostError> {
    serde_json::to_value(t).map_err(|e| HostError::Vmm(e.to_string()))
}

/// Dials the in-memory guest agent of a [`FakeHost`].
#[derive(Debug)]
struct FakeEnvd {
    host: Weak<FakeHost>,
}

impl std::fmt::Debug for FakeHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FakeHost")
    }
}

#[async_trait::async_trait]
impl EnvdDial for FakeEnvd {
    async fn dial(&self) -> Result<Box<dyn EnvdStream>, EnvdError> {
        let (ours, mut theirs) = tokio::io::duplex(64 * 1024);
        let host = self.host.clone();
        tokio::spawn(async move {
            let Ok(Some(Frame::Json(req))) = read_frame(&mut theirs).await else {
                return;
            };
            let answer = match serde_json::from_slice::<Request>(&req) {
                Ok(Request::Health) => Response::Health {
                    envd_version: "fake".into(),
                    kernel_version: "fake".into(),
                    protocol: envd_proto::PROTOCOL_VERSION,
                },
                Ok(Request::Exec(spec)) => {
                    if write_json(&mut theirs, &Response::Spawned { pid: 1 })
                        .await
                        .is_err()
                    {
                        return;
                    }
                    if let Some(h) = host.upgrade() {
                        h.wait_at_gate("exec").await;
                    }
                    let out = spec.command.cmd.as_bytes();
                    if write_frame(&mut theirs, FrameKind::Stdout, out)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    Response::Exit {
                        exit_code: 0,
                        timed_out: false,
                        duration_ms: 1,
                    }
                }
                Ok(Request::ListProcesses) => Response::Processes { processes: vec![] },
                _ => Response::Error {
                    kind: envd_proto::ErrorKind::Internal,
                    message: "not supported by the fake guest".into(),
                },
            };
            let _ = write_json(&mut theirs, &answer).await;
        });
        Ok(Box::new(ours))
    }
}
