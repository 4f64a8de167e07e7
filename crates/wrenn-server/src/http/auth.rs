//! Authentication extractors. A handler that takes [`TeamAuth`], [`SessionAuth`] or
//! [`AdminAuth`] only runs for a caller that proved who it is; everything else answers 401 (no
//! or bad credentials) or 403 (CSRF, rights) with the error envelope.
//!
//! - API key (`X-API-Key`): team-scoped capsule operations; never needs CSRF.
//! - Session (`wrenn_sid` cookie): everything; state-changing methods also need the
//!   `X-CSRF-Token` header equal to the `wrenn_csrf` cookie and to the session's token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::Method;
use wrenn_api::{ApiError, ErrorCode};

use crate::accounts::hash_api_key;
use crate::accounts::secrets::constant_time_eq;
use crate::accounts::SessionUser;
use crate::error::HttpError;
use crate::AppState;

pub const API_KEY_HEADER: &str = "X-API-Key";

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

pub const SESSION_COOKIE: &str = "wrenn_sid";
pub const CSRF_COOKIE: &str = "wrenn_csrf";
pub const CSRF_HEADER: &str = "X-CSRF-Token";

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie<'a>(parts: &'a Parts, name: &str) -> Option<&'a str> {
    cookies(parts, name).next()
}

/// Every value of cookie `name` in the request's `Cookie` headers, in order (a host may get
/// several: its own and a parent domain's).
pub fn cookies<'a, 'n>(
    parts: &'a Parts,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    parts
        .headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .filter(move |(k, _)| *k == name)
        .map(|(_, v)| v.trim_matches('"'))
}

/// Who is acting: what events, audit entries and logs name.
#[derive(Debug, Clone)]
pub enum Actor {
    ApiKey { id: String, name: String },
    User { id: String, email: String },
}

impl Actor {
    pub fn event(&self) -> wrenn_api::EventActor {
        match self {
            Actor::ApiKey { id, name } => wrenn_api::EventActor {
                kind: "api_key".into(),
                id: id.clone(),
                name: name.clone(),
            },
            Actor::User { id, email } => wrenn_api::EventActor {
                kind: "user".into(),
                id: id.clone(),
                name: email.clone(),
            },
        }
    }
}

/// The team a request acts for, proved by an API key or by a session (with its CSRF token on
/// state-changing requests).
#[derive(Debug, Clone)]
pub struct TeamAuth {
    pub team_id: String,
    pub actor: Actor,
}

/// A request authenticated by a browser session (CSRF-checked on state-changing methods).
#[derive(Debug, Clone)]
pub struct SessionAuth(pub SessionUser);

/// A session of a platform admin (the flag is read from the database on every request).
#[derive(Debug, Clone)]
pub struct AdminAuth(pub SessionUser);

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// The session of this request, if it carries a valid `wrenn_sid` cookie; `Err` when it does
/// but the CSRF check of a state-changing request fails.
async fn session(parts: &Parts, state: &AppState) -> Result<Option<SessionUser>, HttpError> {
    let Some(secret) = cookie(parts, SESSION_COOKIE).filter(|s| !s.is_empty()) else {
        return Ok(None);
    };
    let Some(user) = state.accounts.authenticate(secret).await? else {
        return Err(unauthorized("session expired or revoked: log in again"));
    };
    if !is_safe(&parts.method) {
        let header = parts.headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        let cookie = cookie(parts, CSRF_COOKIE);
        let ok = match (header, cookie) {
            (Some(h), Some(c)) => constant_time_eq(h, c) && constant_time_eq(h, &user.csrf_token),
            _ => false,
        };
        if !ok {
            return Err(HttpError(ApiError::forbidden(
                "missing or invalid CSRF token: send the wrenn_csrf cookie's value in the X-CSRF-Token header",
            )));
        }
    }
    Ok(Some(user))
}

impl FromRequestParts<AppState> for SessionAuth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        match session(parts, state).await? {
            Some(u) => Ok(SessionAuth(u)),
            None if parts.headers.contains_key(API_KEY_HEADER) => Err(unauthorized(
                "this endpoint needs a browser session (wrenn_sid cookie); API keys are for capsule operations",
            )),
            None => Err(unauthorized("missing credentials: log in to get a session")),
        }
    }
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let SessionAuth(u) = SessionAuth::from_request_parts(parts, state).await?;
        if !u.is_admin {
            return Err(HttpError(ApiError::forbidden(
                "this endpoint is for platform admins",
            )));
        }
        Ok(AdminAuth(u))
    }
}

impl FromRequestParts<AppState> for TeamAuth {
    type Rejection = HttpError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        // Set by the admin capsule routes' scope layer, which already checked the caller.
        if let Some(scoped) = parts.extensions.get::<TeamAuth>() {
            return Ok(scoped.clone());
        }
        let Some(value) = parts.headers.get(API_KEY_HEADER) else {
            return match session(parts, state).await? {
                Some(u) if u.role.is_some() => Ok(TeamAuth {
                    team_id: u.team_id,
                    actor: Actor::User {
                        id: u.user_id,
                        email: u.email,
                    },
                }),
                Some(_) => Err(HttpError(ApiError::forbidden(
                    "you are no longer a member of this session's team: switch team",
                ))),
                None => Err(unauthorized(
                    "missing credentials: send an API key in the X-API-Key header",
                )),
            };
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
            actor: Actor::ApiKey {
                id: owner.key_id,
                name: owner.name,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_used_is_written_once_per_period_per_key() {
        let u = KeyUsage::default();
        assert!(u.due("key-a"));
        assert!(!u.due("key-a"));
        assert!(u.due("key-b"));
    }
}
