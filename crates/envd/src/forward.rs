//! `Connect`: the host reaches a TCP port inside the guest through envd (the port proxy). envd
//! dials the guest's loopback, so servers bound to 127.0.0.1 are reached like those bound to
//! every address, then moves bytes both ways until either side closes.
//!
//! Two things matter for speed under emulation, both measured: large copy buffers (tokio's
//! `copy` moves 8 KiB per call, and every call is a syscall the guest pays dearly for), and
//! acknowledging the app's bytes at once. Many servers (Python's `http.server`, for one) write a
//! response's headers and body in two small writes without `TCP_NODELAY`; Nagle then holds the
//! body until the headers are acknowledged, and the guest kernel delays that acknowledgement by
//! 40 ms. A client straight on the network rarely waits, because it answers quickly; envd reads
//! on loopback and never writes back, so it asks for quick acknowledgements after every read.

use std::os::fd::{AsRawFd, RawFd};

use envd_proto::{write_json, ErrorKind, Response};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::error;

/// How long dialing a port inside the guest may take.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Bytes moved per read, each way.
const BUFFER: usize = 256 * 1024;

pub async fn connect(port: u16, mut rd: OwnedReadHalf, mut wr: OwnedWriteHalf) {
    if port == 0 {
        let _ = write_json(&mut wr, &error(ErrorKind::InvalidRequest, "port 0")).await;
        return;
    }
    let dialed = tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await;
    let guest = match dialed {
        Ok(Ok(s)) => s,
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            let msg = format!("nothing is listening on port {port} in the capsule");
            let _ = write_json(&mut wr, &error(ErrorKind::NotFound, msg)).await;
            return;
        }
        Ok(Err(e)) => {
            let msg = format!("cannot connect to port {port} in the capsule: {e}");
            let _ = write_json(&mut wr, &error(ErrorKind::Internal, msg)).await;
            return;
        }
        Err(_) => {
            let msg = format!("port {port} in the capsule did not accept within {DIAL_TIMEOUT:?}");
            let _ = write_json(&mut wr, &error(ErrorKind::Internal, msg)).await;
            return;
        }
    };
    let _ = guest.set_nodelay(true);
    if write_json(&mut wr, &Response::Done).await.is_err() {
        return;
    }
    let app = guest.as_raw_fd();
    let (grd, gwr) = guest.into_split();
    // Each direction ends on its own (a half-close is passed on), so request bodies and
    // streamed responses finish as they would on a direct connection.
    tokio::join!(pump(&mut rd, gwr, None), pump(grd, &mut wr, Some(app)));
}

/// Moves bytes from `from` to `to` until `from` ends, then half-closes `to`. With `quick_ack`,
/// the socket read from acknowledges what it received at once.
async fn pump(
    mut from: impl AsyncRead + Unpin,
    mut to: impl AsyncWrite + Unpin,
    quick_ack: Option<RawFd>,
) {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(fd) = quick_ack {
            ack_quickly(fd);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Turns on `TCP_QUICKACK` (the kernel turns it off again by itself, hence after every read).
fn ack_quickly(fd: RawFd) {
    let on: libc::c_int = 1;
    // SAFETY: `fd` is the socket `pump` is reading from, open while the pump holds that read
    // half (the call is made between two reads); the option value is a live c_int of the size
    // passed. A failure only costs the optimisation.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}
