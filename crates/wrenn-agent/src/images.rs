//! Guest images: the kernel, the initramfs that carries envd, and template root filesystems.
//!
//! Every artefact is built once and cached under `<data>/images`, named by a hash of what it was
//! built from (its recipe), so a changed recipe or envd binary produces a new artefact and an
//! unchanged one is never rebuilt. Builds write into a temporary name and rename at the end: a
//! crash mid-build never leaves a half-built artefact under its final name.

use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::cmd;
use crate::error::{HostError, Result};

/// Kernel modules the initramfs loads, in dependency order (no modules.dep in the initramfs).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio-rng",
    "virtio_console",
];

/// The guest's `/init`: loads drivers, configures the network from kernel-command-line variables,
/// mounts the root disk and hands over to envd (which becomes PID 1).
const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t devtmpfs dev /dev
mount -t proc proc /proc
mount -t sysfs sys /sys
for m in MODULES; do insmod /lib/modules/$m.ko || echo "init: insmod $m failed"; done
if [ -n "$WRENN_PROBE" ]; then echo WRENN-PROBE-OK; poweroff -f; fi
hostname capsule
ip link set lo up
ip addr add "$WRENN_IP" dev eth0
ip link set eth0 up
ip route add default via "$WRENN_GW"
arp -i eth0 -s "$WRENN_GW" "$WRENN_GWMAC" || echo "init: static arp entry failed"
i=0
while [ ! -b /dev/vda ] && [ $i -lt 500 ]; do sleep 0.01; i=$((i+1)); done
# noinit_itable: no background zeroing of inode tables (the grown filesystem's new groups would
# otherwise keep every fresh capsule's CPU and disk busy for seconds).
mount -t ext4 -o rw,noatime,noinit_itable /dev/vda /newroot || { echo "init: cannot mount root"; poweroff -f; }
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp
mount -t tmpfs -o mode=755 tmpfs /newroot/run
mkdir -p /newroot/run/wrenn
cp /envd /newroot/run/wrenn/envd
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 tmpfs /newroot/dev/shm
exec switch_root /newroot /run/wrenn/envd
"#;

/// A recipe for a template root filesystem.
#[derive(Debug, Clone, Copy)]
pub struct RootfsRecipe {
    pub name: &'static str,
    pub suite: &'static str,
    pub packages: &'static [&'static str],
    pub size_mb: u32,
}

