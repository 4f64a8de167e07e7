//! Confinement of one VM's QEMU, the way Firecracker's jailer confines its VMM.
//!
//! Between fork and exec ([`Jail::enter`], from `Command::pre_exec`), still as root, the child:
//! 1. joins the slot's network namespace, where QEMU opens `tap0` (owned by the VM's uid, so
//!    QEMU needs no capability to attach it);
//! 2. enters a mount namespace of its own whose root is a fresh tmpfs holding only: `/usr` and
//!    the loader cache, read-only (QEMU, its libraries, its firmware); the device nodes it
//!    opens, made there for its uid alone; a `/proc` that shows only its own processes; the kernel, the initramfs and every
//!    image of its disk's backing chain, read-only at their host paths; its writable disk and
//!    console log, read-write at their host paths. The host's data directory, other capsules'
//!    files, the platform's keys and records are not in it. The root itself is read-only;
//! 3. empties its capability bounding set, takes the VM's own uid and gid (no other group) and
//!    sets `no_new_privs`.
//!
//! QEMU then starts with no capability and installs its own seccomp filter (`-sandbox on`).
//! What else it needs comes as descriptors: its memory (a sealed copy of a template's RAM, or
//! a file lent to its uid), its QMP and lifeline sockets (listening sockets the agent bound),
//! states to load or save, and disks added later (a live snapshot's new overlay).
//!
//! Everything that allocates happens before the fork, in [`Jail::prepare`]: after a fork in a
//! threaded process the child may only make async-signal-safe calls, and [`Jail::enter`] makes
//! nothing but system calls on data prepared here.

use std::collections::BTreeSet;
use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// What one VM's QEMU may see and who it runs as.
#[derive(Debug, Clone)]
pub struct JailSpec {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (none for a VM: its devices are its own).
    pub groups: Vec<u32>,
    /// The network namespace (a name under `/run/netns`).
    pub netns: String,
    /// An empty directory on the host that the jail's root is mounted on (inside the new
    /// namespace only, so every VM can use the same one).
    pub root: PathBuf,
    /// Files and directories visible read-only, at their host paths.
    pub read_only: Vec<PathBuf>,
    /// Files visible read-write, at their host paths.
    pub read_write: Vec<PathBuf>,
    /// Device nodes it may open (made anew in the jail, its uid's alone: the host's may be
    /// root's only, as `/dev/net/tun` and `/dev/kvm` often are).
    pub devices: Vec<PathBuf>,
    /// Descriptors QEMU inherits (their numbers are on its command line).
    pub fds: Vec<RawFd>,
    /// Scheduling niceness.
    pub nice: libc::c_int,
}

/// The host paths every VM needs: the system (QEMU, libraries, firmware) and the loader's
/// cache. Top-level names that are symlinks on the host (`/lib -> usr/lib` on merged-/usr
/// systems) become the same symlinks in the jail; real directories are bound read-only.
const SYSTEM_DIRS: [&str; 5] = ["/usr", "/bin", "/sbin", "/lib", "/lib64"];
const SYSTEM_FILES: [&str; 1] = ["/etc/ld.so.cache"];
/// Device nodes every VM may open (`/dev/kvm` is added under KVM).
pub const DEVICES: [&str; 5] = [
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/net/tun",
];

#[derive(Debug, PartialEq, Eq)]
struct Bind {
    source: CString,
    /// The mount point, under the jail's root.
    target: CString,
    dir: bool,
    read_only: bool,
}

/// A [`JailSpec`] made ready for the child: see the module documentation.
#[derive(Debug)]
pub struct Jail {
    netns: OwnedFd,
    root: CString,
    /// Directories to make under the root, parents first.
    dirs: Vec<CString>,
    /// (what the link points to, where it is) under the root.
    symlinks: Vec<(CString, CString)>,
    binds: Vec<Bind>,
    /// Character devices to make, with their numbers.
    nodes: Vec<(CString, libc::dev_t)>,
    proc_dir: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    fds: Vec<RawFd>,
    nice: libc::c_int,
}

fn cstring(p: &Path) -> std::io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other(format!("{} holds a NUL byte", p.display())))
}

/// `path` as it appears under `root`.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

