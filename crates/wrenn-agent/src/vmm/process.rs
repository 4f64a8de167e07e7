//! A VM's process as the host sees it: identity (pid and start time, never a recycled pid),
//! whether it still runs, finding QEMU processes by command line, killing one and waiting.

use std::time::Duration;

use super::VmProcess;
use crate::error::{HostError, Result};

/// SIGKILLs `vm` and waits until its process is gone.
pub(super) async fn kill_and_wait(vm: &VmProcess) -> Result<()> {
    if !is_running(vm) {
        return Ok(());
    }
    // The capsule's state is being thrown away, so there is nothing to flush: kill at once.
    // SAFETY: kill(2) on a pid whose start time proves it is still this capsule's QEMU.
    unsafe {
        libc::kill(vm.pid as i32, libc::SIGKILL);
    }
    for _ in 0..500 {
        if !is_running(vm) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Err(HostError::Vmm(format!("qemu pid {} did not exit", vm.pid)))
}

/// True while the VM's process lives: same pid *and* same start time (so a recycled pid never
/// passes), and not a zombie. Reads only /proc/<pid>/stat, which never blocks on the process's
/// memory (a busy QEMU's cmdline can read back empty; identifying VMs by it once leaked one).
pub fn is_running(vm: &VmProcess) -> bool {
    match stat_fields(vm.pid) {
        Some((state, start)) => state != 'Z' && start == vm.start_time,
        None => false,
    }
}

/// The process's start time (clock ticks after boot), stable across exec.
pub fn process_start_time(pid: u32) -> Option<u64> {
    stat_fields(pid).map(|(_, start)| start)
}

/// (state, starttime) from /proc/<pid>/stat.
fn stat_fields(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces and parentheses: fields start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: field 3 (state) is fields[0], field 22 (starttime) is fields[19].
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

pub(super) fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|c| c.trim().to_string())
}

/// QEMU processes whose command line mentions `needle` (e.g. an agent's capsules directory),
/// with their `-name`.
pub(super) fn find_mentioning(needle: &str) -> Vec<(u32, String)> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| comm(*pid).is_some_and(|c| c.starts_with("qemu-system")))
        .filter(|pid| stat_fields(*pid).is_some_and(|(state, _)| state != 'Z'))
        .filter_map(|pid| {
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let args: Vec<&[u8]> = cmd.split(|&b| b == 0).collect();
            if !args
                .iter()
                .any(|a| String::from_utf8_lossy(a).contains(needle))
            {
                return None;
            }
            Some((pid, name_in(&args)?))
        })
        .collect()
}

/// The `-name` a QEMU process was started with (its capsule id, and its cgroup's name).
pub(super) fn vm_name(pid: u32) -> Option<String> {
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    name_in(&cmd.split(|&b| b == 0).collect::<Vec<_>>())
}

fn name_in(args: &[&[u8]]) -> Option<String> {
    args.iter()
        .position(|a| *a == b"-name")
        .and_then(|i| args.get(i + 1))
        .map(|n| String::from_utf8_lossy(n).to_string())
}

/// Whether `pid` has exited: gone, or a zombie nobody reaps (an adopted VM whose parent, a
/// previous agent, is gone, on a host whose init does not reap orphans).
pub(super) fn has_exited(pid: u32) -> bool {
    stat_fields(pid).is_none_or(|(state, _)| state == 'Z')
}

/// PIDs of the QEMU processes whose command line names `id` (diagnostics and tests; the agent
/// itself identifies its VMs by pid and start time).
pub fn find_by_name(id: &str) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| comm(*pid).is_some_and(|c| c.starts_with("qemu-system")))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|a| a == id.as_bytes()))
                .unwrap_or(false)
        })
        .filter(|pid| stat_fields(*pid).is_some_and(|(state, _)| state != 'Z'))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_is_pid_and_start_time() {
        let pid = std::process::id();
        let start_time = process_start_time(pid).expect("own stat is readable");
        let me = VmProcess {
            pid,
            start_time,
            qmp_socket: "/nonexistent".into(),
            console_log: "/nonexistent".into(),
            cgroup: None,
            uid: None,
            lifeline_socket: None,
        };
        assert!(is_running(&me));
        let recycled = VmProcess {
            start_time: start_time + 1,
            ..me.clone()
        };
        assert!(
            !is_running(&recycled),
            "same pid, other start time: not ours"
        );
        assert!(!is_running(&VmProcess {
            pid: u32::MAX,
            ..me
        }));
    }
}
