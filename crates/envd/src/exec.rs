//! Foreground exec: run one process, stream its output as frames, answer its exit.

use std::process::Stdio;
use std::time::{Duration, Instant};

use envd_proto::{write_frame, write_json, CommandSpec, ErrorKind, ExecSpec, FrameKind, Response};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::process::Command;
use tokio::sync::mpsc;

enum Chunk {
    Out(Vec<u8>),
    Err(Vec<u8>),
}

/// A process's exit as a shell reports it: its code, or 128 + the signal that killed it
/// (-1 when the status could not be read).
pub fn exit_code(status: std::io::Result<std::process::ExitStatus>) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => s.code().unwrap_or_else(|| 128 + s.signal().unwrap_or(0)),
        Err(_) => -1,
    }
}

/// Why a program could not be started, classified as a shell would (127 / 126).
pub fn spawn_error(cmd: &str, e: std::io::Error) -> Response {
    let kind = if e.kind() == std::io::ErrorKind::NotFound {
        ErrorKind::CommandNotFound
    } else {
        ErrorKind::NotExecutable
    };
    crate::error(kind, format!("cannot run {cmd}: {e}"))
}

/// Builds the command: with no `args`, `cmd` is a shell command line (`/bin/sh -c cmd`);
/// with `args`, `cmd` is the program and `args` its arguments. It runs as the request's user
/// (else the template's default user, else root) with the environment and working directory
/// `identity::resolve` gives; an unknown user or a missing cwd is the caller's error.
pub fn command(spec: &CommandSpec) -> Result<Command, Response> {
    let id = crate::identity::resolve(spec.user.as_deref(), &spec.envs, spec.cwd.as_deref())?;
    let mut c = if spec.args.is_empty() {
        let mut c = Command::new("/bin/sh");
        c.arg("-c").arg(&spec.cmd);
        c
    } else {
        let mut c = Command::new(&spec.cmd);
        c.args(&spec.args);
        c
    };
    c.env_clear()
        .envs(&id.env)
        .current_dir(&id.cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if id.uid != 0 {
        c.uid(id.uid).gid(id.gid);
    }
    Ok(c)
}

pub async fn run(spec: ExecSpec, mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf) {
    let started = Instant::now();
    let mut command = match command(&spec.command) {
        Ok(c) => c,
        Err(e) => {
            let _ = write_json(&mut wr, &e).await;
            return;
        }
    };
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let _ = write_json(&mut wr, &spawn_error(&spec.command.cmd, e)).await;
            return;
        }
    };
    let pgid = child.id().map(|p| p as i32);
    let spawned = Response::Spawned {
        pid: child.id().unwrap_or(0),
    };
    if write_json(&mut wr, &spawned).await.is_err() {
        return hang_up(pgid, child).await;
    }
    let (tx, mut rx) = mpsc::channel::<Chunk>(16);
    if let Some(out) = child.stdout.take() {
        tokio::spawn(pump(out, tx.clone(), Chunk::Out));
    }
    if let Some(err) = child.stderr.take() {
        tokio::spawn(pump(err, tx.clone(), Chunk::Err));
    }
    drop(tx);

    // timeout_ms 0: no limit (streams run until they end or are stopped).
    let limit = match spec.timeout_ms {
        0 => Duration::from_secs(10 * 365 * 24 * 3600),
        ms => Duration::from_millis(ms),
    };
    let deadline = tokio::time::sleep(limit);
    tokio::pin!(deadline);
    // Once the leader has exited, output still in the pipes gets this long to arrive; a
    // grandchild that keeps the pipes open must not hold the answer hostage.
    let drain = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(drain);
    let mut timed_out = false;
    let mut stopped = false;
    let mut status = None;
    let mut peer_buf = [0u8; 64];
    let mut output_open = true;
    while output_open || status.is_none() {
        tokio::select! {
            chunk = rx.recv(), if output_open => match chunk {
                Some(Chunk::Out(b)) => if write_frame(&mut wr, FrameKind::Stdout, &b).await.is_err() { return hang_up(pgid, child).await },
                Some(Chunk::Err(b)) => if write_frame(&mut wr, FrameKind::Stderr, &b).await.is_err() { return hang_up(pgid, child).await },
                None => output_open = false,
            },
            s = child.wait(), if status.is_none() => {
                status = Some(s);
                drain.as_mut().reset(tokio::time::Instant::now() + Duration::from_millis(200));
            },
            _ = &mut drain, if status.is_some() => break,
            _ = &mut deadline, if !timed_out => {
                timed_out = true;
                kill_group(pgid);
            },
            n = rd.read(&mut peer_buf), if !stopped => {
                // EOF or an error: the host hung up. Any byte: the host asks to stop the
                // command; it is killed and its exit reported as usual.
                match n {
                    Ok(0) | Err(_) => return hang_up(pgid, child).await,
                    Ok(_) => {
                        stopped = true;
                        kill_group(pgid);
                    }
                }
            }
        }
    }
    // After a timeout the group is already dead. After a normal exit, children the command
    // put in the background (`server &`) keep running, as they would after a shell command;
    // the pumps keep draining their output so they never die of SIGPIPE.
    if timed_out {
        kill_group(pgid);
    }
    let status = status.unwrap_or_else(|| Err(std::io::Error::other("no exit status")));
    let exit_code = exit_code(status);
    let _ = write_json(
        &mut wr,
        &Response::Exit {
            exit_code,
            timed_out,
            duration_ms: started.elapsed().as_millis() as u64,
        },
    )
    .await;
}

async fn hang_up(pgid: Option<i32>, mut child: tokio::process::Child) {
    kill_group(pgid);
    let _ = child.wait().await;
}

async fn pump<R: AsyncRead + Unpin>(mut r: R, tx: mpsc::Sender<Chunk>, wrap: fn(Vec<u8>) -> Chunk) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                // Once the request is answered nobody listens: keep reading (and dropping) so
                // that background children writing to the inherited pipe are not killed.
                if !tx.is_closed() {
                    let _ = tx.send(wrap(buf[..n].to_vec())).await;
                }
            }
        }
    }
}

fn kill_group(pgid: Option<i32>) {
    if let Some(pgid) = pgid {
        // SAFETY: kill(2) with a negative pid signals a process group; no memory is involved.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}
