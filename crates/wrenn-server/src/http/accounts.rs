//! `/v1/auth/*`, `/v1/me*` and `/auth/oauth/*`: signup, activation, login, sessions, profile,
//! passwords and OAuth. Session credentials travel only in cookies set here.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{AppendHeaders, IntoResponse, Redirect, Response};
use axum::Json;
use serde::Deserialize;
use wrenn_api::*;

use super::{ApiJson, ApiPath, ApiQuery};
use crate::accounts::oauth::{Finished, STATE_TTL};
use crate::accounts::{ClientMeta, IssuedSession};
use crate::error::HttpError;
use crate::http::auth::{cookie, SessionAuth, CSRF_COOKIE, SESSION_COOKIE};
use crate::AppState;

type Result<T> = std::result::Result<T, HttpError>;

/// The cookie that carries an OAuth flow's state between the redirect and the callback.
const STATE_COOKIE: &str = "wrenn_oauth_state";

impl<S: Send + Sync> FromRequestParts<S> for ClientMeta {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        Ok(ClientMeta {
            ip: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0.ip()),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
        })
    }
}

fn cookie_attrs(secure: bool) -> &'static str {
    if secure {
        "; Path=/; Secure; SameSite=Strict"
    } else {
        "; Path=/; SameSite=Strict"
    }
}

/// `Set-Cookie` values for a new session: the HttpOnly secret and the CSRF token scripts read.
fn session_cookies(s: &IssuedSession, secure: bool) -> [(header::HeaderName, String); 2] {
    let max_age = (s.expires_at - chrono::Utc::now()).num_seconds().max(0);
    let a = cookie_attrs(secure);
    [
        (
            header::SET_COOKIE,
            format!(
                "{SESSION_COOKIE}={}{a}; HttpOnly; Max-Age={max_age}",
                s.secret
            ),
        ),
        (
            header::SET_COOKIE,
            format!("{CSRF_COOKIE}={}{a}; Max-Age={max_age}", s.csrf),
        ),
    ]
}

fn clear_cookies(secure: bool) -> [(header::HeaderName, String); 2] {
    let a = cookie_attrs(secure);
    [
        (
            header::SET_COOKIE,
            format!("{SESSION_COOKIE}={a}; HttpOnly; Max-Age=0"),
        ),
        (header::SET_COOKIE, format!("{CSRF_COOKIE}={a}; Max-Age=0")),
    ]
}

fn with_session(s: &AppState, (body, issued): (SessionResponse, IssuedSession)) -> Response {
    (
        StatusCode::OK,
        AppendHeaders(session_cookies(&issued, s.accounts.secure_cookies())),
        Json(body),
    )
        .into_response()
}

fn cleared(s: &AppState) -> Response {
    (
        StatusCode::NO_CONTENT,
        AppendHeaders(clear_cookies(s.accounts.secure_cookies())),
    )
        .into_response()
}

pub async fn signup(
    State(s): State<AppState>,
    meta: ClientMeta,
    ApiJson(req): ApiJson<SignupRequest>,
) -> Result<impl IntoResponse> {
    Ok((
        StatusCode::CREATED,
        Json(s.accounts.signup(req, &meta).await?),
    ))
}

pub async fn activate(
    State(s): State<AppState>,
    meta: ClientMeta,
    ApiJson(req): ApiJson<TokenRequest>,
) -> Result<Response> {
    let out = s.accounts.activate(&req.token, &meta).await?;
    Ok(with_session(&s, out))
}

pub async fn login(
    State(s): State<AppState>,
    meta: ClientMeta,
    ApiJson(req): ApiJson<LoginRequest>,
) -> Result<Response> {
    let out = s.accounts.login(req, &meta).await?;
    Ok(with_session(&s, out))
}

pub async fn logout(State(s): State<AppState>, SessionAuth(u): SessionAuth) -> Result<Response> {
    s.accounts.logout(&u).await?;
    Ok(cleared(&s))
}

