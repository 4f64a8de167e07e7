//! Guest RAM that lives in files, handed to jailed VMs as descriptors.
//!
//! A capsule restored from a template maps the template's RAM file copy-on-write
//! (`share=off`). QEMU 7.2 opens such a file read-write even so, which a VM's own uid must not
//! be able to do to a file every capsule of the template shares. So each template RAM file is
//! copied once into a memfd sealed against writes, growth and shrinking ([`TemplateRam`]): any
//! uid may open it read-write through `/proc/self/fd/N`, nobody can change it, and private
//! mappings of it still share its pages between capsules. Copies unused for
//! [`KEEP_UNUSED`] are dropped (a running VM keeps its own mapping).
//!
//! A copy is allocated whole, holes included: a fault on a hole of a shared-memory file
//! allocates a page in it, even in a private mapping, and that page would be charged to the
//! faulting VM's cgroup as unreclaimable memory (a VM reading its RAM's untouched pages was
//! killed at its limit). Allocated up front, the copy is charged once, to the agent, and costs
//! the template's RAM size while it is kept.
//!
//! A RAM file a VM writes through (`share=on`: a template being made) is lent to the VM's uid
//! for as long as it runs ([`lend`]) and given back to root after.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::{HostError, Result};

/// How long a template's sealed copy is kept without a VM starting from it.
pub const KEEP_UNUSED: Duration = Duration::from_secs(600);
const PAGE: usize = 4096;

/// What identifies one version of a file: a rebuilt template gets a new copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Version {
    dev: u64,
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

impl Version {
    fn of(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime_ns: i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec()),
        }
    }
}

struct Copy {
    version: Version,
    fd: Arc<OwnedFd>,
    used: Instant,
}

/// Sealed copies of template RAM files, by path.
#[derive(Default)]
pub struct TemplateRam {
    copies: tokio::sync::Mutex<HashMap<PathBuf, Copy>>,
}

impl TemplateRam {
    /// A sealed copy of the RAM file `path` (made now if there is none of this version).
    pub async fn get(&self, path: &Path) -> Result<Arc<OwnedFd>> {
        let version = Version::of(&std::fs::metadata(path)?);
        // One copy at a time: two VMs starting from a new template wait for one copy.
        let mut copies = self.copies.lock().await;
        copies.retain(|_, c| c.used.elapsed() < KEEP_UNUSED);
        if let Some(c) = copies.get_mut(path).filter(|c| c.version == version) {
            c.used = Instant::now();
            return Ok(c.fd.clone());
        }
        let source = path.to_path_buf();
        let fd = tokio::task::spawn_blocking(move || sealed_copy(&source))
            .await
            .map_err(|e| HostError::Vmm(format!("copying template memory: {e}")))??;
        let fd = Arc::new(fd);
        copies.insert(
            path.to_path_buf(),
            Copy {
                version,
                fd: fd.clone(),
                used: Instant::now(),
            },
        );
        Ok(fd)
    }
}

/// A memfd holding `path`'s bytes, every page allocated, sealed.
fn sealed_copy(path: &Path) -> std::io::Result<OwnedFd> {
    let src = File::open(path)?;
    let len = src.metadata()?.len();
    // SAFETY: memfd_create reads a static NUL-terminated name and returns a new descriptor
    // (or -1), which is owned from here on.
    let dst = unsafe {
        let raw = libc::memfd_create(
            c"wrenn-template-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        );
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        File::from(OwnedFd::from_raw_fd(raw))
    };
    dst.set_len(len)?;
    // SAFETY: fallocate on a descriptor we own, with integer arguments.
    if unsafe { libc::fallocate(dst.as_raw_fd(), 0, 0, len as libc::off_t) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while pos < len {
        let Some((data, hole)) = next_data(&src, pos)? else {
            break;
        };
        let mut at = data;
        while at < hole {
            let n = buf.len().min((hole - at) as usize);
            src.read_exact_at(&mut buf[..n], at)?;
            for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    dst.write_all_at(page, at + (i * PAGE) as u64)?;
                }
            }
            at += n as u64;
        }
        pos = hole;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with integer arguments.
    if unsafe { libc::fcntl(dst.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dst.into())
}

/// The next (start, end) of data at or after `pos` (SEEK_DATA/SEEK_HOLE); `None` past the
/// last data.
fn next_data(f: &File, pos: u64) -> std::io::Result<Option<(u64, u64)>> {
    // SAFETY: lseek on a descriptor we own, with integer arguments.
    let data = unsafe { libc::lseek(f.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(f.as_raw_fd(), data, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(Some((data as u64, hole as u64)))
}

/// Opens (creating) the RAM file `path` read-write and gives it to `uid`:`gid`, for a VM that
/// writes its RAM through to it; [`give_back`] returns it to root once the VM is gone.
pub fn lend(path: &Path, uid: u32, gid: u32) -> std::io::Result<File> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)?;
    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    Ok(f)
}

/// Makes `path` root's again (it may be gone: nothing to do then).
pub fn give_back(path: &Path) {
    if let Err(e) = std::os::unix::fs::chown(path, Some(0), Some(0)) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(file = %path.display(), error = %e, "cannot give a VM's file back to root");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn copies_are_sealed_whole_and_kept_per_version() {
        let dir = std::env::temp_dir().join(format!("wrenn-ram-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ram");
        let f = File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(b"hello", 8 << 20).unwrap();
        f.write_all_at(&[0u8; 3 * PAGE], 16 << 20).unwrap();
        drop(f);

        let ram = TemplateRam::default();
        let fd = ram.get(&path).await.unwrap();
        let copy = File::from(fd.try_clone().unwrap());
        assert_eq!(copy.metadata().unwrap().len(), 64 << 20);
        let mut got = [0u8; 5];
        copy.read_exact_at(&mut got, 8 << 20).unwrap();
        assert_eq!(&got, b"hello");
        // Sealed: no writes, whoever asks.
        assert!(copy.write_all_at(b"x", 0).is_err());
        // Whole: no fault on it allocates later (and charges the faulting VM).
        assert!(copy.metadata().unwrap().blocks() * 512 >= 64 << 20);
        // The same version is the same copy; a new one is copied again.
        assert_eq!(ram.get(&path).await.unwrap().as_raw_fd(), fd.as_raw_fd());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_all_at(b"again", 0)
            .unwrap();
        let newer = ram.get(&path).await.unwrap();
        assert_ne!(newer.as_raw_fd(), fd.as_raw_fd());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
