//! The host end of the serial lifeline (see `envd_proto::lifeline`): a unix socket QEMU listens
//! on, connected to the guest's virtio-serial port. Used when TCP to envd fails, to tell "envd
//! is dead" from "the guest network is broken" and to have envd repair the latter at once.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use envd_proto::lifeline::{LifelineOp, LifelineReply, LifelineRequest, MAX_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use crate::error::{EnvdError, Result};

/// Bound on one lifeline call: envd naps up to 200 ms between checks when no host is
/// connected, and a repair is a handful of ioctls.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// Sends one request and waits for its reply (skipping stale replies to earlier requests).
pub(crate) async fn call(socket: &Path, op: LifelineOp) -> Result<LifelineReply> {
    tokio::time::timeout(CALL_TIMEOUT, call_inner(socket, op))
        .await
        .map_err(|_| {
            EnvdError::Unavailable(format!("lifeline: no answer within {CALL_TIMEOUT:?}"))
        })?
}

async fn call_inner(socket: &Path, op: LifelineOp) -> Result<LifelineReply> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| EnvdError::Unavailable(format!("lifeline {}: {e}", socket.display())))?;
    let (rd, mut wr) = stream.into_split();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let mut line = serde_json::to_vec(&LifelineRequest { id, op })
        .map_err(|e| EnvdError::Unavailable(format!("lifeline: {e}")))?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let mut rd = BufReader::new(rd);
    loop {
        let mut buf = Vec::new();
        let n = (&mut rd)
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(EnvdError::Unavailable(
                "lifeline closed before answering".into(),
            ));
        }
        match serde_json::from_slice::<LifelineReply>(&buf) {
            Ok(reply) if reply.id == id => return Ok(reply),
            // A reply to an earlier caller that gave up, or noise: keep reading.
            _ => continue,
        }
    }
}