pub async fn logout_all(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Response> {
    s.accounts.logout_all(&u).await?;
    Ok(cleared(&s))
}

pub async fn switch_team(
    State(s): State<AppState>,
    meta: ClientMeta,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<SwitchTeamRequest>,
) -> Result<Response> {
    let out = s.accounts.switch_team(&u, &req.team_id, &meta).await?;
    Ok(with_session(&s, out))
}

pub async fn sessions(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Json<SessionList>> {
    Ok(Json(s.accounts.sessions(&u).await?))
}

pub async fn revoke_session(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode> {
    s.accounts.revoke_session(&u, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn me(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
) -> Result<Json<MeResponse>> {
    Ok(Json(s.accounts.me(&u).await?))
}

pub async fn rename_me(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<NameRequest>,
) -> Result<StatusCode> {
    s.accounts.rename_me(&u, &req.name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_me(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<DeleteAccountRequest>,
) -> Result<Response> {
    s.accounts.delete_me(&u, &req.confirmation).await?;
    Ok(cleared(&s))
}

pub async fn change_password(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiJson(req): ApiJson<ChangePasswordRequest>,
) -> Result<Response> {
    s.accounts.change_password(&u, req).await?;
    // Every session ended, this one too.
    Ok(cleared(&s))
}

pub async fn request_reset(
    State(s): State<AppState>,
    meta: ClientMeta,
    ApiJson(req): ApiJson<ResetRequest>,
) -> Result<StatusCode> {
    s.accounts.request_reset(&req.email, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn confirm_reset(
    State(s): State<AppState>,
    meta: ClientMeta,
    ApiJson(req): ApiJson<ResetConfirmRequest>,
) -> Result<StatusCode> {
    s.accounts.confirm_reset(req, &meta).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn state_cookie(state: &str, secure: bool) -> (header::HeaderName, String) {
    // Lax, not Strict: the browser must send it on the provider's cross-site redirect back.
    let secure = if secure { "; Secure" } else { "" };
    (
        header::SET_COOKIE,
        format!(
            "{STATE_COOKIE}={state}; Path=/auth/oauth; HttpOnly; SameSite=Lax; Max-Age={}{secure}",
            STATE_TTL.num_seconds()
        ),
    )
}

pub async fn connect_provider(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(provider): ApiPath<String>,
) -> Result<Response> {
    let started = s.accounts.oauth_connect_start(&u, &provider).await?;
    Ok((
        AppendHeaders([state_cookie(&started.state, s.accounts.secure_cookies())]),
        Json(AuthUrlResponse {
            auth_url: started.auth_url,
        }),
    )
        .into_response())
}

pub async fn disconnect_provider(
    State(s): State<AppState>,
    SessionAuth(u): SessionAuth,
    ApiPath(provider): ApiPath<String>,
) -> Result<StatusCode> {
    s.accounts.disconnect_provider(&u, &provider).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn oauth_redirect(
    State(s): State<AppState>,
    ApiPath(provider): ApiPath<String>,
) -> Result<Response> {
    let started = s.accounts.oauth_login_start(&provider).await?;
    Ok((
        AppendHeaders([state_cookie(&started.state, s.accounts.secure_cookies())]),
        Redirect::to(&started.auth_url),
    )
        .into_response())
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
}

pub async fn oauth_callback(
    State(s): State<AppState>,
    meta: ClientMeta,
    ApiPath(provider): ApiPath<String>,
    ApiQuery(q): ApiQuery<CallbackQuery>,
    parts: CookieHeader,
) -> Response {
    // Only a configured provider's name goes into the redirect back to the dashboard.
    if let Err(e) = s.accounts.oauth_provider(&provider) {
        return HttpError(e).into_response();
    }
    let finished = s
        .accounts
        .oauth_finish(
            &provider,
            q.code.as_deref(),
            q.state.as_deref(),
            q.error.as_deref(),
            parts.0.as_deref(),
            &meta,
        )
        .await;
    let secure = s.accounts.secure_cookies();
    let clear_state = (
        header::SET_COOKIE,
        format!("{STATE_COOKIE}=; Path=/auth/oauth; HttpOnly; SameSite=Lax; Max-Age=0"),
    );
    match finished {
        Finished::Session(b) => {
            let [a, c] = session_cookies(&b.1, secure);
            (
                AppendHeaders([a, c, clear_state]),
                Redirect::to(&s.accounts.oauth_return_url(&provider, None)),
            )
                .into_response()
        }
        Finished::Connected => (
            AppendHeaders([clear_state]),
            Redirect::to(&s.accounts.oauth_return_url(&provider, None)),
        )
            .into_response(),
        Finished::Failed(code) => (
            AppendHeaders([clear_state]),
            Redirect::to(&s.accounts.oauth_return_url(&provider, Some(code))),
        )
            .into_response(),
    }
}

/// The OAuth state cookie of a request.
pub struct CookieHeader(Option<String>);

impl<S: Send + Sync> FromRequestParts<S> for CookieHeader {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        _: &S,
    ) -> std::result::Result<Self, Self::Rejection> {
        Ok(CookieHeader(
            cookie(parts, STATE_COOKIE).map(str::to_string),
        ))
    }
}
