//! Commands and everything else inside a running guest: foreground and background exec,
//! exec streams, processes, and the guest agent itself (files, terminals, attach).

use base64::Engine;
use wrenn_api::{
    ApiError, BackgroundExecResponse, ExecRequest, ExecResponse, OutputEncoding, ProcessEntry,
    ProcessListResponse, DEFAULT_EXEC_TIMEOUT_SEC, MAX_EXEC_OUTPUT_BYTES, MAX_EXEC_TIMEOUT_SEC,
    MAX_TAG_LEN,
};

// The API promises what the envd client keeps.
const _: () = assert!(MAX_EXEC_OUTPUT_BYTES == envd_client::MAX_CAPTURE_BYTES);

use super::{CapsuleService, Result};
use crate::error::{from_envd, from_host};
use crate::hosts::pool::HostHandle;

/// What an exec request produced: the finished command, or the started background process.
pub enum ExecOutcome {
    Foreground(ExecResponse),
    Background(BackgroundExecResponse),
}

impl CapsuleService {
    /// Runs a command: to completion (foreground) or started in the background.
    pub async fn exec(&self, team_id: &str, id: &str, req: ExecRequest) -> Result<ExecOutcome> {
        let row = self.require_running(team_id, id).await?;
        validate_command(&req)?;
        let host = self.pool.client_for(&row).await?;
        if req.background {
            return self
                .start_background(id, req, host)
                .await
                .map(ExecOutcome::Background);
        }
        self.run_foreground(id, req, host)
            .await
            .map(ExecOutcome::Foreground)
    }

    pub(super) async fn start_background(
        &self,
        id: &str,
        req: ExecRequest,
        host: HostHandle,
    ) -> Result<BackgroundExecResponse> {
        if let Some(tag) = &req.tag {
            if tag.is_empty() || tag.len() > MAX_TAG_LEN || tag.chars().any(|c| c.is_control()) {
                return Err(ApiError::invalid(format!(
                    "tag must be 1-{MAX_TAG_LEN} characters without control characters"
                )));
            }
        }
        self.touch(id);
        let spec = envd_client::StartSpec {
            command: command_spec(&req),
            tag: req.tag,
        };
        let started = host
            .envd(id)
            .await
            .map_err(from_host)?
            .start(spec)
            .await
            .map_err(from_envd)?;
        Ok(BackgroundExecResponse {
            sandbox_id: id.to_string(),
            cmd: req.cmd,
            pid: started.pid,
            tag: started.tag,
        })
    }

    pub(super) async fn run_foreground(
        &self,
        id: &str,
        req: ExecRequest,
        host: HostHandle,
    ) -> Result<ExecResponse> {
        let timeout_sec = match req.timeout_sec {
            None => DEFAULT_EXEC_TIMEOUT_SEC,
            Some(t) if t < 0 => {
                return Err(ApiError::invalid(format!(
                    "timeout_sec must be >= 0, got {t}"
                )))
            }
            // 0 means "no limit": the platform's maximum applies.
            Some(0) => MAX_EXEC_TIMEOUT_SEC,
            Some(t) if t > MAX_EXEC_TIMEOUT_SEC as i64 => {
                return Err(ApiError::invalid(format!(
                    "timeout_sec must be at most {MAX_EXEC_TIMEOUT_SEC}"
                )))
            }
            Some(t) => t as u32,
        };
        let busy = self.hold(id);
        let spec = envd_client::ExecSpec {
            command: command_spec(&req),
            timeout_ms: timeout_sec as u64 * 1000,
        };
        let out = match host.envd(id).await {
            Ok(envd) => envd.exec(spec).await.map_err(from_envd),
            Err(e) => Err(from_host(e)),
        };
        drop(busy);
        let mut out = out?;
        let mut exit_code = out.exit_code;
        if out.timed_out {
            // 124 is what coreutils' `timeout` reports; the note makes the kill visible to
            // clients that only look at stderr.
            exit_code = 124;
            out.stderr.extend_from_slice(
                format!("\n[wrenn] command timed out after {timeout_sec}s and was killed\n")
                    .as_bytes(),
            );
        }
        let truncated = out.stdout_dropped > 0 || out.stderr_dropped > 0;
        if truncated {
            // A character cut in two at the limit would turn the whole answer into base64.
            trim_cut_character(&mut out.stdout, out.stdout_dropped);
            trim_cut_character(&mut out.stderr, out.stderr_dropped);
            out.stderr.extend_from_slice(
                format!(
                    "\n[wrenn] output truncated: kept the first {} MiB of each stream, dropped {} bytes of stdout and {} of stderr; use exec/stream or redirect to a file for all of it\n",
                    MAX_EXEC_OUTPUT_BYTES >> 20,
                    out.stdout_dropped,
                    out.stderr_dropped
                )
                .as_bytes(),
            );
        }
        let (stdout, stderr, encoding) =
            match (String::from_utf8(out.stdout), String::from_utf8(out.stderr)) {
                (Ok(o), Ok(e)) => (o, e, OutputEncoding::Utf8),
                (o, e) => {
                    let b64 = base64::engine::general_purpose::STANDARD;
                    let bytes = |r: std::result::Result<String, std::string::FromUtf8Error>| match r
                    {
                        Ok(s) => s.into_bytes(),
                        Err(e) => e.into_bytes(),
                    };
                    (
                        b64.encode(bytes(o)),
                        b64.encode(bytes(e)),
                        OutputEncoding::Base64,
                    )
                }
            };
        Ok(ExecResponse {
            sandbox_id: id.to_string(),
            cmd: req.cmd,
            stdout,
            stderr,
            exit_code,
            duration_ms: out.duration_ms,
            encoding,
            timed_out: out.timed_out,
            truncated,
            stdout_dropped_bytes: out.stdout_dropped,
            stderr_dropped_bytes: out.stderr_dropped,
        })
    }

