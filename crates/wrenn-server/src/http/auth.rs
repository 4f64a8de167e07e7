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
use axum::http::{header, Method};
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

/// The value of cookie `name` in `headers`.
pub fn cookie_in<'a>(headers: &'a axum::http::HeaderMap, name: &str) -> Option<&'a str> {
    cookies_in(headers, name).next()
}

/// Every value of cookie `name` in the request's `Cookie` headers, in order (a host may get
/// several: its own and a parent domain's).
pub fn cookies<'a, 'n>(
    parts: &'a Parts,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    cookies_in(&parts.headers, name)
}

fn cookies_in<'a, 'n>(
    headers: &'a axum::http::HeaderMap,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    headers
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
    /// What it was proved with, so a long-lived stream can ask again ([`revoked`]).
    pub grant: Grant,
}

/// The credential a request was authorised with, kept (hashed, for keys) by streams that
/// outlive the request: a WebSocket or an SSE stream asks again every
/// `AppState::stream_recheck` whether it still holds, and ends when it does not.
#[derive(Debug, Clone)]
pub enum Grant {
    ApiKey {
        hash: String,
    },
    /// A browser session; `admin` when it was authorised as a platform admin (the admin
    /// routes), which must then still hold, rather than membership of the team.
    Session {
        secret: String,
        admin: bool,
    },
}

impl Grant {
    /// The session cookie of `parts` as a grant (the request was already authorised by it).
    pub fn session_of(parts: &Parts, admin: bool) -> Grant {
        Grant::Session {
            secret: cookie(parts, SESSION_COOKIE)
                .unwrap_or_default()
                .to_string(),
            admin,
        }
    }

    /// `Err(reason)` when this grant no longer authorises acting for `team_id` (`None`: any
    /// team, for admin streams). A database error counts as still holding: a stream is not
    /// cut for a moment's outage, and the next check asks again.
    pub async fn still_holds(&self, s: &AppState, team_id: Option<&str>) -> Result<(), String> {
        match self {
            Grant::ApiKey { hash } => match s.store.api_key_by_hash(hash).await {
                Ok(None) => Err("API key deleted".into()),
                Ok(Some(k)) if !k.creator_active => {
                    Err("API key revoked: its creator left the team".into())
                }
                _ => Ok(()),
            },
            Grant::Session { secret, admin } => match s.accounts.authenticate(secret).await {
                Ok(None) => Err("session ended (logged out, revoked or deactivated)".into()),
                Ok(Some(u)) if *admin && !u.is_admin => Err("no longer a platform admin".into()),
                Ok(Some(u))
                    if !*admin && (u.role.is_none() || team_id.is_some_and(|t| t != u.team_id)) =>
                {
                    Err("no longer a member of the team".into())
                }
                _ => Ok(()),
            },
        }
    }
}

/// Completes, with the reason, once `grant` stops authorising `team_id`; never before the
/// first recheck interval. Streams select on it beside their own work.
pub async fn revoked(s: &AppState, grant: &Grant, team_id: Option<&str>) -> String {
    loop {
        tokio::time::sleep(s.stream_recheck).await;
        if let Err(reason) = grant.still_holds(s, team_id).await {
            return reason;
        }
    }
}

/// A request authenticated by a browser session (CSRF-checked on state-changing methods).
#[derive(Debug, Clone)]
pub struct SessionAuth(pub SessionUser);

/// A session of a platform admin (the flag is read from the database on every request).
#[derive(Debug, Clone)]
pub struct AdminAuth(pub SessionUser);

/// The `Origin` of a browser's WebSocket upgrade when it is neither the host the request was
/// sent to nor the platform's public URL; `None` for other requests and for clients that send
/// no `Origin` (SDKs, the CLI).
fn foreign_websocket_origin(parts: &Parts, public_url: &str) -> Option<String> {
    let upgrade = parts.headers.get(header::UPGRADE)?.to_str().ok()?;
    if !upgrade.eq_ignore_ascii_case("websocket") {
        return None;
    }
    let origin = parts.headers.get(header::ORIGIN)?;
    let Some(origin_str) = origin.to_str().ok() else {
        return Some(String::from_utf8_lossy(origin.as_bytes()).into_owned());
    };
    let authority = url::Url::parse(origin_str)
        .ok()
        .and_then(|u| authority_of(&u));
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| {
            let h = h.to_ascii_lowercase();
            match h.strip_suffix(":80").or_else(|| h.strip_suffix(":443")) {
                Some(bare) => bare.to_string(),
                None => h,
            }
        });
    let public = url::Url::parse(public_url)
        .ok()
        .and_then(|u| authority_of(&u));
    match authority {
        Some(a) if Some(&a) == host.as_ref() || Some(&a) == public.as_ref() => None,
        _ => Some(origin_str.to_string()),
    }
}

/// `host[:port]` of a URL, lower case, without the scheme's default port.
fn authority_of(u: &url::Url) -> Option<String> {
    let host = u.host_str()?.to_ascii_lowercase();
    Some(match u.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    })
}

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
    // A WebSocket upgrade is a GET, so CSRF tokens do not guard it; a page on another site
    // could otherwise open a terminal with the user's cookie (cross-site WebSocket hijacking).
    if let Some(origin) = foreign_websocket_origin(parts, state.accounts.public_url()) {
        return Err(HttpError(ApiError::forbidden(format!(
            "WebSocket from origin {origin} refused: open it from the page this platform serves"
        ))));
    }
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
                    grant: Grant::session_of(parts, false),
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
        let hash = hash_api_key(key);
        let owner = state
            .store
            .api_key_by_hash(&hash)
            .await?
            .ok_or_else(|| unauthorized("invalid API key"))?;
        if !owner.creator_active {
            return Err(unauthorized(
                "API key no longer valid: the member who created it has left the team or was deactivated",
            ));
        }
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
            grant: Grant::ApiKey { hash },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(origin: Option<&str>, host: &str) -> Parts {
        let mut b = axum::http::Request::builder()
            .uri("/v1/capsules/x/pty")
            .header(header::UPGRADE, "websocket")
            .header(header::HOST, host);
        if let Some(o) = origin {
            b = b.header(header::ORIGIN, o);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn websocket_origins_must_be_the_platform_itself() {
        let public = "https://wrenn.example.com";
        let foreign = |o, h| foreign_websocket_origin(&upgrade(o, h), public);
        assert_eq!(foreign(None, "localhost:8080"), None, "SDKs send no Origin");
        assert_eq!(
            foreign(Some("http://localhost:8080"), "localhost:8080"),
            None
        );
        assert_eq!(foreign(Some("https://LOCALHOST"), "localhost:443"), None);
        assert_eq!(
            foreign(Some("https://wrenn.example.com"), "10.0.0.5:8080"),
            None,
            "behind a reverse proxy the public URL is the origin"
        );
        assert_eq!(
            foreign(Some("https://evil.example"), "localhost:8080").as_deref(),
            Some("https://evil.example")
        );
        assert_eq!(
            foreign(Some("http://localhost:9999"), "localhost:8080").as_deref(),
            Some("http://localhost:9999")
        );
        assert!(foreign(Some("null"), "localhost:8080").is_some());
        let plain = axum::http::Request::builder()
            .header(header::ORIGIN, "https://evil.example")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        assert_eq!(
            foreign_websocket_origin(&plain, public),
            None,
            "not an upgrade"
        );
    }

    #[test]
    fn last_used_is_written_once_per_period_per_key() {
        let u = KeyUsage::default();
        assert!(u.due("key-a"));
        assert!(!u.due("key-a"));
        assert!(u.due("key-b"));
    }
}
