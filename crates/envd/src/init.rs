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

/// After a restore: set the wall clock and mix the host's seed into the entropy pool.
pub fn restored(unix_nanos: u64, seed_hex: &str) -> Result<(), String> {
    let ts = libc::timespec {
        tv_sec: (unix_nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads a timespec from a live local.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "cannot set the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    let seed: Vec<u8> = (0..seed_hex.len() / 2)
        .filter_map(|i| u8::from_str_radix(seed_hex.get(2 * i..2 * i + 2)?, 16).ok())
        .collect();
    // Writing to the pool mixes the bytes in (without crediting entropy, which needs no more:
    // the pool was already initialised before the snapshot).
    std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .and_then(|mut f| std::io::Write::write_all(&mut f, &seed))
        .map_err(|e| format!("cannot seed the entropy pool: {e}"))
}

pub fn kernel_version() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".to_string())
}
