//! Limits on what one caller may ask of the API at once.
//!
//! - [`RateLimiter`]: a token bucket per API key and per browser session over the whole API
//!   (`rate` requests a second, bursts of `burst`); past it, 429 `rate_limited` with
//!   `Retry-After`. With Redis (several replicas) the buckets live there, so a caller's rate is
//!   one across replicas; a Redis that does not answer within [`REDIS_DEADLINE`] lets the
//!   request through (a limiter outage must not become an API outage). Requests with neither
//!   credential (sign-up, login, host agents) are not counted here: the account endpoints have
//!   their own per-address limits and host tokens are platform-issued.
//! - [`StreamSlots`]: how many WebSocket and SSE streams a team may hold open on this replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use wrenn_api::{ApiError, ErrorCode};

use super::auth::{cookie_in, API_KEY_HEADER, SESSION_COOKIE};
use crate::error::HttpError;
use crate::AppState;

/// How long a bucket check may wait for Redis.
const REDIS_DEADLINE: Duration = Duration::from_millis(250);
/// Local buckets kept before idle (full) ones are dropped.
const MAX_LOCAL_BUCKETS: usize = 50_000;

/// Requests a second and burst size; `per_sec` 0 turns the limiter off.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimits {
    pub per_sec: u32,
    pub burst: u32,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

enum Buckets {
    Local(Mutex<HashMap<String, Bucket>>),
    Redis(redis::aio::MultiplexedConnection),
}

pub struct RateLimiter {
    limits: RateLimits,
    buckets: Buckets,
}

/// Refills and takes one token from the bucket `KEYS[1]`; the clock is Redis's own, so every
/// replica agrees on it. Answers `{1, 0}` when taken, `{0, ms to wait}` otherwise.
const TAKE_SCRIPT: &str = r#"
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local b = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(b[1])
local at = tonumber(b[2])
if tokens == nil or at == nil then tokens = burst; at = now end
tokens = math.min(burst, tokens + math.max(0, now - at) * rate / 1000)
local ok, wait = 0, 0
if tokens >= 1 then
  tokens = tokens - 1
  ok = 1
else
  wait = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {ok, wait}
"#;

impl RateLimiter {
    pub fn local(limits: RateLimits) -> Self {
        Self {
            limits,
            buckets: Buckets::Local(Mutex::default()),
        }
    }

    pub async fn redis(url: &str, limits: RateLimits) -> Result<Self, redis::RedisError> {
        let conn = redis::Client::open(url)?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self {
            limits,
            buckets: Buckets::Redis(conn),
        })
    }

    pub fn limits(&self) -> RateLimits {
        self.limits
    }

    /// Takes one request from `caller`'s bucket: `Err(wait)` when it is empty.
    pub async fn take(&self, caller: &str) -> Result<(), Duration> {
        let RateLimits { per_sec, burst } = self.limits;
        if per_sec == 0 {
            return Ok(());
        }
        let (rate, burst) = (f64::from(per_sec), f64::from(burst.max(1)));
        match &self.buckets {
            Buckets::Local(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                if map.len() >= MAX_LOCAL_BUCKETS && !map.contains_key(caller) {
                    // Full buckets carry no state worth keeping.
                    map.retain(|_, b| {
                        b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst
                    });
                }
                let b = map.entry(caller.to_string()).or_insert(Bucket {
                    tokens: burst,
                    at: now,
                });
                b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * rate).min(burst);
                b.at = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    Ok(())
                } else {
                    Err(Duration::from_secs_f64((1.0 - b.tokens) / rate))
                }
            }
            Buckets::Redis(conn) => {
                let mut conn = conn.clone();
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(TAKE_SCRIPT)
                    .arg(1)
                    .arg(format!("wrenn:rate:{caller}"))
                    .arg(per_sec)
                    .arg(burst);
                let call = cmd.query_async::<(i64, i64)>(&mut conn);
                match tokio::time::timeout(REDIS_DEADLINE, call).await {
                    Ok(Ok((1, _))) => Ok(()),
                    Ok(Ok((_, wait_ms))) => {
                        Err(Duration::from_millis(wait_ms.max(1).unsigned_abs()))
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "rate limiter: Redis failed; request let through");
                        Ok(())
                    }
                    Err(_) => {
                        tracing::warn!("rate limiter: Redis timed out; request let through");
                        Ok(())
                    }
                }
            }
        }
    }
}

