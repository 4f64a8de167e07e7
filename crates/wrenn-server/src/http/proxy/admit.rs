//! Who a proxied request is let in as. In order: a public capsule or port lets anyone in; an
//! access token for the port (the `wrenn_token` query parameter, or the cookie a browser got
//! for it) lets its bearer in; otherwise the request needs the capsule's team credentials (an
//! API key in `X-API-Key`, as the SDK sends, or a session), and another team's capsule is 404
//! as in the API.
//!
//! A browser following a token link (`GET …/?wrenn_token=…`) is answered with a redirect to the
//! same URL without the token and a cookie holding it, scoped to exactly that host (no
//! `Domain`), so the page's own links, scripts and WebSockets work and the token does not stay
//! in the address bar or reach the app.

use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use wrenn_api::{ApiError, EventActor};

use super::{ProxySettings, Target};
use crate::capsules::Admission;
use crate::error::HttpError;
use crate::http::auth::{cookies, TeamAuth, CSRF_COOKIE, SESSION_COOKIE};
use crate::AppState;

/// The query parameter carrying an access token.
pub const TOKEN_PARAM: &str = "wrenn_token";
/// The cookie a browser keeps an access token in (one per proxied host).
pub const TOKEN_COOKIE: &str = "wrenn_proxy_token";
/// Platform cookies that never reach a guest.
const PLATFORM_COOKIES: &[&str] = &[TOKEN_COOKIE, SESSION_COOKIE, CSRF_COOKIE];

/// What the proxy does with a request.
pub enum Decision {
    /// Forward it, acting for `team_id`.
    Forward { team_id: String, actor: EventActor },
    /// Answer this instead (the token link's redirect).
    Answer(Response),
}

pub async fn admit(
    s: &AppState,
    settings: &ProxySettings,
    target: &Target,
    parts: &mut Parts,
) -> Result<Decision, HttpError> {
    let query_token = token_in_query(parts.uri.query());
    let mut tokens: Vec<String> = cookies(parts, TOKEN_COOKIE).map(str::to_string).collect();
    if let Some(t) = &query_token {
        tokens.push(t.clone());
    }
    let token_refs: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let now = Utc::now();
    let admission = s
        .capsules
        .proxy_admission(&target.capsule, target.port, &token_refs, now)
        .await?;
    let granted = match admission {
        Admission::Public { team_id } => Some((team_id, None)),
        Admission::Token {
            team_id,
            token,
            expires,
        } => Some((team_id, Some((token, expires)))),
        Admission::NeedsTeam => None,
    };
    if let Some((team_id, token)) = granted {
        // A token link opened in a browser: trade the token for a cookie.
        if let (Some(q), Some((token, expires))) = (&query_token, token) {
            if *q == token && (parts.method == Method::GET || parts.method == Method::HEAD) {
                let max_age = (expires - now.timestamp()).max(0);
                return Ok(Decision::Answer(token_redirect(
                    parts, settings, &token, max_age,
                )));
            }
        }
        return Ok(Decision::Forward {
            team_id,
            actor: EventActor::system("port-proxy"),
        });
    }
    match <TeamAuth as axum::extract::FromRequestParts<AppState>>::from_request_parts(parts, s)
        .await
    {
        Ok(auth) => Ok(Decision::Forward {
            team_id: auth.team_id,
            actor: auth.actor.event(),
        }),
        Err(_) if !tokens.is_empty() => {
            Err(HttpError(ApiError::unauthorized(format!(
                "the access token is not valid for port {} of capsule {} (expired, revoked, or for another port): ask for a new one",
                target.port, target.capsule
            ))))
        }
        Err(e) => Err(e),
    }
}

/// 302 to the same path and query without the token, setting the token's cookie.
fn token_redirect(parts: &Parts, settings: &ProxySettings, token: &str, max_age: i64) -> Response {
    let rest = without_token(parts.uri.query());
    let location = match rest {
        Some(q) => format!("{}?{q}", parts.uri.path()),
        None => parts.uri.path().to_string(),
    };
    let secure = if settings.scheme == "https" {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{TOKEN_COOKIE}={token}; Path=/; Max-Age={max_age}; HttpOnly; SameSite=Lax{secure}"
    );
    let mut r = StatusCode::FOUND.into_response();
    if let (Ok(l), Ok(c)) = (
        HeaderValue::try_from(location),
        HeaderValue::try_from(cookie),
    ) {
        r.headers_mut().insert(header::LOCATION, l);
        r.headers_mut().insert(header::SET_COOKIE, c);
        r.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// The `wrenn_token` query parameter, if any.
fn token_in_query(query: Option<&str>) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == TOKEN_PARAM)
        .map(|(_, v)| v.into_owned())
}

/// The query without `wrenn_token` (other parameters byte for byte, in order); `None` when
/// nothing is left.
pub fn without_token(query: Option<&str>) -> Option<String> {
    let kept: Vec<&str> = query?
        .split('&')
        .filter(|kv| {
            let k = kv.split_once('=').map_or(*kv, |(k, _)| k);
            k != TOKEN_PARAM && !kv.is_empty()
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// The `Cookie` header the guest sees: the request's cookies without the platform's own.
pub fn guest_cookies(headers: &mut axum::http::HeaderMap) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| {
            let k = kv.split_once('=').map_or(*kv, |(k, _)| k);
            !kv.is_empty() && !PLATFORM_COOKIES.contains(&k)
        })
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::try_from(kept.join("; ")) {
            headers.insert(header::COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_leaves_the_query_and_the_rest_stays() {
        assert_eq!(
            token_in_query(Some("a=1&wrenn_token=t.1.2.x&b")).as_deref(),
            Some("t.1.2.x")
        );
        assert_eq!(token_in_query(Some("a=1")), None);
        assert_eq!(
            without_token(Some("a=1&wrenn_token=t&b=%2F")).as_deref(),
            Some("a=1&b=%2F")
        );
        assert_eq!(without_token(Some("wrenn_token=t")), None);
        assert_eq!(without_token(None), None);
    }

    #[test]
    fn platform_cookies_never_reach_the_guest() {
        let mut h = axum::http::HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("app=1; wrenn_proxy_token=x; wrenn_sid=s"),
        );
        h.append(
            header::COOKIE,
            HeaderValue::from_static("wrenn_csrf=c; theme=dark"),
        );
        guest_cookies(&mut h);
        assert_eq!(h.get(header::COOKIE).unwrap(), "app=1; theme=dark");
        let mut h = axum::http::HeaderMap::new();
        h.append(
            header::COOKIE,
            HeaderValue::from_static("wrenn_proxy_token=x"),
        );
        guest_cookies(&mut h);
        assert!(h.get(header::COOKIE).is_none());
    }
}
