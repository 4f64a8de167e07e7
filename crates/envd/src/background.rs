//! Background processes: started on request, tracked by pid and tag until they exit.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use envd_proto::{write_json, ErrorKind, Response, StartSpec};
use tokio::net::tcp::OwnedWriteHalf;

/// Tags of live background processes by pid. Entries leave when their process exits.
fn table() -> &'static Mutex<HashMap<u32, String>> {
    static TABLE: OnceLock<Mutex<HashMap<u32, String>>> = OnceLock::new();
    TABLE.get_or_init(|| Mutex::new(HashMap::new()))
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<u32, String>> {
    // Each critical section is a single insert/remove/scan: a poisoned table is still whole.
    table().lock().unwrap_or_else(|p| p.into_inner())
}

/// A snapshot of the live background processes' tags by pid.
pub fn tags() -> HashMap<u32, String> {
    lock().clone()
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
    if let Some(cwd) = &spec.command.cwd {
        if !std::path::Path::new(cwd).is_dir() {
            return crate::error(
                ErrorKind::InvalidRequest,
                format!("cwd {cwd} is not a directory"),
            );
        }
    }
    // The table lock is held from the tag check to the insert so two requests cannot both
    // claim one tag.
    let mut procs = lock();
    let tag = match spec.tag.clone() {
        Some(t) => {
            if procs.values().any(|p| *p == t) {
                return crate::error(
                    ErrorKind::Conflict,
                    format!("a running process already has tag {t:?}"),
                );
            }
            t
        }
        None => loop {
            let t = random_tag();
            if !procs.values().any(|p| *p == t) {
                break t;
            }
        },
    };
    let mut command = crate::exec::command(&spec.command);
    // Output is not kept yet (process streams come later); the process must not block on a
    // full pipe, so it writes to /dev/null. It outlives this request: no kill on drop.
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(false);
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            return crate::error(
                ErrorKind::InvalidRequest,
                format!("cannot run {}: {e}", spec.command.cmd),
            )
        }
    };
    let Some(pid) = child.id() else {
        return crate::error(
            ErrorKind::Internal,
            "process exited before it could be tracked",
        );
    };
    procs.insert(pid, tag.clone());
    drop(procs);
    tokio::spawn(async move {
        let _ = child.wait().await;
        lock().remove(&pid);
    });
    Response::Started { pid, tag }
}
