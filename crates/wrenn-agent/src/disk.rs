//! Per-capsule disks: a qcow2 copy-on-write overlay on the template's read-only image.

use std::path::Path;

use crate::cmd;
use crate::error::Result;
use crate::images::path_str;

/// Creates `overlay` on top of `base` (a raw ext4 image, or a `.qcow2` disk of a built
/// template), with a virtual size of at least `size_mb` MiB. The guest grows its filesystem
/// to the device size at boot.
pub async fn create_overlay(base: &Path, overlay: &Path, size_mb: u32) -> Result<()> {
    let base_mb = base_size_mb(base).await?;
    overlay_on(base, format_of(base), overlay, base_mb.max(size_mb as u64)).await
}

/// `qcow2` for a `.qcow2` file, else `raw`.
fn format_of(image: &Path) -> &'static str {
    if image.extension().is_some_and(|e| e == "qcow2") {
        "qcow2"
    } else {
        "raw"
    }
}

/// The size of the disk an image holds, in MiB (a qcow2 file's virtual size).
pub async fn base_size_mb(image: &Path) -> Result<u64> {
    match format_of(image) {
        "qcow2" => virtual_size_mb(image).await,
        _ => Ok(std::fs::metadata(image)?.len().div_ceil(1024 * 1024)),
    }
}

/// Creates `overlay` on top of a template snapshot's disk (itself a qcow2 overlay), with the
/// same virtual size: the restored guest already knows its disk's size.
pub async fn create_overlay_on_snapshot(base: &Path, overlay: &Path, size_mb: u64) -> Result<()> {
    overlay_on(base, "qcow2", overlay, size_mb).await
}

async fn overlay_on(base: &Path, format: &str, overlay: &Path, size_mb: u64) -> Result<()> {
    let size = format!("{size_mb}M");
    cmd::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            path_str(base)?,
            "-F",
            format,
            path_str(overlay)?,
            &size,
        ],
    )
    .await?;
    Ok(())
}

/// Makes a raw ext4 image of `size_mb` MiB at `image` holding the tree under `dir` (a template's
/// root filesystem, labelled `rootfs` as the guest's init expects).
pub async fn ext4_from_dir(dir: &Path, image: &Path, size_mb: u64) -> Result<()> {
    cmd::run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-L",
            "rootfs",
            "-d",
            path_str(dir)?,
            path_str(image)?,
            &format!("{size_mb}M"),
        ],
    )
    .await?;
    Ok(())
}

/// Copies a disk and every layer under it into one standalone qcow2 (allocated data only).
pub async fn flatten(top: &Path, out: &Path) -> Result<()> {
    cmd::run(
        "qemu-img",
        &[
            "convert",
            "-q",
            "-O",
            "qcow2",
            "-U",
            path_str(top)?,
            path_str(out)?,
        ],
    )
    .await?;
    Ok(())
}

/// A disk image's virtual size in MiB.
pub async fn virtual_size_mb(image: &Path) -> Result<u64> {
    let out = cmd::run(
        "qemu-img",
        &["info", "-U", "--output=json", path_str(image)?],
    )
    .await?;
    let info: serde_json::Value = serde_json::from_str(&out)
        .map_err(|e| crate::error::HostError::Image(format!("qemu-img info: {e}")))?;
    info.get("virtual-size")
        .and_then(|v| v.as_u64())
        .map(|b| b.div_ceil(1024 * 1024))
        .ok_or_else(|| crate::error::HostError::Image("qemu-img info: no virtual-size".into()))
}

/// The most backing files followed from one image (deeper chains are refused).
const MAX_CHAIN: usize = 32;

/// What a qcow2 header says about its image; `None` for any other format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    /// The disk's size in bytes.
    pub virtual_size: u64,
    /// The image it sits on, resolved against the image's directory when relative.
    pub backing: Option<std::path::PathBuf>,
}

/// Reads `image`'s qcow2 header (`None` when it is not a qcow2 file: a raw image).
pub fn qcow2_header(image: &Path) -> std::io::Result<Option<Qcow2Header>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image)?;
    let mut head = [0u8; 32];
    if f.read_exact(&mut head).is_err() || head[..4] != *b"QFI\xfb" {
        return Ok(None);
    }
    let be64 = |b: &[u8]| u64::from_be_bytes(b.try_into().unwrap_or_default());
    let offset = be64(&head[8..16]);
    let len = u32::from_be_bytes([head[16], head[17], head[18], head[19]]) as usize;
    let virtual_size = be64(&head[24..32]);
    if offset == 0 || len == 0 {
        return Ok(Some(Qcow2Header {
            virtual_size,
            backing: None,
        }));
    }
    // qcow2 caps a backing file name at 1023 bytes.
    if len > 1023 {
        return Err(std::io::Error::other(format!(
            "{}: backing file name of {len} bytes",
            image.display()
        )));
    }
    let mut name = vec![0u8; len];
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(&mut name)?;
    let name = std::path::PathBuf::from(
        <std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(name),
    );
    let backing = match image.parent() {
        Some(dir) if name.is_relative() => dir.join(name),
        _ => name,
    };
    Ok(Some(Qcow2Header {
        virtual_size,
        backing: Some(backing),
    }))
}

/// Every image `top` sits on, nearest first (what a VM on `top` opens read-only).
pub fn backing_chain(top: &Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    let mut chain = Vec::new();
    let mut current = top.to_path_buf();
    while let Some(Qcow2Header {
        backing: Some(next),
        ..
    }) = qcow2_header(&current)?
    {
        if chain.len() == MAX_CHAIN || chain.contains(&next) || next == top {
            return Err(std::io::Error::other(format!(
                "{}: backing chain too deep or circular",
                top.display()
            )));
        }
        chain.push(next.clone());
        current = next;
    }
    Ok(chain)
}

/// Creates `overlay` on `base` (a qcow2 disk a running VM may hold locked), of the same size,
/// without opening `base`.
pub async fn create_overlay_on_live(base: &Path, overlay: &Path) -> Result<()> {
    let size = qcow2_header(base)?
        .ok_or_else(|| {
            crate::error::HostError::Vmm(format!("{} is not a qcow2 disk", base.display()))
        })?
        .virtual_size;
    cmd::run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-u",
            "-f",
            "qcow2",
            "-b",
            path_str(base)?,
            "-F",
            "qcow2",
            path_str(overlay)?,
            &size.to_string(),
        ],
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn follows_backing_chains() {
        let dir = std::env::temp_dir().join(format!("wrenn-disk-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let raw = dir.join("base.img");
        std::fs::write(&raw, vec![0u8; 1 << 20]).unwrap();
        let mid = dir.join("mid.qcow2");
        create_overlay(&raw, &mid, 8).await.unwrap();
        let top = dir.join("top.qcow2");
        create_overlay_on_live(&mid, &top).await.unwrap();
        assert_eq!(backing_chain(&top).unwrap(), vec![mid.clone(), raw.clone()]);
        assert_eq!(qcow2_header(&top).unwrap().unwrap().virtual_size, 8 << 20);
        assert_eq!(qcow2_header(&raw).unwrap(), None);
        assert!(backing_chain(&raw).unwrap().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
