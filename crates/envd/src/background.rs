//! Background processes: started on request, tracked by pid and tag, their output broadcast to
//! whoever attaches, their exit status kept for a while after they end.
//!
//! Viewers get output from the moment they attach (a viewer that falls behind by more than
//! [`OUTPUT_BACKLOG`] chunks skips ahead rather than slowing the process or growing memory),
//! then the exit. Attaching to a process that already ended yields its exit at once.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use envd_proto::{write_frame, write_json, ErrorKind, FrameKind, Response, StartSpec};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, watch};

/// Chunks a viewer may fall behind before it skips ahead.
const OUTPUT_BACKLOG: usize = 256;
/// Ended processes remembered (for late attaches), oldest forgotten first.
const KEEP_EXITED: usize = 256;

#[derive(Clone)]
enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

struct Entry {
    tag: String,
    output: broadcast::Sender<Chunk>,
    exit: watch::Receiver<Option<i32>>,
}

#[derive(Default)]
struct Table {
    procs: HashMap<u32, Entry>,
    exited_order: VecDeque<u32>,
}

impl Table {
    fn live_with_tag(&self, tag: &str) -> bool {
        self.procs
            .values()
            .any(|e| e.tag == tag && e.exit.borrow().is_none())
    }
}

fn lock() -> std::sync::MutexGuard<'static, Table> {
    static TABLE: OnceLock<Mutex<Table>> = OnceLock::new();
    // Each critical section is a few map operations: a poisoned table is still whole.
    TABLE
        .get_or_init(|| Mutex::new(Table::default()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// Tags of the live background processes by pid.
pub fn tags() -> HashMap<u32, String> {
    lock()
        .procs
        .iter()
        .filter(|(_, e)| e.exit.borrow().is_none())
        .map(|(pid, e)| (*pid, e.tag.clone()))
        .collect()
}

fn random_tag() -> String {
    let mut b = [0u8; 4];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        b = n.to_le_bytes();
    }
    format!("proc-{:02x}{:02x}{:02x}{:02x}", b[0], b[1], b[2], b[3])
}

pub async fn start(spec: StartSpec, mut wr: OwnedWriteHalf) {
    let answer = spawn(spec);
    let _ = write_json(&mut wr, &answer).await;
}

fn spawn(spec: StartSpec) -> Response {
    let mut command = match crate::exec::command(&spec.command) {
        Ok(c) => c,
        Err(e) => return e,
    };
    // The table lock is held from the tag check to the insert so two requests cannot both
    // claim one tag.
    let mut table = lock();
    let tag = match spec.tag.clone() {
        Some(t) if table.live_with_tag(&t) => {
            return crate::error(
                ErrorKind::Conflict,
                format!("a running process already has tag {t:?}"),
            );
        }
        Some(t) => t,
        None => loop {
            let t = random_tag();
            if !table.live_with_tag(&t) {
                break t;
            }
        },
    };
    // It outlives this request: no kill on drop.
    command.kill_on_drop(false);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => return crate::exec::spawn_error(&spec.command.cmd, e),
    };
    let Some(pid) = child.id() else {
        return crate::error(
            ErrorKind::Internal,
            "process exited before it could be tracked",
        );
    };
    let (output, _) = broadcast::channel(OUTPUT_BACKLOG);
    let (exit_tx, exit_rx) = watch::channel(None);
    // A tag may be reused once its process ended: the older entry goes.
    table.procs.retain(|_, e| e.tag != tag);
    table.procs.insert(
        pid,
        Entry {
            tag: tag.clone(),
            output: output.clone(),
            exit: exit_rx,
        },
    );
    drop(table);
    let pumps = [
        child
            .stdout
            .take()
            .map(|o| tokio::spawn(pump(o, output.clone(), Chunk::Out))),
        child
            .stderr
            .take()
            .map(|e| tokio::spawn(pump(e, output.clone(), Chunk::Err))),
    ];
    tokio::spawn(async move {
        let status = child.wait().await;
        // Let the output finish before the exit is announced (bounded: a grandchild may keep
        // the pipes open).
        for p in pumps.into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_secs(1), p).await;
        }
        let code = crate::exec::exit_code(status);
        let _ = exit_tx.send(Some(code));
        let mut table = lock();
        table.exited_order.push_back(pid);
        while table.exited_order.len() > KEEP_EXITED {
            if let Some(old) = table.exited_order.pop_front() {
                if table
                    .procs
                    .get(&old)
                    .is_some_and(|e| e.exit.borrow().is_some())
                {
                    table.procs.remove(&old);
                }
            }
        }
    });
    Response::Started { pid, tag }
}

async fn pump<R: AsyncRead + Unpin>(
    mut r: R,
    tx: broadcast::Sender<Chunk>,
    wrap: fn(Vec<u8>) -> Chunk,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            // No viewer: the output is dropped (the process never blocks on its pipe).
            Ok(n) => {
                let _ = tx.send(wrap(buf[..n].to_vec()));
            }
        }
    }
}

/// Streams a background process's output (from now on) and its exit to the host:
/// `Spawned`, `Stdout`/`Stderr` frames, `Exit`. The host hanging up only detaches.
pub async fn attach(selector: String, mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf) {
    let found = {
        let table = lock();
        let hit = match selector.parse::<u32>() {
            Ok(pid) => table.procs.get(&pid).map(|e| (pid, e)),
            Err(_) => table
                .procs
                .iter()
                .find(|(_, e)| e.tag == selector)
                .map(|(p, e)| (*p, e)),
        };
        hit.map(|(pid, e)| (pid, e.output.subscribe(), e.exit.clone()))
    };
    let Some((pid, mut output, mut exit)) = found else {
        let msg = format!("no process {selector} started through the API");
        let _ = write_json(&mut wr, &crate::error(ErrorKind::NotFound, msg)).await;
        return;
    };
    if write_json(&mut wr, &Response::Spawned { pid })
        .await
        .is_err()
    {
        return;
    }
    let mut peer = [0u8; 64];
    loop {
        let ended = *exit.borrow_and_update();
        if let Some(code) = ended {
            // Output sent before the exit is still queued for us: deliver it first.
            while let Ok(chunk) = output.try_recv() {
                if send_chunk(&mut wr, chunk).await.is_err() {
                    return;
                }
            }
            let _ = write_json(&mut wr, &Response::exited(code)).await;
            return;
        }
        tokio::select! {
            chunk = output.recv() => match chunk {
                Ok(c) => if send_chunk(&mut wr, c).await.is_err() { return },
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                // All senders gone: the exit is about to be set.
                Err(broadcast::error::RecvError::Closed) => { let _ = exit.changed().await; }
            },
            _ = exit.changed() => {}
            n = rd.read(&mut peer) => if matches!(n, Ok(0) | Err(_)) { return },
        }
    }
}

async fn send_chunk(wr: &mut OwnedWriteHalf, chunk: Chunk) -> Result<(), envd_proto::ProtoError> {
    match chunk {
        Chunk::Out(b) => write_frame(wr, FrameKind::Stdout, &b).await,
        Chunk::Err(b) => write_frame(wr, FrameKind::Stderr, &b).await,
    }
}
