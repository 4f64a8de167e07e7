//! Authentication extractors. A handler that takes [`TeamAuth`] only runs for a caller that
//! proved who it is; everything else answers 401 with the error envelope.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use sha2::{Digest, Sha256};
use wrenn_api::{ApiError, ErrorCode};

use crate::error::HttpError;
use crate::AppState;

pub const API_KEY_HEADER: &str = "X-API-Key";

/// The team a request acts for, and which credential proved it.
#[derive(Debug, Clone)]
pub struct TeamAuth {
    pub team_id: String,
    pub api_key_id: String,
}

/// SHA-256 hex of an API key: the only form in which keys are stored.
pub fn hash_api_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A new API key: `wrn_` + 32 hex characters (128 random bits).
pub fn new_api_key() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut bytes);
    format!("wrn_{}", hex::encode(bytes))
}

/// What lists show of a key: its first 10 characters.
pub fn key_prefix(key: &str) -> String {
    key.chars().take(10).collect()
}

/// How stale an API key's `last_used` may be: it is written at most once per this period.
const LAST_USED_RESOLUTION: Duration = Duration::from_secs(60);

/// Remembers when each key's `last_used` was last written, so a busy client costs one write a
/// minute instead of one per request.
#[derive(Default)]
pub struct KeyUsage {
    written: Mutex<HashMap<String, Instant>>,
}

impl KeyUsage {
    /// True when `key_id`'s `last_used` should be written now (and records that it is).
    pub fn due(&self, key_id: &str) -> bool {
        let now = Instant::now();
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        match written.get(key_id) {
            Some(t) if now.duration_since(*t) < LAST_USED_RESOLUTION => false,
            _ => {
                written.insert(key_id.to_string(), now);
                true
            }
        }
    }
}

fn unauthorized(msg: &str) -> HttpError {
    HttpError(ApiError::new(ErrorCode::Unauthorized, msg))
}

impl FromRequestParts<AppState> for TeamAuth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(API_KEY_HEADER) else {
            return Err(unauthorized(
                "missing credentials: send an API key in the X-API-Key header",
            ));
        };
        let key = value
            .to_str()
            .map_err(|_| unauthorized("invalid API key"))?
            .trim();
        if !key.starts_with("wrn_") {
            return Err(unauthorized("invalid API key"));
        }
        let owner = state
            .store
            .api_key_by_hash(&hash_api_key(key))
            .await?
            .ok_or_else(|| unauthorized("invalid API key"))?;
        // Last-used bookkeeping must not slow or fail the request, nor cost a database write
        // on every call.
        if state.key_usage.due(&owner.key_id) {
            let store = state.store.clone();
            let key_id = owner.key_id.clone();
            tokio::spawn(async move {
                let _ = store.touch_api_key(&key_id).await;
            });
        }
        Ok(TeamAuth {
            team_id: owner.team_id,
            api_key_id: owner.key_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_have_the_documented_shape() {
        let k = new_api_key();
        assert!(k.starts_with("wrn_") && k.len() == 36, "{k}");
        assert!(k[4..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(key_prefix(&k).len(), 10);
        assert_eq!(hash_api_key(&k).len(), 64);
        assert_ne!(hash_api_key(&k), hash_api_key(&new_api_key()));
    }

    #[test]
    fn last_used_is_written_once_per_period_per_key() {
        let u = KeyUsage::default();
        assert!(u.due("key-a"));
        assert!(!u.due("key-a"));
        assert!(u.due("key-b"));
    }
}
