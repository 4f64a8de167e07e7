//! [`EnvdConn`]: one TCP connection to envd that dies with its capsule's VM.
//!
//! When a capsule pauses, its VM and network slot go away under every open connection (exec
//! streams, terminals, file transfers). A socket whose peer vanished without a reset would wait
//! for minutes; instead every connection watches its capsule's cancellation token and fails
//! at once with "connection aborted" when the manager cancels it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

/// A byte stream to envd: a TCP connection, or a tunnel through a remote agent.
pub trait EnvdStream: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> EnvdStream for T {}

pub struct EnvdConn {
    inner: Box<dyn EnvdStream>,
    cancelled: Pin<Box<WaitForCancellationFutureOwned>>,
    /// Set once the token fired (a finished future must not be polled again).
    dead: bool,
}

impl EnvdConn {
    pub fn new(inner: impl EnvdStream + 'static, token: CancellationToken) -> Self {
        Self::boxed(Box::new(inner), token)
    }

    pub fn boxed(inner: Box<dyn EnvdStream>, token: CancellationToken) -> Self {
        Self {
            inner,
            cancelled: Box::pin(token.cancelled_owned()),
            dead: false,
        }
    }

    /// Ready with an error once the capsule's connections were cut.
    fn check(&mut self, cx: &mut Context<'_>) -> Result<(), io::Error> {
        if !self.dead && self.cancelled.as_mut().poll(cx).is_ready() {
            self.dead = true;
        }
        if self.dead {
            return Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "the capsule's VM stopped (paused or destroyed)",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for EnvdConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for EnvdConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Err(e) = this.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn a_cancelled_token_wakes_a_blocked_reader() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move { listener.accept().await.unwrap() });
        let stream = TcpStream::connect(addr).await.unwrap();
        let _peer = accept.await.unwrap();
        let token = CancellationToken::new();
        let mut conn = EnvdConn::new(stream, token.clone());
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 1];
            conn.read(&mut b).await
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "nothing to read yet");
        token.cancel();
        let err = tokio::time::timeout(std::time::Duration::from_secs(5), reader)
            .await
            .expect("the reader woke up")
            .unwrap()
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::ConnectionAborted);
    }
}
