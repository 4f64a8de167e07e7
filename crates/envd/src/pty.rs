//! Terminal sessions: a process on a pseudo-terminal that outlives the connection that started
//! it. Output goes to the attached connections and into a bounded replay buffer, so a client
//! that reconnects (by tag) sees the recent screen before live output.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::sync::{Arc, Mutex, OnceLock};

use envd_proto::{
    read_frame, write_frame, write_json, ErrorKind, Frame, FrameKind, PtyControl, PtySpec, Response,
};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{broadcast, mpsc, watch};

/// Bytes of recent output replayed to a reconnecting client.
const REPLAY_BYTES: usize = 64 * 1024;

struct Session {
    pid: u32,
    master: std::fs::File,
    output: broadcast::Sender<Vec<u8>>,
    replay: Mutex<VecDeque<u8>>,
    exit: watch::Receiver<Option<i32>>,
}

fn sessions() -> std::sync::MutexGuard<'static, HashMap<String, Arc<Session>>> {
    static S: OnceLock<Mutex<HashMap<String, Arc<Session>>>> = OnceLock::new();
    S.get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

pub async fn start(spec: PtySpec, rd: OwnedReadHalf, mut wr: OwnedWriteHalf) {
    match spawn(spec) {
        Ok((tag, session)) => serve(tag, session, false, rd, wr).await,
        Err(e) => {
            let _ = write_json(&mut wr, &e).await;
        }
    }
}

pub async fn connect(tag: String, rd: OwnedReadHalf, mut wr: OwnedWriteHalf) {
    let found = sessions().get(&tag).cloned();
    match found {
        Some(session) => serve(tag, session, true, rd, wr).await,
        None => {
            let _ = write_json(
                &mut wr,
                &crate::error(ErrorKind::NotFound, format!("no terminal session {tag:?}")),
            )
            .await;
        }
    }
}

fn spawn(spec: PtySpec) -> Result<(String, Arc<Session>), Response> {
    let id = crate::identity::resolve(spec.user.as_deref(), &spec.envs, spec.cwd.as_deref())?;
    let (master, slave) = open_terminal(spec.rows, spec.cols)?;
    let cmd = spec.cmd.clone().unwrap_or_else(|| "/bin/bash".to_string());
    let mut c = std::process::Command::new(&cmd);
    c.args(&spec.args)
        .env_clear()
        .envs(&id.env)
        .current_dir(&id.cwd)
        .uid(id.uid)
        .gid(id.gid);
    let io = |fd: &OwnedFd| fd.try_clone().map(std::process::Stdio::from);
    let (i, o, e) = match (io(&slave), io(&slave), io(&slave)) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        _ => {
            return Err(crate::error(
                ErrorKind::Internal,
                "cannot duplicate the terminal",
            ))
        }
    };
    c.stdin(i).stdout(o).stderr(e);
    // SAFETY: between fork and exec only async-signal-safe calls: setsid and ioctl.
    unsafe {
        c.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = c.spawn().map_err(|e| crate::exec::spawn_error(&cmd, e))?;
    drop(slave);
    let pid = child.id();
    let master = std::fs::File::from(master);
    let reader = master
        .try_clone()
        .map_err(|e| crate::error(ErrorKind::Internal, format!("terminal: {e}")))?;
    let (output, _) = broadcast::channel(256);
    let (exit_tx, exit_rx) = watch::channel(None);
    let session = Arc::new(Session {
        pid,
        master,
        output: output.clone(),
        replay: Mutex::new(VecDeque::new()),
        exit: exit_rx,
    });
    let tag = register(&session);
    let s = session.clone();
    std::thread::spawn(move || pump(reader, s));
    std::thread::spawn(move || {
        let code = crate::exec::exit_code(child.wait());
        let _ = exit_tx.send(Some(code));
    });
    Ok((tag, session))
}

