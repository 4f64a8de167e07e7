//! Accounts: signup and activation, sessions, passwords, profile, teams and members, API keys,
//! OAuth identities and the platform-admin surface. HTTP handlers call [`AccountService`];
//! it validates, applies the rules of the API (token lifetimes, roles, last-admin and
//! last-login-method guards), and calls the [`Store`].
//!
//! Invariants:
//! - Secrets (session cookies, activation/reset tokens, API keys) are stored only as SHA-256;
//!   passwords only as argon2id.
//! - Every request re-reads the session, the user's status and admin flag and their role in
//!   the session's team, so a revocation, deactivation, demotion or removal applies to the
//!   very next request.
//! - The clock is injected ([`Clock`]) so expiry rules are tested without waiting.
//!
//! Split by concern: `signup` (signup, activation, login), `sessions`, `profile` (me,
//! passwords), `api_keys`, `teams` (teams, members, user search), `admin`; `oauth`, `mail`,
//! `limits` and `secrets` are their helpers.

mod admin;
mod api_keys;
pub use api_keys::{hash_api_key, key_prefix, new_api_key};
pub mod limits;
pub mod mail;
pub mod oauth;
mod profile;
pub mod secrets;
mod sessions;
mod signup;
mod teams;

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use wrenn_api::*;

use crate::audit::{AuditLog, Record};
pub use crate::clock::Clock;
use crate::store::{NewSession, NewTeam, SessionContext, Store, TeamRow, UserRow};
use limits::{Action, AuthLimits, Exhausted};
use mail::Mailer;
use secrets::{random_hex, sha256_hex};

pub type Result<T> = std::result::Result<T, ApiError>;

/// How long an activation link is valid.
pub const ACTIVATION_TTL: Duration = Duration::minutes(30);
/// How long a password-reset link is valid.
pub const RESET_TTL: Duration = Duration::minutes(15);
/// A session ends this long after its last request…
pub const SESSION_IDLE: Duration = Duration::hours(6);
/// …and at the latest this long after it began.
pub const SESSION_MAX: Duration = Duration::hours(24);
/// `last_seen_at` is written at most this often per session.
const SESSION_TOUCH: Duration = Duration::seconds(60);
/// Soft-deleted accounts are purged after this long.
pub const PURGE_AFTER: Duration = Duration::days(15);
const MIN_PASSWORD: usize = 8;
/// Longer passwords are refused rather than hashed (argon2 cost grows with input).
const MAX_PASSWORD: usize = 1024;

/// What deleting a team or deactivating its owner does to the team's capsules.
#[async_trait::async_trait]
pub trait TeamCapsules: Send + Sync {
    /// Destroys every capsule of the team that holds or may hold a VM. Failures are logged;
    /// the rows stay for the dead-VM pass.
    async fn destroy_team_capsules(&self, team_id: &str);
}

/// What the account service needs to know about the deployment.
#[derive(Clone)]
pub struct AccountConfig {
    /// Base of the links in mails (`{public_url}/activate?token=…`).
    pub public_url: String,
    /// Base of the OAuth redirects back to the dashboard.
    pub oauth_redirect_url: String,
    pub github: Option<oauth::ProviderConfig>,
    /// `Secure` on session cookies. Only plain-http development away from localhost turns
    /// it off (browsers accept Secure cookies from http://localhost).
    pub secure_cookies: bool,
}

/// Where a request came from (recorded on the sessions it creates).
#[derive(Debug, Clone, Default)]
pub struct ClientMeta {
    pub ip: Option<IpAddr>,
    pub user_agent: String,
}

/// A session just created: the secrets that go into cookies.
#[derive(Debug, Clone)]
pub struct IssuedSession {
    pub secret: String,
    pub csrf: String,
    /// The session's absolute end (the idle window is enforced server-side).
    pub expires_at: DateTime<Utc>,
}

/// A request's authenticated session.
#[derive(Debug, Clone)]
pub struct SessionUser {
    pub session_id: String,
    pub csrf_token: String,
    pub user_id: String,
    pub email: String,
    pub name: String,
    pub is_admin: bool,
    pub team_id: String,
    /// Role in `team_id`; `None` once the user is no longer a member (or the team is gone).
    pub role: Option<Role>,
}