impl Jail {
    /// Opens the namespace and plans every mount (nothing changes on the host).
    pub fn prepare(spec: &JailSpec) -> std::io::Result<Jail> {
        let netns: OwnedFd = std::fs::File::open(Path::new("/run/netns").join(&spec.netns))?.into();
        let mut symlinks = Vec::new();
        // (host path, is a directory, read-only)
        let mut mounts: Vec<(PathBuf, bool, bool)> = Vec::new();
        for d in SYSTEM_DIRS {
            let p = Path::new(d);
            match std::fs::symlink_metadata(p) {
                Ok(m) if m.file_type().is_symlink() => {
                    symlinks.push((std::fs::read_link(p)?, p.to_path_buf()))
                }
                Ok(m) if m.is_dir() => mounts.push((p.to_path_buf(), true, true)),
                _ => {}
            }
        }
        for f in SYSTEM_FILES.iter().map(Path::new).filter(|f| f.exists()) {
            mounts.push((f.to_path_buf(), false, true));
        }
        for p in &spec.read_only {
            mounts.push((p.clone(), p.is_dir(), true));
        }
        for p in &spec.read_write {
            mounts.push((p.clone(), false, false));
        }
        let mut nodes = Vec::new();
        for d in &spec.devices {
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let m = std::fs::metadata(d)?;
            if !m.file_type().is_char_device() {
                return Err(std::io::Error::other(format!(
                    "{} is not a character device",
                    d.display()
                )));
            }
            nodes.push((d.clone(), m.rdev()));
        }
        // A path inside a directory bound already is visible through it (the QEMU binary in
        // /usr); binding it again would only hide the directory's view of it.
        let bound_dirs: Vec<PathBuf> = mounts
            .iter()
            .filter(|(_, dir, _)| *dir)
            .map(|(p, ..)| p.clone())
            .collect();
        // Sorted by path (parents first), read-write first where a file is listed as both:
        // it wins.
        mounts.sort_by(|a, b| a.0.cmp(&b.0).then(a.2.cmp(&b.2)));
        let mut seen = BTreeSet::new();
        mounts.retain(|(p, ..)| {
            let covered = bound_dirs.iter().any(|d| p != d && p.starts_with(d));
            !covered && seen.insert(p.clone())
        });

        let mut dirs = BTreeSet::new();
        let mut add_parents = |p: &Path, include_self: bool| {
            let mut cur = Some(if include_self {
                p
            } else {
                p.parent().unwrap_or(p)
            });
            while let Some(c) = cur {
                if c == Path::new("/") {
                    break;
                }
                dirs.insert(c.to_path_buf());
                cur = c.parent();
            }
        };
        for (p, dir, _) in &mounts {
            add_parents(p, *dir);
        }
        for (_, link) in &symlinks {
            add_parents(link, false);
        }
        for (node, _) in &nodes {
            add_parents(node, false);
        }
        add_parents(Path::new("/proc"), true);
        let root = &spec.root;
        Ok(Jail {
            netns,
            root: cstring(root)?,
            dirs: dirs
                .iter()
                .map(|d| cstring(&under(root, d)))
                .collect::<std::io::Result<_>>()?,
            symlinks: symlinks
                .iter()
                .map(|(to, link)| Ok((cstring(to)?, cstring(&under(root, link))?)))
                .collect::<std::io::Result<_>>()?,
            binds: mounts
                .iter()
                .map(|(p, dir, ro)| {
                    Ok(Bind {
                        source: cstring(p)?,
                        target: cstring(&under(root, p))?,
                        dir: *dir,
                        read_only: *ro,
                    })
                })
                .collect::<std::io::Result<_>>()?,
            nodes: nodes
                .iter()
                .map(|(p, rdev)| Ok((cstring(&under(root, p))?, *rdev)))
                .collect::<std::io::Result<_>>()?,
            proc_dir: cstring(&under(root, Path::new("/proc")))?,
            uid: spec.uid,
            gid: spec.gid,
            groups: spec.groups.clone(),
            fds: spec.fds.clone(),
            nice: spec.nice,
        })
    }