/// Fix-ups run inside the fresh rootfs (chroot) before it is packed into an image.
const ROOTFS_FIXUP: &str = r#"set -e
echo capsule > /etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 capsule\n::1 localhost ip6-localhost ip6-loopback\n' > /etc/hosts
printf 'nameserver 1.1.1.1\nnameserver 8.8.8.8\noptions timeout:2 attempts:2\n' > /etc/resolv.conf
id user >/dev/null 2>&1 || useradd -m -s /bin/bash user
echo 'user ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/user
chmod 440 /etc/sudoers.d/user
printf '/dev/vda / ext4 rw,noatime 0 1\n' > /etc/fstab
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* /var/log/*.log
"#;

/// The templates this host can build. `minimal` is the platform default.
pub const TEMPLATES: &[RootfsRecipe] = &[RootfsRecipe {
    name: "minimal",
    suite: "bookworm",
    packages: &[
        "bash",
        "coreutils",
        "procps",
        "iproute2",
        "curl",
        "ca-certificates",
        "git",
        "sudo",
        "e2fsprogs",
        "less",
    ],
    size_mb: 1024,
}];

pub fn recipe(name: &str) -> Option<&'static RootfsRecipe> {
    TEMPLATES.iter().find(|r| r.name == name)
}

impl RootfsRecipe {
    pub fn hash(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.name);
        h.update(self.suite);
        for p in self.packages {
            h.update(p);
            h.update(b",");
        }
        h.update(ROOTFS_FIXUP);
        h.update(self.size_mb.to_le_bytes());
        hex::encode(&h.finalize()[..8])
    }
}

/// The kernel every guest boots.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// e.g. `6.1.0-56-cloud-amd64`
    pub version: String,
    /// Decompressed ELF image booted through its PVH entry.
    pub vmlinux: PathBuf,
    pub modules_dir: PathBuf,
}

/// Paths of everything a capsule boots from.
#[derive(Debug, Clone)]
pub struct BootImages {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
}

/// Builds and finds cached images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    dir: PathBuf,
    mirror: String,
}

impl ImageStore {
    pub fn new(dir: PathBuf, mirror: String) -> Self {
        Self { dir, mirror }
    }

    /// Everything needed to boot `template`, building what is missing.
    ///
    /// Holds an exclusive lock on the image directory meanwhile: agents sharing one (several
    /// test platforms on a machine) must not build the same artefact into the same temporary
    /// names at once.
    pub async fn ensure_all(&self, envd: &Path, templates: &[&str]) -> Result<BootImages> {
        std::fs::create_dir_all(&self.dir)?;
        let _lock = DirLock::acquire(self.dir.join(".lock")).await?;
        let kernel = self.ensure_kernel().await?;
        let initramfs = self.ensure_initramfs(&kernel, envd).await?;
        for t in templates {
            self.ensure_rootfs(t).await?;
        }
        Ok(BootImages { kernel, initramfs })
    }

    /// Path of a built template rootfs, if present.
    pub fn rootfs_path(&self, template: &str) -> Option<PathBuf> {
        let r = recipe(template)?;
        let p = self
            .dir
            .join("rootfs")
            .join(format!("{}-{}.ext4", r.name, r.hash()));
        p.exists().then_some(p)
    }

    /// Downloads Debian's cloud kernel once; later starts use the cached copy without network.
    pub async fn ensure_kernel(&self) -> Result<Kernel> {
        let root = self.dir.join("kernel");
        let current = root.join("current");
        if let Ok(version) = std::fs::read_to_string(&current) {
            let version = version.trim().to_string();
            let k = Kernel {
                vmlinux: root.join(&version).join("vmlinux"),
                modules_dir: root.join(&version).join("modules"),
                version,
            };
            // A cache made before a module joined GUEST_MODULES is extracted again.
            let has_modules = GUEST_MODULES
                .iter()
                .all(|m| k.modules_dir.join(format!("{m}.ko")).exists());
            if k.vmlinux.exists() && has_modules {
                return Ok(k);
            }
        }
        let bar = spinner("downloading guest kernel (linux-image-cloud-amd64)");
        let deps = cmd::run("apt-cache", &["depends", "linux-image-cloud-amd64"]).await?;
        let package = deps
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-cloud-amd64"))
            .ok_or_else(|| {
                HostError::Image(
                    "apt-cache finds no linux-image-*-cloud-amd64 (run apt-get update)".into(),
                )
            })?
            .to_string();
        let version = package.trim_start_matches("linux-image-").to_string();
        let work = root.join(format!("{version}.tmp"));
        let _ = tokio::fs::remove_dir_all(&work).await;
        tokio::fs::create_dir_all(&work).await?;
        // apt-get download writes into the current directory.
        let out = tokio::process::Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&work)
            .output()
            .await?;
        if !out.status.success() {
            return Err(HostError::Image(format!(
                "apt-get download {package}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        let deb = std::fs::read_dir(&work)?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| HostError::Image("apt-get download produced no .deb".into()))?;
        let x = work.join("x");
        cmd::run("dpkg-deb", &["-x", path_str(&deb)?, path_str(&x)?]).await?;
        bar.set_message("extracting vmlinux and modules");
        let bz = std::fs::read(x.join("boot").join(format!("vmlinuz-{version}")))?;
        let vmlinux = extract_vmlinux(&bz).await?;
        std::fs::write(work.join("vmlinux"), vmlinux)?;
        let modules = work.join("modules");
        std::fs::create_dir_all(&modules)?;
        let kernel_tree = x.join("lib/modules").join(&version).join("kernel");
        for m in GUEST_MODULES {
            let found = find_file(&kernel_tree, &format!("{m}.ko"))
                .ok_or_else(|| HostError::Image(format!("module {m}.ko not in {package}")))?;
            std::fs::copy(found, modules.join(format!("{m}.ko")))?;
        }
        std::fs::remove_dir_all(&x)?;
        std::fs::remove_file(&deb)?;
        let final_dir = root.join(&version);
        let _ = tokio::fs::remove_dir_all(&final_dir).await;
        std::fs::rename(&work, &final_dir)?;
        std::fs::write(&current, &version)?;
        bar.finish_with_message(format!("guest kernel {version} ready"));
        Ok(Kernel {
            vmlinux: final_dir.join("vmlinux"),
            modules_dir: final_dir.join("modules"),
            version,
        })
    }

    /// The initramfs for this kernel and envd binary (rebuilt when either changes).
    pub async fn ensure_initramfs(&self, kernel: &Kernel, envd: &Path) -> Result<PathBuf> {
        let envd_bytes = std::fs::read(envd).map_err(|e| {
            HostError::Image(format!("cannot read envd at {}: {e}", envd.display()))
        })?;
        let busybox = Path::new("/bin/busybox");
        let busybox_bytes = std::fs::read(busybox).map_err(|e| {
            HostError::Image(format!(
                "cannot read /bin/busybox (install busybox-static): {e}"
            ))
        })?;
        let init = INIT_SCRIPT.replace("MODULES", &GUEST_MODULES.join(" "));
        let mut h = Sha256::new();
        h.update(&envd_bytes);
        h.update(&busybox_bytes);
        h.update(&init);
        h.update(&kernel.version);
        let hash = hex::encode(&h.finalize()[..8]);
        let dir = self.dir.join("initramfs");
        let target = dir.join(format!("{hash}.cpio"));
        if target.exists() {
            return Ok(target);
        }
        info!(%hash, "building initramfs");
        let stage = dir.join(format!("{hash}.stage"));
        let _ = tokio::fs::remove_dir_all(&stage).await;
        for d in ["bin", "dev", "proc", "sys", "newroot", "lib/modules"] {
            std::fs::create_dir_all(stage.join(d))?;
        }
        std::fs::write(stage.join("bin/busybox"), &busybox_bytes)?;
        std::fs::write(stage.join("envd"), &envd_bytes)?;
        std::fs::write(stage.join("init"), init)?;
        for m in GUEST_MODULES {
            std::fs::copy(
                kernel.modules_dir.join(format!("{m}.ko")),
                stage.join("lib/modules").join(format!("{m}.ko")),
            )?;
        }
        for f in ["bin/busybox", "envd", "init"] {
            set_mode(&stage.join(f), 0o755)?;
        }
        let tmp = dir.join(format!("{hash}.cpio.tmp"));
        // Uncompressed newc cpio: the kernel unpacks it faster than a compressed one.
        let script = format!(
            "cd {} && find . | cpio -o -H newc --quiet > {}",
            sh_quote(path_str(&stage)?),
            sh_quote(path_str(&tmp)?)
        );
        cmd::run("sh", &["-c", &script]).await?;
        std::fs::rename(&tmp, &target)?;
        std::fs::remove_dir_all(&stage)?;
        // Older builds stay: another agent sharing this directory may still boot from one, and
        // template snapshots are keyed by it.
        Ok(target)
    }

    /// The ext4 image of a template, bootstrapping it with debootstrap when missing.
    pub async fn ensure_rootfs(&self, template: &str) -> Result<PathBuf> {
        let r = recipe(template)
            .ok_or_else(|| HostError::InvalidRequest(format!("unknown template {template:?}")))?;
        if let Some(p) = self.rootfs_path(template) {
            return Ok(p);
        }
        let dir = self.dir.join("rootfs");
        std::fs::create_dir_all(&dir)?;
        let hash = r.hash();
        let target = dir.join(format!("{}-{hash}.ext4", r.name));
        let stage = dir.join(format!("{}-{hash}.stage", r.name));
        let _ = tokio::fs::remove_dir_all(&stage).await;
        let bar = spinner(&format!(
            "building the {} guest image (debootstrap {}, about a minute)",
            r.name, r.suite
        ));
        let include = format!("--include={}", r.packages.join(","));
        cmd::run(
            "debootstrap",
            &[
                "--variant=minbase",
                &include,
                r.suite,
                path_str(&stage)?,
                &self.mirror,
            ],
        )
        .await
        .map_err(|e| HostError::Image(format!("debootstrap failed: {e}")))?;
        bar.set_message(format!("configuring the {} guest image", r.name));
        cmd::run(
            "chroot",
            &[path_str(&stage)?, "/bin/sh", "-c", ROOTFS_FIXUP],
        )
        .await?;
        bar.set_message(format!("writing the {} ext4 image", r.name));
        let tmp = dir.join(format!("{}-{hash}.ext4.tmp", r.name));
        let _ = std::fs::remove_file(&tmp);
        crate::disk::ext4_from_dir(&stage, &tmp, u64::from(r.size_mb)).await?;
        std::fs::rename(&tmp, &target)?;
        tokio::fs::remove_dir_all(&stage).await?;
        bar.finish_with_message(format!("guest image {} ready", r.name));
        Ok(target)
    }
}

/// An exclusive `flock` on a file, released when dropped (or when the process dies).
pub(crate) struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    /// The lock if nobody holds it right now.
    pub(crate) fn try_acquire(path: &Path) -> Option<Self> {
        use std::os::fd::AsRawFd;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .ok()?;
        // SAFETY: flock on a descriptor this function owns; LOCK_NB never blocks.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        (rc == 0).then_some(Self { _file: file })
    }

    pub(crate) async fn acquire(path: PathBuf) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)?;
        let file = tokio::task::spawn_blocking(move || {
            use std::os::fd::AsRawFd;
            // SAFETY: flock on a descriptor this closure owns; it blocks until the lock is ours.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                Ok(file)
            } else {
                Err(std::io::Error::last_os_error())
            }
        })
        .await
        .map_err(|e| HostError::Image(format!("lock task: {e}")))??;
        Ok(Self { _file: file })
    }
}

/// Finds the compressed payload inside a bzImage and decompresses it to the ELF `vmlinux`
/// (what the kernel tree's scripts/extract-vmlinux does).
async fn extract_vmlinux(bz: &[u8]) -> Result<Vec<u8>> {
    // (magic, decompressor) pairs; Debian's cloud kernel uses LZ4 (legacy frame).
    const FORMATS: &[(&[u8], &str, &[&str])] = &[
        (b"\x02\x21\x4c\x18", "lz4", &["-dc"]),
        (b"\x1f\x8b\x08", "gzip", &["-dc"]),
        (b"\xfd7zXZ\x00", "xz", &["-dc"]),
        (b"\x28\xb5\x2f\xfd", "zstd", &["-dc"]),
    ];
    for (magic, tool, args) in FORMATS {
        let mut from = 0;
        while let Some(pos) = find(&bz[from..], magic).map(|p| p + from) {
            from = pos + 1;
            let out = decompress(tool, args, &bz[pos..]).await;
            if out.len() > 4 && &out[..4] == b"\x7fELF" {
                return Ok(out);
            }
        }
    }
    Err(HostError::Image(
        "no decompressible ELF payload found in the kernel image".into(),
    ))
}

async fn decompress(tool: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncWriteExt;
    let Ok(mut child) = tokio::process::Command::new(tool)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
    else {
        return Vec::new();
    };
    let mut stdin = child.stdin.take();
    let data = input.to_vec();
    // Trailing bytes after the payload make the decompressor complain; its output is still whole.
    let feeder = tokio::spawn(async move {
        if let Some(s) = stdin.as_mut() {
            let _ = s.write_all(&data).await;
        }
    });
    let out = child
        .wait_with_output()
        .await
        .map(|o| o.stdout)
        .unwrap_or_default();
    let _ = feeder.await;
    out
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, name) {
                return Some(found);
            }
        } else if p.file_name().is_some_and(|n| n == name) {
            return Some(p);
        }
    }
    None
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

pub(crate) fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| HostError::Image(format!("path is not UTF-8: {}", p.display())))
}

pub(crate) fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn spinner(msg: &str) -> ProgressBar {
    info!("{msg}");
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(msg.to_string());
    bar.enable_steady_tick(std::time::Duration::from_millis(120));
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipe_hash_is_stable_and_sensitive() {
        let m = recipe("minimal").unwrap();
        assert_eq!(m.hash(), m.hash());
        let mut other = *m;
        other.size_mb += 1;
        assert_ne!(m.hash(), other.hash());
        assert!(recipe("nope").is_none());
    }

    #[tokio::test]
    async fn extract_finds_gzip_payload_after_junk() {
        let elf = b"\x7fELF-pretend-kernel".repeat(10);
        let mut gz = tokio::process::Command::new("gzip")
            .arg("-c")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use tokio::io::AsyncWriteExt;
            let mut stdin = gz.stdin.take().unwrap();
            stdin.write_all(&elf).await.unwrap();
        }
        let compressed = gz.wait_with_output().await.unwrap().stdout;
        let mut image = b"MZ-boot-sector-junk".to_vec();
        image.extend_from_slice(&compressed);
        image.extend_from_slice(b"trailing");
        assert_eq!(extract_vmlinux(&image).await.unwrap(), elf);
        assert!(extract_vmlinux(b"nothing here").await.is_err());
    }
}