/// A new terminal of `rows` × `cols` (24 × 80 by default): its master and slave sides.
fn open_terminal(rows: Option<u16>, cols: Option<u16>) -> Result<(OwnedFd, OwnedFd), Response> {
    let ws = libc::winsize {
        ws_row: rows.unwrap_or(24).max(1),
        ws_col: cols.unwrap_or(80).max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let (mut master_fd, mut slave_fd) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the locals; the name buffer and termios are
    // optional (null); the winsize pointer refers to a live local.
    let rc = unsafe {
        libc::openpty(
            &mut master_fd,
            &mut slave_fd,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if rc != 0 {
        return Err(crate::error(
            ErrorKind::Internal,
            format!("openpty: {}", std::io::Error::last_os_error()),
        ));
    }
    // SAFETY: openpty succeeded, so both descriptors are open and owned by nobody else.
    let (master, slave) = unsafe {
        (
            OwnedFd::from_raw_fd(master_fd),
            OwnedFd::from_raw_fd(slave_fd),
        )
    };
    Ok((master, slave))
}

/// Keeps a session under a new tag (forgetting ended ones); its tag.
fn register(session: &Arc<Session>) -> String {
    let mut all = sessions();
    all.retain(|_, s| s.exit.borrow().is_none());
    let tag = loop {
        let t = format!("pty-{:08x}", rand_u32());
        if !all.contains_key(&t) {
            break t;
        }
    };
    all.insert(tag.clone(), session.clone());
    tag
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    u32::from_le_bytes(b) ^ std::process::id()
}

/// Reads the terminal until the session's process (and everything holding the terminal) ends.
fn pump(mut master: std::fs::File, s: Arc<Session>) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match master.read(&mut buf) {
            Ok(0) | Err(_) => return, // EIO once every holder of the slave side is gone
            Ok(n) => {
                {
                    let mut r = s.replay.lock().unwrap_or_else(|p| p.into_inner());
                    r.extend(&buf[..n]);
                    let over = r.len().saturating_sub(REPLAY_BYTES);
                    r.drain(..over);
                }
                let _ = s.output.send(buf[..n].to_vec());
            }
        }
    }
}

enum FromHost {
    Input(Vec<u8>),
    Control(PtyControl),
}

async fn serve(
    tag: String,
    s: Arc<Session>,
    replay: bool,
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
) {
    // Subscribe before taking the replay so nothing falls between them.
    let mut output = s.output.subscribe();
    let mut exit = s.exit.clone();
    if write_json(&mut wr, &Response::PtyStarted { tag, pid: s.pid })
        .await
        .is_err()
    {
        return;
    }
    if replay {
        let recent: Vec<u8> = s
            .replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect();
        if !recent.is_empty()
            && write_frame(&mut wr, FrameKind::Stdout, &recent)
                .await
                .is_err()
        {
            return;
        }
    }
    // Frames from the host are read by their own task: reading a frame is not cancel-safe.
    let (tx, mut from_host) = mpsc::channel(16);
    let reader = tokio::spawn(async move {
        while let Ok(Some(frame)) = read_frame(&mut rd).await {
            let msg = match frame {
                Frame::Data(b) => FromHost::Input(b),
                Frame::Json(j) => match serde_json::from_slice(&j) {
                    Ok(c) => FromHost::Control(c),
                    Err(_) => continue,
                },
                _ => continue,
            };
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    });
    loop {
        let ended = *exit.borrow_and_update();
        if let Some(code) = ended {
            while let Ok(b) = output.try_recv() {
                let _ = write_frame(&mut wr, FrameKind::Stdout, &b).await;
            }
            let _ = write_json(&mut wr, &Response::exited(code)).await;
            break;
        }
        tokio::select! {
            out = output.recv() => match out {
                Ok(b) => if write_frame(&mut wr, FrameKind::Stdout, &b).await.is_err() { break },
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => { let _ = exit.changed().await; }
            },
            _ = exit.changed() => {}
            msg = from_host.recv() => match msg {
                None => break, // the host hung up: detach, the session lives on
                Some(FromHost::Input(b)) => {
                    let Ok(mut m) = s.master.try_clone() else { break };
                    // A full terminal buffer blocks the writer, so write off the runtime.
                    let _ = tokio::task::spawn_blocking(move || m.write_all(&b)).await;
                }
                Some(FromHost::Control(PtyControl::Resize { cols, rows })) => {
                    let ws = libc::winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 };
                    // SAFETY: TIOCSWINSZ reads a winsize from a live local; the fd is the open master.
                    unsafe { libc::ioctl(s.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
                }
                Some(FromHost::Control(PtyControl::Kill)) => {
                    // SAFETY: the session leader's group (setsid made pid the group id).
                    unsafe { libc::kill(-(s.pid as i32), libc::SIGKILL) };
                }
            }
        }
    }
    reader.abort();
}
