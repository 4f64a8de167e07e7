//! Running host tools (ip, nft, qemu-img, debootstrap, ...) with their failures as typed errors.

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use crate::error::{HostError, Result};

/// Runs `program args…`, failing with its stderr when it exits non-zero.
pub async fn run(program: &str, args: &[&str]) -> Result<String> {
    run_with_input(program, args, None).await
}

/// Like [`run`], feeding `input` to the command's stdin.
pub async fn run_with_input(program: &str, args: &[&str], input: Option<&str>) -> Result<String> {
    let render = || format!("{program} {}", args.join(" "));
    let mut child = Command::new(program)
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| HostError::Command {
            command: render(),
            detail: e.to_string(),
        })?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data.as_bytes()).await?;
    }
    let out = child.wait_with_output().await?;
    if !out.status.success() {
        return Err(HostError::Command {
            command: render(),
            detail: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
