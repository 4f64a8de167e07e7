//! Listing and signalling the guest's processes.

use envd_proto::{write_json, ErrorKind, ProcessInfo, Response, Signal};
use tokio::net::tcp::OwnedWriteHalf;

pub async fn list(mut wr: OwnedWriteHalf) {
    let _ = write_json(&mut wr, &Response::Processes { processes: scan() }).await;
}

pub async fn signal(selector: String, signal: Signal, mut wr: OwnedWriteHalf) {
    let _ = write_json(&mut wr, &send(&selector, signal)).await;
}

/// Every user process: kernel threads (no command line) and envd itself are left out, so a
/// user can neither see nor kill the platform's own agent.
fn scan() -> Vec<ProcessInfo> {
    let own = std::process::id();
    let tags = crate::background::tags();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<ProcessInfo> = rd
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != 1 && pid != own)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let mut argv = raw
                .split(|&b| b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned());
            let cmd = argv.next()?;
            Some(ProcessInfo {
                pid,
                tag: tags.get(&pid).cloned(),
                cmd,
                args: argv.collect(),
            })
        })
        .collect();
    out.sort_by_key(|p| p.pid);
    out
}

fn send(selector: &str, signal: Signal) -> Response {
    let sig = match signal {
        Signal::Kill => libc::SIGKILL,
        Signal::Term => libc::SIGTERM,
    };
    let tags = crate::background::tags();
    let (pid, ours) = match selector.parse::<u32>() {
        Ok(pid) => (pid, tags.contains_key(&pid)),
        Err(_) => match tags.iter().find(|(_, t)| t.as_str() == selector) {
            Some((&pid, _)) => (pid, true),
            None => {
                return crate::error(
                    ErrorKind::NotFound,
                    format!("no running process with tag {selector:?}"),
                )
            }
        },
    };
    if pid <= 1 || pid == std::process::id() || !scan().iter().any(|p| p.pid == pid) {
        return crate::error(
            ErrorKind::NotFound,
            format!("no running process {selector}"),
        );
    }
    // Processes envd started lead their own process group: signal the whole group so a shell's
    // children go too. Others get the signal alone.
    let target = if ours { -(pid as i32) } else { pid as i32 };
    // SAFETY: kill(2) with a pid (or negated process-group id) that was just seen in /proc.
    let rc = unsafe { libc::kill(target, sig) };
    if rc == 0 {
        Response::Done
    } else {
        crate::error(
            ErrorKind::NotFound,
            format!(
                "cannot signal {selector}: {}",
                std::io::Error::last_os_error()
            ),
        )
    }
}