/// The bucket a request counts against: its API key's or its session's (hashed: buckets
/// never hold credentials), or none.
fn caller_of(req: &Request) -> Option<String> {
    let hash = |kind: &str, secret: &str| {
        let digest = Sha256::digest(secret.as_bytes());
        format!("{kind}:{}", hex::encode(&digest[..16]))
    };
    if let Some(key) = req
        .headers()
        .get(API_KEY_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        return Some(hash("key", key.trim()));
    }
    cookie_in(req.headers(), SESSION_COOKIE)
        .filter(|s| !s.is_empty())
        .map(|s| hash("session", s))
}

/// Middleware over the API routes: counts each request against its caller's bucket.
pub async fn rate_limit(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(caller) = caller_of(&req) else {
        return next.run(req).await;
    };
    match s.limiter.take(&caller).await {
        Ok(()) => next.run(req).await,
        Err(wait) => {
            let RateLimits { per_sec, burst } = s.limiter.limits();
            let secs = wait.as_secs_f64().ceil().max(1.0) as u64;
            let mut resp = HttpError(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "too many requests with this credential: at most {per_sec} a second (bursts of {burst}); retry after {secs} s"
                ),
            ))
            .into_response();
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            resp
        }
    }
}

/// Open WebSocket and SSE streams per team, on this replica.
pub struct StreamSlots {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open stream of a team; the slot is given back when it drops.
pub struct StreamSlot {
    slots: Arc<StreamSlots>,
    team: String,
}

impl StreamSlots {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::default(),
        }
    }

    /// A slot for one more of `team`'s streams, or 429 when it holds `max` already.
    pub fn acquire(self: &Arc<Self>, team: &str) -> Result<StreamSlot, ApiError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let n = open.entry(team.to_string()).or_default();
        if *n >= self.max {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                format!(
                    "the team has {} streams (WebSocket or SSE) open, its limit: close one first",
                    self.max
                ),
            ));
        }
        *n += 1;
        Ok(StreamSlot {
            slots: self.clone(),
            team: team.to_string(),
        })
    }

    #[cfg(test)]
    fn open(&self, team: &str) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.get(team).copied().unwrap_or(0)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = open.get_mut(&self.team) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.team);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_bucket_allows_its_burst_then_its_rate() {
        let l = RateLimiter::local(RateLimits {
            per_sec: 10,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(l.take("a").await.is_ok());
        }
        let wait = l.take("a").await.unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(l.take("b").await.is_ok(), "buckets are per caller");
        tokio::time::sleep(Duration::from_millis(120)).await;
        assert!(l.take("a").await.is_ok(), "refilled at the rate");
        let off = RateLimiter::local(RateLimits {
            per_sec: 0,
            burst: 0,
        });
        for _ in 0..1000 {
            assert!(off.take("a").await.is_ok());
        }
    }

    /// Two limiters on one Redis (two replicas) share a caller's bucket.
    #[tokio::test]
    async fn replicas_share_buckets_through_redis() {
        let url = std::env::var("WRENN_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let limits = RateLimits {
            per_sec: 1,
            burst: 4,
        };
        let a = RateLimiter::redis(&url, limits)
            .await
            .expect("Redis for tests");
        let b = RateLimiter::redis(&url, limits)
            .await
            .expect("Redis for tests");
        let caller = format!("test:{}", rand::random::<u64>());
        let mut allowed = 0;
        for i in 0..8 {
            let l = if i % 2 == 0 { &a } else { &b };
            if l.take(&caller).await.is_ok() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 4, "one burst across both replicas, not one each");
        let wait = a.take(&caller).await.unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
    }

    #[test]
    fn stream_slots_are_counted_per_team_and_given_back() {
        let slots = Arc::new(StreamSlots::new(2));
        let a1 = slots.acquire("a").unwrap();
        let _a2 = slots.acquire("a").unwrap();
        let e = slots.acquire("a").err().unwrap();
        assert_eq!(e.code, ErrorCode::RateLimited);
        let _b = slots.acquire("b").unwrap();
        drop(a1);
        assert_eq!(slots.open("a"), 1);
        let _a3 = slots.acquire("a").unwrap();
    }
}