pub struct AccountService {
    store: Store,
    capsules: Arc<dyn TeamCapsules>,
    mailer: Mailer,
    clock: Arc<dyn Clock>,
    config: AccountConfig,
    limits: AuthLimits,
    http: reqwest::Client,
    audit: AuditLog,
}

/// Who a session's user is, as audit entries name them.
pub fn user_actor(s: &SessionUser) -> wrenn_api::EventActor {
    wrenn_api::EventActor {
        kind: "user".into(),
        id: s.user_id.clone(),
        name: s.email.clone(),
    }
}

fn normalize_email(e: &str) -> String {
    e.trim().to_lowercase()
}

fn validate_email(e: &str) -> Result<()> {
    // Whatever is accepted here must be deliverable: the mailer parses it the same way.
    if e.len() <= 254 && e.parse::<lettre::Address>().is_ok() {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{e:?} is not a valid email address"
        )))
    }
}

fn validate_password(p: &str) -> Result<()> {
    if p.len() < MIN_PASSWORD {
        return Err(ApiError::invalid(format!(
            "password must be at least {MIN_PASSWORD} characters"
        )));
    }
    if p.len() > MAX_PASSWORD {
        return Err(ApiError::invalid(format!(
            "password must be at most {MAX_PASSWORD} characters"
        )));
    }
    Ok(())
}

fn validate_name(n: &str) -> Result<String> {
    let n = n.trim();
    let len = n.chars().count();
    if len == 0 || len > 100 {
        return Err(ApiError::invalid("name must be 1 to 100 characters"));
    }
    if n.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "name must not contain control characters",
        ));
    }
    Ok(n.to_string())
}

/// Team names: 1–128 of letters, digits, space, `_`, `-`, `@`, `'` after trimming.
pub fn validate_team_name(n: &str) -> Result<String> {
    let n = n.trim();
    let len = n.chars().count();
    if len == 0 || len > 128 {
        return Err(ApiError::invalid("team name must be 1 to 128 characters"));
    }
    if !n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, ' ' | '_' | '-' | '@' | '\''))
    {
        return Err(ApiError::invalid(
            "team name may contain only letters, digits, spaces and _ - @ '",
        ));
    }
    Ok(n.to_string())
}

/// Team slugs: 6 random bytes as `xxxxxx-yyyyyy`.
pub fn team_slug() -> String {
    let h = random_hex(6);
    format!("{}-{}", &h[..6], &h[6..])
}

fn team(t: &TeamRow) -> Team {
    Team {
        id: t.id.clone(),
        name: t.name.clone(),
        slug: t.slug.clone(),
        created_at: t.created_at,
        byoc: t.byoc,
    }
}

async fn hash_blocking(password: String) -> Result<String> {
    tokio::task::spawn_blocking(move || secrets::hash_password(&password))
        .await
        .map_err(|e| ApiError::internal(format!("password hashing task: {e}")))?
        .map_err(ApiError::internal)
}

async fn verify_blocking(password: String, hash: String) -> bool {
    tokio::task::spawn_blocking(move || secrets::verify_password(&password, &hash))
        .await
        .unwrap_or(false)
}

/// A hash to verify against when the account does not exist, so a login for an unknown email
/// takes as long as one with a wrong password.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| secrets::hash_password("wrenn-dummy-password").unwrap_or_default());

fn rate_limited(e: Exhausted) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        match e {
            Exhausted::Ip => "too many attempts from this address; wait a minute and try again",
            Exhausted::Email => {
                "too many attempts for this email address; wait a minute and try again"
            }
        },
    )
}

impl AccountService {
    pub fn new(
        store: Store,
        capsules: Arc<dyn TeamCapsules>,
        mailer: Mailer,
        clock: Arc<dyn Clock>,
        config: AccountConfig,
        limits: AuthLimits,
    ) -> Self {
        Self {
            audit: AuditLog::new(store.clone()),
            store,
            capsules,
            mailer,
            clock,
            config,
            limits,
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    /// The platform's public base URL (links in mails; the origin browsers load it from).
    pub fn public_url(&self) -> &str {
        &self.config.public_url
    }

    pub fn secure_cookies(&self) -> bool {
        self.config.secure_cookies
    }

    pub fn mailer(&self) -> &Mailer {
        &self.mailer
    }

    fn limit(&self, action: Action, ip: Option<IpAddr>, email: Option<&str>) -> Result<()> {
        self.limits.check(action, ip, email).map_err(rate_limited)
    }
}