    /// Confines the calling process (see the module documentation). Only for the child
    /// between fork and exec: it changes the whole process for good.
    ///
    /// # Safety
    /// Call only in a freshly forked child that will exec next (as `pre_exec` does): it makes
    /// only system calls, on memory prepared before the fork, and allocates nothing.
    pub unsafe fn enter(&self) -> std::io::Result<()> {
        // SAFETY (for every call below): each is a plain system call whose pointer arguments
        // are NUL-terminated strings or arrays owned by `self`, alive for the call; none keeps
        // a pointer after returning.
        unsafe {
            // Guests yield to the platform: a busy VM must not delay the control plane's and
            // agent's answers (QEMU and all its threads inherit this).
            check(
                libc::setpriority(libc::PRIO_PROCESS, 0, self.nice),
                b"setpriority",
            )?;
            check(
                libc::setns(self.netns.as_raw_fd(), libc::CLONE_NEWNET),
                b"setns",
            )?;
            check(libc::unshare(libc::CLONE_NEWNS), b"unshare")?;
            // Nothing mounted from here on propagates back to the host.
            let none = std::ptr::null::<libc::c_char>();
            check(
                libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ),
                b"making mounts private",
            )?;
            check(
                libc::mount(
                    c"tmpfs".as_ptr(),
                    self.root.as_ptr(),
                    c"tmpfs".as_ptr(),
                    // Not `nodev`: the jail's device nodes live here.
                    libc::MS_NOSUID,
                    c"mode=0755,size=1m".as_ptr().cast(),
                ),
                b"mounting the root",
            )?;
            for d in &self.dirs {
                if libc::mkdir(d.as_ptr(), 0o755) != 0 && errno() != libc::EEXIST {
                    return Err(fail(b"mkdir"));
                }
            }
            for (to, link) in &self.symlinks {
                check(libc::symlink(to.as_ptr(), link.as_ptr()), b"symlink")?;
            }
            for b in &self.binds {
                if !b.dir {
                    let fd = libc::open(
                        b.target.as_ptr(),
                        libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                        0o600,
                    );
                    check(fd, b"making a mount point")?;
                    libc::close(fd);
                }
                let flags = libc::MS_BIND | if b.dir { libc::MS_REC } else { 0 };
                check(
                    libc::mount(
                        b.source.as_ptr(),
                        b.target.as_ptr(),
                        none,
                        flags,
                        std::ptr::null(),
                    ),
                    b"bind mount",
                )?;
                if b.read_only {
                    check(
                        libc::mount(
                            none,
                            b.target.as_ptr(),
                            none,
                            libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
                            std::ptr::null(),
                        ),
                        b"read-only remount",
                    )?;
                }
            }
            for (node, rdev) in &self.nodes {
                check(
                    libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, *rdev),
                    b"mknod",
                )?;
                check(
                    libc::chown(node.as_ptr(), self.uid, self.gid),
                    b"chown of a device",
                )?;
            }
            // Its own processes only (`hidepid=invisible` needs Linux 5.8; `2` is the older
            // spelling of nearly the same).
            let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
            if libc::mount(
                c"proc".as_ptr(),
                self.proc_dir.as_ptr(),
                c"proc".as_ptr(),
                proc_flags,
                c"hidepid=invisible".as_ptr().cast(),
            ) != 0
            {
                check(
                    libc::mount(
                        c"proc".as_ptr(),
                        self.proc_dir.as_ptr(),
                        c"proc".as_ptr(),
                        proc_flags,
                        c"hidepid=2".as_ptr().cast(),
                    ),
                    b"mounting /proc",
                )?;
            }
            // The tmpfs becomes the root; the host's is detached (pivot_root(2)'s "." idiom).
            check(libc::chdir(self.root.as_ptr()), b"chdir")?;
            check(
                libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
                b"pivot_root",
            )?;
            check(
                libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
                b"detaching the host's root",
            )?;
            check(libc::chdir(c"/".as_ptr()), b"chdir /")?;
            check(
                libc::mount(
                    none,
                    c"/".as_ptr(),
                    none,
                    libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID,
                    std::ptr::null(),
                ),
                b"read-only root",
            )?;
            for fd in &self.fds {
                check(libc::fcntl(*fd, libc::F_SETFD, 0), b"passing a descriptor")?;
            }
            // No capability can come back, whatever it executes.
            for cap in 0..=63 {
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 && errno() != libc::EINVAL
                {
                    return Err(fail(b"dropping capabilities"));
                }
            }
            check(
                libc::setgroups(self.groups.len(), self.groups.as_ptr()),
                b"setgroups",
            )?;
            check(libc::setresgid(self.gid, self.gid, self.gid), b"setresgid")?;
            check(libc::setresuid(self.uid, self.uid, self.uid), b"setresuid")?;
            check(
                libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
                b"no_new_privs",
            )?;
        }
        Ok(())
    }
}

