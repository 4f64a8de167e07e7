//! PID-1 duties: reaping orphans, and one-time work after the guest boots.

use std::process::Command;

/// Called in PID 1 before any thread exists: forks; the child returns and becomes envd, the parent
/// reaps every orphan forever and restarts envd if it dies.
pub fn become_reaper() {
    loop {
        // SAFETY: called before any other thread is started (no runtime yet), so fork only
        // duplicates this single thread and the child may continue running arbitrary code.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            return;
        }
        if pid < 0 {
            eprintln!("envd: fork failed; retrying");
            std::thread::sleep(std::time::Duration::from_millis(500));
            continue;
        }
        loop {
            let mut status = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let reaped = unsafe { libc::waitpid(-1, &mut status, 0) };
            if reaped == pid {
                eprintln!("envd: exited (status {status}); restarting");
                break;
            }
            if reaped < 0 {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Work done once per envd start; nothing here may delay serving requests.
pub fn after_boot() {
    // Grow the root filesystem to the size of the capsule's disk (the overlay may be larger than
    // the template image). Failure only means less free space, so it is logged, not fatal.
    std::thread::spawn(|| {
        if std::path::Path::new("/dev/vda").exists() {
            match Command::new("/sbin/resize2fs").arg("/dev/vda").output() {
                Ok(out) if !out.status.success() => {
                    eprintln!(
                        "envd: resize2fs: {}",
                        String::from_utf8_lossy(&out.stderr).trim()
                    )
                }
                Err(e) => eprintln!("envd: resize2fs: {e}"),
                _ => {}
            }
        }
    });
}

pub fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
