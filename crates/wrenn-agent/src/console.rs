//! A capsule's serial console log (`console.log`, appended to by QEMU): bounded on disk and read
//! from its end.
//!
//! The guest decides what it prints, so the log is a ring: when more than [`CONSOLE_LIMIT`] of
//! it takes disk space, everything but the last [`CONSOLE_KEEP`] is punched out of the file
//! (`FALLOC_FL_PUNCH_HOLE`: QEMU keeps appending at its end, the start becomes a hole that
//! takes no space). The metrics sampler checks every running capsule twice a second, so a
//! guest printing as fast as its console goes costs at most a few MiB. Reading seeks to the
//! end and takes at most [`TAIL_BYTES`]: a flooded log costs nothing to read either.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Disk space a console log may take before its head is dropped.
pub const CONSOLE_LIMIT: u64 = 2 * 1024 * 1024;
/// What is kept when the head is dropped.
pub const CONSOLE_KEEP: u64 = 1024 * 1024;
/// At most this much of the log's end is read for [`tail`].
pub const TAIL_BYTES: u64 = 16 * 1024;
/// Lines [`tail`] returns, and the length each is cut to.
const TAIL_LINES: usize = 8;
const LINE_CHARS: usize = 300;

/// Drops the head of the log at `path` once it takes more than [`CONSOLE_LIMIT`] of disk.
/// Returns the bytes released. Best effort: a missing file or a file system without hole
/// punching is left as it is.
pub fn bound(path: &Path) -> u64 {
    let Ok(file) = File::options().write(true).open(path) else {
        return 0;
    };
    let Ok(meta) = file.metadata() else { return 0 };
    // st_blocks counts 512-byte units whatever the file system's block size.
    let used = meta.blocks() * 512;
    if used <= CONSOLE_LIMIT {
        return 0;
    }
    // Whole pages only, so no partly written page of the kept end is touched.
    let cut = meta.len().saturating_sub(CONSOLE_KEEP) & !4095;
    if cut == 0 {
        return 0;
    }
    // SAFETY: fallocate(2) on a file descriptor this function owns, with plain integer
    // arguments; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            cut as libc::off_t,
        )
    };
    if r != 0 {
        return 0;
    }
    let after = file.metadata().map(|m| m.blocks() * 512).unwrap_or(used);
    used.saturating_sub(after)
}

/// The last lines of the log at `path` (for error messages), joined with ` | `; reads only
/// its last [`TAIL_BYTES`].
pub fn tail(path: &Path) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut bytes = Vec::with_capacity((len - start) as usize);
    if file.take(TAIL_BYTES).read_to_end(&mut bytes).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<&str> = text.lines().rev().filter(|l| !l.is_empty()).collect();
    // The first line read may have been cut by the seek: keep it only if it was the start.
    if start > 0 && lines.len() > TAIL_LINES {
        lines.pop();
    }
    let mut kept: Vec<String> = lines
        .into_iter()
        .take(TAIL_LINES)
        .map(|l| {
            // Holes (punched out) and control bytes read as NULs: not worth showing.
            let clean: String = l.chars().filter(|c| !c.is_control()).collect();
            match clean.char_indices().nth(LINE_CHARS) {
                Some((i, _)) => format!("{}…", &clean[..i]),
                None => clean,
            }
        })
        .filter(|l| !l.is_empty())
        .collect();
    kept.reverse();
    kept.join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_flooded_log_keeps_only_its_end_on_disk_and_reads_fast() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let mut f = File::options()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap();
        let line = format!("{}\n", "x".repeat(1023));
        for _ in 0..8 * 1024 {
            f.write_all(line.as_bytes()).unwrap();
        }
        f.write_all(b"the last words\n").unwrap();
        f.sync_all().unwrap();
        let size = f.metadata().unwrap().len();
        let released = bound(&path);
        let meta = std::fs::metadata(&path).unwrap();
        if released == 0 {
            // A file system without hole punching (some tmpfs setups): nothing to check.
            eprintln!("hole punching unsupported here; skipped");
            return;
        }
        assert!(
            meta.blocks() * 512 <= CONSOLE_KEEP + 8192,
            "{} bytes used",
            meta.blocks() * 512
        );
        assert_eq!(meta.len(), size, "the writer's offset is untouched");
        // The writer appends on as before.
        f.write_all(b"and after\n").unwrap();
        let t = tail(&path);
        assert!(t.ends_with("the last words | and after"), "{t}");
        assert!(t.len() < TAIL_LINES * (LINE_CHARS + 8), "{}", t.len());
        // Under the limit: untouched.
        assert_eq!(bound(&path), 0);
    }

    #[test]
    fn tail_of_a_small_or_missing_log() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        assert_eq!(tail(&path), "");
        std::fs::write(&path, "one\n\ntwo\nthree").unwrap();
        assert_eq!(tail(&path), "one | two | three");
        assert_eq!(bound(&path), 0);
    }
}