/// `Ok` for a system call's non-negative answer; otherwise the error, named on stderr (QEMU's
/// log) first, as nothing else may be formatted here.
fn check(ret: libc::c_int, step: &'static [u8]) -> std::io::Result<()> {
    if ret >= 0 {
        Ok(())
    } else {
        Err(fail(step))
    }
}

fn errno() -> libc::c_int {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn fail(step: &'static [u8]) -> std::io::Error {
    let err = std::io::Error::last_os_error();
    // SAFETY: write(2) of static byte strings to the standard error descriptor.
    unsafe {
        libc::write(2, b"wrenn jail: ".as_ptr().cast(), 12);
        libc::write(2, step.as_ptr().cast(), step.len());
        libc::write(2, b" failed\n".as_ptr().cast(), 8);
    }
    err
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JailSpec {
        JailSpec {
            uid: 1 << 30,
            gid: 1 << 30,
            groups: vec![],
            netns: "wrenn-test-jail-plan".into(),
            root: "/run/jail".into(),
            read_only: vec![
                "/data/images/k".into(),
                "/usr/bin/qemu".into(),
                "/data/c/base".into(),
            ],
            read_write: vec![
                "/data/c/disk".into(),
                "/data/c/console.log".into(),
                "/data/c/base".into(),
            ],
            devices: DEVICES.iter().map(PathBuf::from).collect(),
            fds: vec![7],
            nice: 5,
        }
    }

    #[test]
    fn plans_only_the_listed_files() {
        // `prepare` opens the namespace: make one for the test.
        let ns = "wrenn-test-jail-plan";
        let _ = std::process::Command::new("ip")
            .args(["netns", "add", ns])
            .output();
        if !Path::new("/run/netns").join(ns).exists() {
            eprintln!("skipped: cannot make a network namespace here");
            return;
        }
        let jail = Jail::prepare(&spec());
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", ns])
            .output();
        let jail = jail.unwrap();
        let targets: Vec<(&str, bool)> = jail
            .binds
            .iter()
            .map(|b| (b.target.to_str().unwrap(), b.read_only))
            .collect();
        // The binary is inside /usr; the file listed twice is read-write once.
        assert!(!targets.iter().any(|(t, _)| t.ends_with("/usr/bin/qemu")));
        assert!(targets.contains(&("/run/jail/data/c/base", false)));
        assert!(!targets.contains(&("/run/jail/data/c/base", true)));
        assert!(targets.contains(&("/run/jail/data/images/k", true)));
        let nodes: Vec<&str> = jail
            .nodes
            .iter()
            .map(|(n, _)| n.to_str().unwrap())
            .collect();
        assert!(nodes.contains(&"/run/jail/dev/net/tun"));
        assert!(!targets.iter().any(|(t, _)| t.starts_with("/run/jail/dev")));
        assert!(targets.contains(&("/run/jail/usr", true)));
        let dirs: Vec<&str> = jail.dirs.iter().map(|d| d.to_str().unwrap()).collect();
        // Parents before children; nothing of the host's tree beyond the listed paths.
        let pos = |d: &str| dirs.iter().position(|x| *x == d).unwrap();
        assert!(pos("/run/jail/data") < pos("/run/jail/data/c"));
        assert!(pos("/run/jail/dev") < pos("/run/jail/dev/net"));
        assert!(dirs.contains(&"/run/jail/proc"));
        assert!(!dirs.iter().any(|d| d.ends_with("/data/c/disk")));
    }
}
