//! envd: Wrenn's guest agent. It runs inside every capsule as PID 1's only child and serves the
//! host agent over TCP (see the `envd-proto` crate for the protocol), plus a serial lifeline and
//! a guard that keeps the platform interface configured whatever user code does to it.
//!
//! Invariants:
//! - envd never panics on a request: every failure is answered as a `Response::Error` frame or by
//!   closing that one connection.
//! - A foreground command never outlives its request's failure: on timeout or when the host
//!   hangs up, its whole process group is killed. After a normal exit, what it put in the
//!   background keeps running (as after a shell command).

mod auth;
mod background;
mod exec;
mod files;
mod forward;
mod identity;
mod init;
mod lifeline;
mod netguard;
mod processes;
mod pty;

use envd_proto::{read_frame, write_json, ErrorKind, Frame, Request, Response, ENVD_PORT};
use tokio::net::{TcpListener, TcpStream};

fn main() {
    // As PID 1 we must reap orphans; that loop cannot share a process with tokio's own child
    // reaping, so PID 1 forks and the child serves (init::become_reaper never returns in PID 1).
    if std::process::id() == 1 {
        init::become_reaper();
    }
    auth::init_from_env();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("envd: cannot start runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(serve());
}

async fn serve() {
    init::after_boot();
    let net = netguard::NetConfig::from_env();
    netguard::spawn_watchdog(net);
    lifeline::spawn(net);
    let addr = std::env::var("ENVD_LISTEN").unwrap_or_else(|_| format!("0.0.0.0:{ENVD_PORT}"));
    let listener = loop {
        match TcpListener::bind(&addr).await {
            Ok(l) => break l,
            Err(e) => {
                eprintln!("envd: bind {addr}: {e}; retrying");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    };
    eprintln!("envd {} listening on {addr}", env!("CARGO_PKG_VERSION"));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(handle(stream));
            }
            Err(e) => {
                eprintln!("envd: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a new connection may take to send its request: one that never does (a host that
/// went away mid-connect, a connection frozen into a snapshot) is closed instead of held forever.
const FIRST_REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn handle(stream: TcpStream) {
    let (mut rd, mut wr) = stream.into_split();
    let Some(mut request) = read_request(&mut rd, &mut wr).await else {
        return;
    };
    let mut presented = None;
    if let Request::Auth { token } = request {
        presented = Some(token);
        let Some(next) = read_request(&mut rd, &mut wr).await else {
            return;
        };
        request = next;
    }
    if !auth::admits(presented.as_deref()) {
        let _ = write_json(
            &mut wr,
            &error(
                ErrorKind::Unauthorized,
                "this guest agent answers only its capsule's host",
            ),
        )
        .await;
        return;
    }
    match request {
        Request::Health => {
            let _ = write_json(
                &mut wr,
                &Response::Health {
                    envd_version: env!("CARGO_PKG_VERSION").to_string(),
                    kernel_version: init::kernel_version(),
                    protocol: envd_proto::PROTOCOL_VERSION,
                },
            )
            .await;
        }
        Request::Exec(spec) => exec::run(spec, rd, wr).await,
        Request::Start(spec) => background::start(spec, wr).await,
        Request::Attach { selector } => background::attach(selector, rd, wr).await,
        Request::ListProcesses => processes::list(wr).await,
        Request::PtyStart(spec) => pty::start(spec, rd, wr).await,
        Request::PtyConnect { tag } => pty::connect(tag, rd, wr).await,
        Request::ListDir { path, depth } => files::list(path, depth, wr).await,
        Request::MakeDir { path } => files::mkdir(path, wr).await,
        Request::Remove { path } => files::remove(path, wr).await,
        Request::ReadFile { path } => files::read(path, wr).await,
        Request::WriteFile { path } => files::write(path, rd, wr).await,
        Request::Signal { selector, signal } => processes::signal(selector, signal, wr).await,
        Request::Connect { port } => forward::connect(port, rd, wr).await,
        Request::Restored {
            unix_nanos,
            seed,
            token,
        } => {
            let answer = match init::restored(unix_nanos, &seed) {
                Ok(()) => {
                    if let Some(t) = token.filter(|t| !t.is_empty()) {
                        auth::set(t);
                    }
                    Response::Done
                }
                Err(e) => error(ErrorKind::Internal, e),
            };
            let _ = write_json(&mut wr, &answer).await;
        }
        // Only ever first (handled above); a second is a confused client.
        Request::Auth { .. } => {
            let _ = write_json(
                &mut wr,
                &error(ErrorKind::InvalidRequest, "one auth per connection"),
            )
            .await;
        }
    }
}

/// The next frame of a new connection, as a request (within [`FIRST_REQUEST_TIMEOUT`]);
/// `None` (after answering why, when there is someone to answer) if there is none.
async fn read_request(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    wr: &mut tokio::net::tcp::OwnedWriteHalf,
) -> Option<Request> {
    let first = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, read_frame(rd)).await;
    match first.ok()? {
        Ok(Some(Frame::Json(bytes))) => match serde_json::from_slice::<Request>(&bytes) {
            Ok(r) => Some(r),
            Err(e) => {
                let _ = write_json(
                    wr,
                    &error(ErrorKind::InvalidRequest, format!("bad request: {e}")),
                )
                .await;
                None
            }
        },
        Ok(Some(_)) => {
            let _ = write_json(
                wr,
                &error(ErrorKind::InvalidRequest, "expected a JSON request frame"),
            )
            .await;
            None
        }
        Ok(None) | Err(_) => None,
    }
}

pub(crate) fn error(kind: ErrorKind, message: impl Into<String>) -> Response {
    Response::Error {
        kind,
        message: message.into(),
    }
}
