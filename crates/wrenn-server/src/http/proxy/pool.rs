//! Keep-alive connections to servers in capsules, reused across proxied requests: opening one
//! costs a connection to envd, envd's dial of the port and an HTTP handshake, which a page of
//! small requests would otherwise pay for every one.
//!
//! A connection is keyed by capsule, port and the capsule's run (a resume starts a new one,
//! so connections from before a pause are never reused). It goes back to the pool once its
//! response has been read to the end (hyper's `ready`), is dropped after [`IDLE_FOR`] unused,
//! and the pool holds at most [`PER_TARGET`] per key and [`TOTAL`] in all. A request that a
//! reused connection could not send (the server closed it meanwhile) is sent again on a new
//! one; one it did send is never repeated.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use hyper::client::conn::http1::SendRequest;

/// An unused connection is closed after this long.
pub const IDLE_FOR: Duration = Duration::from_secs(30);
/// Idle connections kept per capsule port.
pub const PER_TARGET: usize = 8;
/// Idle connections kept in all.
pub const TOTAL: usize = 512;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub capsule: String,
    pub port: u16,
    /// Which run of the capsule the connection belongs to.
    pub run: String,
}

struct Idle {
    sender: SendRequest<Body>,
    since: Instant,
}

#[derive(Default)]
pub struct GuestConnections {
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
}

impl GuestConnections {
    /// A live idle connection to `key`, newest first.
    pub fn take(&self, key: &Key) -> Option<SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.get_mut(key)?;
        let mut found = None;
        while let Some(c) = list.pop() {
            if c.since.elapsed() < IDLE_FOR && !c.sender.is_closed() && c.sender.is_ready() {
                found = Some(c.sender);
                break;
            }
        }
        if list.is_empty() {
            idle.remove(key);
        }
        found
    }

    /// Puts `sender` back once the response on it has been read to the end (if it then is
    /// still open).
    pub fn put_when_ready(self: &Arc<Self>, key: Key, mut sender: SendRequest<Body>) {
        let pool = self.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool.put(key, sender);
            }
        });
    }

    fn put(&self, key: Key, sender: SendRequest<Body>) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let mut total: usize = idle.values().map(Vec::len).sum();
        if total >= TOTAL {
            // Drop what has expired or closed; still full, this one is not kept.
            idle.retain(|_, l| {
                l.retain(|c| c.since.elapsed() < IDLE_FOR && !c.sender.is_closed());
                !l.is_empty()
            });
            total = idle.values().map(Vec::len).sum();
            if total >= TOTAL {
                return;
            }
        }
        let list = idle.entry(key).or_default();
        list.retain(|c| c.since.elapsed() < IDLE_FOR && !c.sender.is_closed());
        if list.len() < PER_TARGET {
            list.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Closes the idle connections that have waited longer than [`IDLE_FOR`].
    pub fn expire(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, l| {
            l.retain(|c| c.since.elapsed() < IDLE_FOR && !c.sender.is_closed());
            !l.is_empty()
        });
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle.lock().unwrap().values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection to a tiny HTTP server that answers every request with `ok` and keeps the
    /// connection open.
    async fn connection() -> SendRequest<Body> {
        let (client, mut server) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = server.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                let _ = server
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
            }
        });
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(client))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn key(run: &str) -> Key {
        Key {
            capsule: "cl-a".into(),
            port: 80,
            run: run.into(),
        }
    }

    #[tokio::test]
    async fn connections_return_after_their_response_and_only_to_their_run() {
        let pool = Arc::new(GuestConnections::default());
        let mut c = connection().await;
        let r = c
            .send_request(hyper::Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        pool.put_when_ready(key("1"), c);
        let body = http_body_util::BodyExt::collect(r.into_body())
            .await
            .unwrap();
        assert_eq!(&body.to_bytes()[..], b"ok");
        for _ in 0..100 {
            if pool.idle_count() == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(pool.idle_count(), 1);
        assert!(pool.take(&key("2")).is_none(), "another run never gets it");
        let mut again = pool.take(&key("1")).expect("reused");
        let r = again
            .send_request(hyper::Request::get("/").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert!(pool.take(&key("1")).is_none());
    }

    #[tokio::test]
    async fn the_pool_is_bounded_per_target() {
        let pool = GuestConnections::default();
        for _ in 0..PER_TARGET + 3 {
            pool.put(key("1"), connection().await);
        }
        assert_eq!(pool.idle_count(), PER_TARGET);
        pool.expire();
        assert_eq!(pool.idle_count(), PER_TARGET);
    }
}
