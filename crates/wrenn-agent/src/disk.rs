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