    /// Starts a command whose output is streamed (no time limit; the caller may stop it).
    pub async fn exec_stream(
        &self,
        team_id: &str,
        id: &str,
        req: ExecRequest,
    ) -> Result<envd_client::ExecStream> {
        validate_command(&req)?;
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        let spec = envd_client::ExecSpec {
            command: command_spec(&req),
            timeout_ms: 0,
        };
        host.envd(id)
            .await
            .map_err(from_host)?
            .exec_stream(spec)
            .await
            .map_err(from_envd)
    }

    /// The guest agent of a running capsule, for direct operations (files, attach); using it
    /// counts as activity.
    pub async fn files(&self, team_id: &str, id: &str) -> Result<envd_client::EnvdClient> {
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        host.envd(id).await.map_err(from_host)
    }

    /// Follows a background process of a running capsule (by pid or tag).
    pub async fn attach(
        &self,
        team_id: &str,
        id: &str,
        selector: &str,
    ) -> Result<envd_client::ExecStream> {
        let envd = self.files(team_id, id).await?;
        envd.attach(selector).await.map_err(from_envd)
    }

    /// Every user process in a running capsule.
    pub async fn processes(&self, team_id: &str, id: &str) -> Result<ProcessListResponse> {
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        let processes = host
            .envd(id)
            .await
            .map_err(from_host)?
            .list_processes()
            .await
            .map_err(from_envd)?
            .into_iter()
            .map(|p| ProcessEntry {
                pid: p.pid,
                tag: p.tag,
                cmd: p.cmd,
                args: p.args,
            })
            .collect();
        Ok(ProcessListResponse { processes })
    }

    /// Signals a process chosen by pid or tag; `signal` is `SIGKILL` (default) or `SIGTERM`.
    pub async fn kill_process(
        &self,
        team_id: &str,
        id: &str,
        selector: &str,
        signal: Option<&str>,
    ) -> Result<()> {
        let signal = match signal.unwrap_or("SIGKILL") {
            "SIGKILL" => envd_client::Signal::Kill,
            "SIGTERM" => envd_client::Signal::Term,
            other => {
                return Err(ApiError::invalid(format!(
                    "signal must be SIGKILL or SIGTERM, not {other:?}"
                )))
            }
        };
        let row = self.require_running(team_id, id).await?;
        let host = self.pool.client_for(&row).await?;
        self.touch(id);
        host.envd(id)
            .await
            .map_err(from_host)?
            .signal(selector, signal)
            .await
            .map_err(from_envd)
    }
}

/// Checks what every exec needs, before the capsule's state is looked at.
/// Drops a UTF-8 character left incomplete at the end of truncated output (`dropped` > 0).
fn trim_cut_character(buf: &mut Vec<u8>, dropped: u64) {
    if dropped == 0 {
        return;
    }
    if let Err(e) = std::str::from_utf8(buf) {
        // `error_len() == None`: the text is valid up to an unfinished character at the end.
        if e.error_len().is_none() {
            buf.truncate(e.valid_up_to());
        }
    }
}

fn validate_command(req: &ExecRequest) -> Result<()> {
    if req.cmd.trim().is_empty() {
        return Err(ApiError::invalid("cmd must not be empty"));
    }
    let nul = |s: &str| s.contains('\0');
    if nul(&req.cmd) || req.args.iter().any(|a| nul(a)) || req.envs.values().any(|v| nul(v)) {
        return Err(ApiError::invalid(
            "cmd, args and envs must not contain NUL bytes",
        ));
    }
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') || nul(cwd) {
            return Err(ApiError::invalid("cwd must be an absolute path"));
        }
    }
    if let Some(bad) = req
        .envs
        .keys()
        .find(|k| k.is_empty() || k.contains('=') || nul(k))
    {
        return Err(ApiError::invalid(format!(
            "invalid environment variable name {bad:?}"
        )));
    }
    Ok(())
}

/// What the guest agent is told to start for a terminal.
pub fn pty_spec(t: wrenn_api::TerminalStart) -> envd_client::PtySpec {
    envd_client::PtySpec {
        cmd: t.cmd,
        args: t.args,
        cols: t.cols,
        rows: t.rows,
        envs: t.envs,
        cwd: t.cwd,
        user: t.user,
    }
}

fn command_spec(req: &ExecRequest) -> envd_client::CommandSpec {
    envd_client::CommandSpec {
        cmd: req.cmd.clone(),
        args: req.args.clone(),
        envs: req.envs.clone(),
        cwd: req.cwd.clone(),
        user: None,
    }
}

#[cfg(test)]
mod tests {
    use super::trim_cut_character;

    #[test]
    fn a_character_cut_by_the_limit_is_dropped_but_nothing_else() {
        let mut cut = "ab€".as_bytes()[..4].to_vec();
        trim_cut_character(&mut cut, 2);
        assert_eq!(cut, b"ab");
        // Not truncated: left alone even if it ends oddly.
        let mut whole = "ab€".as_bytes()[..4].to_vec();
        trim_cut_character(&mut whole, 0);
        assert_eq!(whole.len(), 4);
        // Binary output (invalid in the middle) is kept as it is, for base64.
        let mut binary = vec![b'a', 0xff, b'b', 0xe2];
        trim_cut_character(&mut binary, 1);
        assert_eq!(binary.len(), 4);
    }
}
