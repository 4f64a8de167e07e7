//! `Connect`: the host reaches a TCP port inside the guest through envd (the port proxy). envd
//! dials the guest's loopback, so servers bound to 127.0.0.1 are reached like those bound to
//! every address, then moves bytes both ways until either side closes.

use envd_proto::{write_json, ErrorKind, Response};
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::error;

/// How long dialing a port inside the guest may take.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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
    let (mut grd, mut gwr) = guest.into_split();
    // Each direction ends on its own (a half-close is passed on), so request bodies and
    // streamed responses finish as they would on a direct connection.
    let up = async {
        let _ = tokio::io::copy(&mut rd, &mut gwr).await;
        let _ = gwr.shutdown().await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut grd, &mut wr).await;
        let _ = wr.shutdown().await;
    };
    tokio::join!(up, down);
}
