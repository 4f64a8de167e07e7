//! Accounts: signup and activation, sessions, passwords, profile, teams and members, API keys,
//! OAuth identities and the platform-admin surface. HTTP handlers call [`AccountService`];
//! it validates, applies the rules of the spec and REFERENCE.md, and calls the [`Store`].
//!
//! Invariants:
//! - Secrets (session cookies, activation/reset tokens, API keys) are stored only as SHA-256;
//!   passwords only as argon2id.
//! - Every request re-reads the session, the user's status and admin flag and their role in
//!   the session's team, so a revocation, deactivation, demotion or removal applies to the
//!   very next request.
//! - The clock is injected ([`Clock`]) so expiry rules are tested without waiting.

pub mod limits;
pub mod mail;
pub mod oauth;
pub mod secrets;

use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, Utc};
use wrenn_api::id::{new_id, prefix};
use wrenn_api::*;

use crate::audit::{AuditLog, Record};
use crate::service::CapsuleService;
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

#[async_trait::async_trait]
impl TeamCapsules for CapsuleService {
    async fn destroy_team_capsules(&self, team_id: &str) {
        let capsules = match self.list(team_id).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(team_id, error = %e.message, "cannot list the team's capsules");
                return;
            }
        };
        for c in capsules {
            if let Err(e) = self
                .destroy(
                    team_id,
                    &c.id,
                    &wrenn_api::EventActor::system("team-cleanup"),
                )
                .await
            {
                tracing::warn!(team_id, capsule_id = %c.id, error = %e.message, "destroy with its team failed");
            }
        }
    }
}

/// Where "now" comes from.
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told to (tests).
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn new(t: DateTime<Utc>) -> Self {
        Self(Mutex::new(t))
    }
    pub fn advance(&self, d: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *t += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
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
    pub role: Option<String>,
}

/// A member's standing in a team, in increasing order of rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Member,
    Admin,
    Owner,
}

impl Role {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "member" => Some(Role::Member),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }
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

    pub fn secure_cookies(&self) -> bool {
        self.config.secure_cookies
    }

    pub fn mailer(&self) -> &Mailer {
        &self.mailer
    }

    fn limit(&self, action: Action, ip: Option<IpAddr>, email: Option<&str>) -> Result<()> {
        self.limits.check(action, ip, email).map_err(rate_limited)
    }

    // ---- signup, activation, login -------------------------------------------------------

    pub async fn signup(&self, req: SignupRequest, meta: &ClientMeta) -> Result<SignupResponse> {
        let email = normalize_email(&req.email);
        self.limit(Action::Signup, meta.ip, Some(&email))?;
        validate_email(&email)?;
        validate_password(&req.password)?;
        let name = validate_name(&req.name)?;
        let now = self.now();
        if let Some(existing) = self.store.user_by_email(&email).await? {
            if existing.status != "inactive" {
                return Err(ApiError::new(
                    ErrorCode::EmailTaken,
                    "an account with this email already exists",
                ));
            }
            if now - existing.created_at < ACTIVATION_TTL {
                return Err(ApiError::new(
                    ErrorCode::SignupCooldown,
                    "an activation email was sent to this address less than 30 minutes ago; use it or try again later",
                ));
            }
            // A stale signup that was never activated: start over.
            self.store.delete_inactive_user(&existing.id).await?;
        }
        let hash = hash_blocking(req.password).await?;
        let user_id = new_id(prefix::USER);
        if !self
            .store
            .insert_user(&user_id, &email, &name, Some(&hash), "inactive", now)
            .await?
        {
            return Err(ApiError::new(
                ErrorCode::EmailTaken,
                "an account with this email already exists",
            ));
        }
        let token = random_hex(16);
        self.store
            .put_user_token(
                &sha256_hex(&token),
                &user_id,
                "activation",
                now + ACTIVATION_TTL,
                now,
            )
            .await?;
        let link = format!(
            "{}/activate?token={token}",
            self.config.public_url.trim_end_matches('/')
        );
        let body = format!(
            "Hello {name},\n\nactivate your Wrenn account by opening this link within 30 minutes:\n\n{link}\n\nIf you did not sign up, ignore this mail.\n"
        );
        if let Err(e) = self
            .mailer
            .send(&email, "Activate your Wrenn account", &body)
            .await
        {
            tracing::error!(user_id, error = %e, "activation mail failed");
            // Nothing half-done: without the mail the account could never be activated.
            let _ = self.store.delete_inactive_user(&user_id).await;
            return Err(ApiError::internal(
                "the activation email could not be sent; try again later",
            ));
        }
        tracing::info!(user_id, "account created, activation mail sent");
        Ok(SignupResponse {
            message: format!(
                "Account created. Check {email} for an activation link (valid 30 minutes)."
            ),
        })
    }

    pub async fn activate(
        &self,
        token: &str,
        meta: &ClientMeta,
    ) -> Result<(SessionResponse, IssuedSession)> {
        self.limit(Action::Activate, meta.ip, None)?;
        let token = token.trim();
        if token.is_empty() {
            return Err(ApiError::new(ErrorCode::InvalidToken, "token is required"));
        }
        let now = self.now();
        let user_id = self.redeem(token, "activation", "sign up again").await?;
        let user =
            self.store.user_by_id(&user_id).await?.ok_or_else(|| {
                ApiError::new(ErrorCode::InvalidToken, "invalid activation token")
            })?;
        if user.status != "inactive" {
            return Err(ApiError::new(
                ErrorCode::AlreadyActivated,
                "this account is already active",
            ));
        }
        let team_id = new_id(prefix::TEAM);
        let slug = team_slug();
        let team_name = format!("{}'s Team", user.name);
        let team_name: String = team_name.chars().take(128).collect();
        if !self
            .store
            .activate_user(
                &user.id,
                NewTeam {
                    id: &team_id,
                    name: &team_name,
                    slug: &slug,
                },
                now,
            )
            .await?
        {
            return Err(ApiError::new(
                ErrorCode::AlreadyActivated,
                "this account is already active",
            ));
        }
        tracing::info!(user_id = %user.id, team_id, "account activated");
        self.open_session(&user.id, &team_id, meta).await
    }

    pub async fn login(
        &self,
        req: LoginRequest,
        meta: &ClientMeta,
    ) -> Result<(SessionResponse, IssuedSession)> {
        let email = normalize_email(&req.email);
        self.limit(Action::Login, meta.ip, Some(&email))?;
        let bad = || ApiError::unauthorized("invalid email or password");
        let user = self.store.user_by_email(&email).await?;
        let hash = user
            .as_ref()
            .and_then(|u| u.password_hash.clone())
            .unwrap_or_else(|| DUMMY_HASH.clone());
        let ok = verify_blocking(req.password, hash).await;
        let user = match user {
            Some(u) if ok && u.password_hash.is_some() => u,
            _ => return Err(bad()),
        };
        match user.status.as_str() {
            "active" => {}
            "inactive" => {
                return Err(ApiError::unauthorized(
                    "this account is not activated yet: open the link in the activation email",
                ))
            }
            "disabled" => {
                return Err(ApiError::new(
                    ErrorCode::AccountDeactivated,
                    "this account has been deactivated",
                ))
            }
            _ => return Err(bad()),
        }
        let team = self.default_team(&user.id).await?;
        self.open_session(&user.id, &team, meta).await
    }

    /// Consumes a one-time token (`activation` or `reset`): the user it was issued to, if it
    /// exists and has not expired. `retry` tells the user what to do otherwise.
    async fn redeem(&self, token: &str, purpose: &str, retry: &str) -> Result<String> {
        let invalid = |why: &str| {
            ApiError::new(
                ErrorCode::InvalidToken,
                format!("{purpose} token {why}; {retry}"),
            )
        };
        match self
            .store
            .take_user_token(&sha256_hex(token), purpose)
            .await?
        {
            None => Err(invalid("is invalid or already used")),
            Some((_, expires_at)) if expires_at <= self.now() => Err(invalid("expired")),
            Some((user_id, _)) => Ok(user_id),
        }
    }

    /// The team a new session starts in: the user's oldest team. A user left without any
    /// (every team they were in was deleted) gets a new one of their own, so they can always
    /// sign in.
    async fn default_team(&self, user_id: &str) -> Result<String> {
        if let Some((t, _)) = self.store.teams_of_user(user_id).await?.into_iter().next() {
            return Ok(t.id);
        }
        let user = self.user(user_id).await?;
        let id = new_id(prefix::TEAM);
        let slug = team_slug();
        let name: String = format!("{}'s Team", user.name).chars().take(128).collect();
        self.store
            .create_team(
                NewTeam {
                    id: &id,
                    name: &name,
                    slug: &slug,
                },
                user_id,
                self.now(),
            )
            .await?;
        tracing::info!(user_id, team_id = %id, "user had no team left: created one");
        Ok(id)
    }

    fn new_session_secrets(&self) -> (String, String, String) {
        (new_id(prefix::SESSION), random_hex(32), random_hex(32))
    }

    async fn session_response(&self, user_id: &str, team_id: &str) -> Result<SessionResponse> {
        let user = self
            .store
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| ApiError::internal("user vanished"))?;
        let role = self
            .store
            .role_in_team(team_id, user_id)
            .await?
            .unwrap_or_default();
        Ok(SessionResponse {
            user_id: user.id,
            team_id: team_id.to_string(),
            email: user.email,
            name: user.name,
            role,
            is_admin: user.is_admin,
        })
    }

    async fn open_session(
        &self,
        user_id: &str,
        team_id: &str,
        meta: &ClientMeta,
    ) -> Result<(SessionResponse, IssuedSession)> {
        let now = self.now();
        let (id, secret, csrf) = self.new_session_secrets();
        let expires_at = now + SESSION_MAX;
        let ip = meta.ip.map(|i| i.to_string()).unwrap_or_default();
        let ua: String = meta.user_agent.chars().take(512).collect();
        self.store
            .insert_session(NewSession {
                id: &id,
                token_hash: &sha256_hex(&secret),
                csrf_token: &csrf,
                user_id,
                team_id,
                user_agent: &ua,
                ip_address: &ip,
                created_at: now,
                expires_at,
            })
            .await?;
        tracing::info!(user_id, team_id, session_id = %id, "session opened");
        Ok((
            self.session_response(user_id, team_id).await?,
            IssuedSession {
                secret,
                csrf,
                expires_at,
            },
        ))
    }

    // ---- sessions ------------------------------------------------------------------------

    /// The live session whose cookie secret is `secret`. Expired sessions are deleted; the
    /// user must be active.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<SessionUser>> {
        let now = self.now();
        let Some(SessionContext {
            session,
            user,
            role,
        }) = self.store.session_context(&sha256_hex(secret)).await?
        else {
            return Ok(None);
        };
        if session.expires_at <= now || session.last_seen_at + SESSION_IDLE <= now {
            self.store
                .delete_session(&session.user_id, &session.id)
                .await?;
            return Ok(None);
        }
        if user.status != "active" {
            return Ok(None);
        }
        if now - session.last_seen_at >= SESSION_TOUCH {
            self.store.touch_session(&session.id, now).await?;
        }
        Ok(Some(SessionUser {
            session_id: session.id,
            csrf_token: session.csrf_token,
            user_id: user.id,
            email: user.email,
            name: user.name,
            is_admin: user.is_admin,
            team_id: session.team_id,
            role,
        }))
    }

    pub async fn logout(&self, s: &SessionUser) -> Result<()> {
        self.store.delete_session(&s.user_id, &s.session_id).await?;
        Ok(())
    }

    pub async fn logout_all(&self, s: &SessionUser) -> Result<()> {
        let n = self.store.delete_sessions_of_user(&s.user_id).await?;
        tracing::info!(user_id = %s.user_id, sessions = n, "all sessions revoked");
        Ok(())
    }

    pub async fn sessions(&self, s: &SessionUser) -> Result<SessionList> {
        let now = self.now();
        let rows = self.store.sessions_of_user(&s.user_id).await?;
        Ok(SessionList {
            sessions: rows
                .into_iter()
                .filter(|r| r.expires_at > now && r.last_seen_at + SESSION_IDLE > now)
                .map(|r| SessionInfo {
                    current: r.id == s.session_id,
                    expires_at: r.expires_at.min(r.last_seen_at + SESSION_IDLE),
                    id: r.id,
                    user_agent: r.user_agent,
                    ip_address: r.ip_address,
                    created_at: r.created_at,
                    last_seen_at: r.last_seen_at,
                })
                .collect(),
        })
    }

    pub async fn revoke_session(&self, s: &SessionUser, id: &str) -> Result<()> {
        if self.store.delete_session(&s.user_id, id).await? {
            Ok(())
        } else {
            Err(ApiError::not_found(format!("session {id} not found")))
        }
    }

    /// A new session in `team_id` replaces the current one (membership checked in the DB).
    pub async fn switch_team(
        &self,
        s: &SessionUser,
        team_id: &str,
        meta: &ClientMeta,
    ) -> Result<(SessionResponse, IssuedSession)> {
        if self.store.team(team_id).await?.is_none() {
            return Err(ApiError::not_found(format!("team {team_id} not found")));
        }
        if self
            .store
            .role_in_team(team_id, &s.user_id)
            .await?
            .is_none()
        {
            return Err(ApiError::forbidden("you are not a member of this team"));
        }
        let now = self.now();
        let old = self
            .store
            .sessions_of_user(&s.user_id)
            .await?
            .into_iter()
            .find(|r| r.id == s.session_id)
            .ok_or_else(|| ApiError::unauthorized("session ended"))?;
        let (id, secret, csrf) = self.new_session_secrets();
        let ip = meta
            .ip
            .map(|i| i.to_string())
            .unwrap_or(old.ip_address.clone());
        self.store
            .rotate_session(
                &old.id,
                NewSession {
                    id: &id,
                    token_hash: &sha256_hex(&secret),
                    csrf_token: &csrf,
                    user_id: &s.user_id,
                    team_id,
                    user_agent: &old.user_agent,
                    ip_address: &ip,
                    // The absolute lifetime runs from the login, not from the switch.
                    created_at: old.created_at,
                    expires_at: old.expires_at,
                },
                now,
            )
            .await?;
        Ok((
            self.session_response(&s.user_id, team_id).await?,
            IssuedSession {
                secret,
                csrf,
                expires_at: old.expires_at,
            },
        ))
    }

    // ---- me ------------------------------------------------------------------------------

    async fn user(&self, id: &str) -> Result<UserRow> {
        self.store
            .user_by_id(id)
            .await?
            .ok_or_else(|| ApiError::unauthorized("account not found"))
    }

    pub async fn me(&self, s: &SessionUser) -> Result<MeResponse> {
        let u = self.user(&s.user_id).await?;
        Ok(MeResponse {
            user_id: u.id.clone(),
            name: u.name,
            email: u.email,
            has_password: u.password_hash.is_some(),
            providers: self.store.providers_of(&u.id).await?,
            is_admin: u.is_admin,
            team_id: s.team_id.clone(),
        })
    }

    pub async fn rename_me(&self, s: &SessionUser, name: &str) -> Result<()> {
        let name = validate_name(name)?;
        self.store.set_user_name(&s.user_id, &name).await?;
        Ok(())
    }

    /// Soft-deletes the account. Teams the user owns alone are deleted with it (capsules
    /// destroyed); owning a team with other members blocks the deletion.
    pub async fn delete_me(&self, s: &SessionUser, confirmation: &str) -> Result<()> {
        let u = self.user(&s.user_id).await?;
        if normalize_email(confirmation) != u.email {
            return Err(ApiError::invalid("confirmation must be your email address"));
        }
        let owned = self.store.owned_teams(&u.id).await?;
        if owned.iter().any(|t| t.others > 0) {
            return Err(ApiError::new(
                ErrorCode::OwnsTeamWithMembers,
                "you own a team with other members: remove them or delete the team first",
            ));
        }
        let teams: Vec<String> = owned.into_iter().map(|t| t.team_id).collect();
        for t in &teams {
            self.destroy_team_capsules(t).await;
        }
        self.store
            .soft_delete_user(&u.id, &teams, self.now())
            .await?;
        tracing::info!(user_id = %u.id, teams = teams.len(), "account deleted (purged after 15 days)");
        Ok(())
    }

    /// Purges accounts deleted more than [`PURGE_AFTER`] ago; returns how many.
    pub async fn purge_deleted(&self) -> Result<usize> {
        let ids = self
            .store
            .purge_deleted_users(self.now() - PURGE_AFTER)
            .await?;
        Ok(ids.len())
    }

    /// Housekeeping: expired sessions and rate-limit memory.
    pub async fn prune(&self) -> Result<u64> {
        self.limits.prune();
        let now = self.now();
        Ok(self
            .store
            .delete_expired_sessions(now, now - SESSION_IDLE)
            .await?)
    }

    // ---- passwords -----------------------------------------------------------------------

    pub async fn change_password(&self, s: &SessionUser, req: ChangePasswordRequest) -> Result<()> {
        let u = self.user(&s.user_id).await?;
        validate_password(&req.new_password)?;
        match &u.password_hash {
            Some(hash) => {
                let Some(current) = req.current_password else {
                    return Err(ApiError::invalid("current_password is required"));
                };
                if !verify_blocking(current, hash.clone()).await {
                    return Err(ApiError::new(
                        ErrorCode::WrongPassword,
                        "current password is incorrect",
                    ));
                }
            }
            None => {
                // Adding a first password to an OAuth-only account.
                if req.confirm_password.as_deref() != Some(req.new_password.as_str()) {
                    return Err(ApiError::invalid(
                        "confirm_password must match new_password",
                    ));
                }
            }
        }
        let hash = hash_blocking(req.new_password).await?;
        self.store.set_password_and_revoke(&u.id, &hash).await?;
        tracing::info!(user_id = %u.id, "password changed; every session revoked");
        Ok(())
    }

    /// Always succeeds (no account enumeration); mails only active accounts.
    pub async fn request_reset(&self, email: &str, meta: &ClientMeta) -> Result<()> {
        let email = normalize_email(email);
        self.limit(Action::Reset, meta.ip, Some(&email))?;
        let Some(u) = self.store.user_by_email(&email).await? else {
            return Ok(());
        };
        if u.status != "active" {
            return Ok(());
        }
        let now = self.now();
        let token = random_hex(16);
        self.store
            .put_user_token(&sha256_hex(&token), &u.id, "reset", now + RESET_TTL, now)
            .await?;
        let link = format!(
            "{}/reset-password?token={token}",
            self.config.public_url.trim_end_matches('/')
        );
        let body = format!(
            "Hello {},\n\nreset your Wrenn password by opening this link within 15 minutes:\n\n{link}\n\nIf you did not ask for this, ignore this mail: your password stays as it is.\n",
            u.name
        );
        if let Err(e) = self
            .mailer
            .send(&email, "Reset your Wrenn password", &body)
            .await
        {
            tracing::error!(user_id = %u.id, error = %e, "reset mail failed");
        }
        Ok(())
    }

    pub async fn confirm_reset(&self, req: ResetConfirmRequest, meta: &ClientMeta) -> Result<()> {
        self.limit(Action::Reset, meta.ip, None)?;
        validate_password(&req.new_password)?;
        let user_id = self
            .redeem(req.token.trim(), "reset", "ask for a new one")
            .await?;
        let u = self.user(&user_id).await?;
        if u.status != "active" {
            return Err(ApiError::new(
                ErrorCode::InvalidToken,
                "this account cannot be reset",
            ));
        }
        let hash = hash_blocking(req.new_password).await?;
        self.store.set_password_and_revoke(&u.id, &hash).await?;
        tracing::info!(user_id = %u.id, "password reset; every session revoked");
        Ok(())
    }

    // ---- API keys ------------------------------------------------------------------------

    fn team_role(&self, s: &SessionUser) -> Result<Role> {
        s.role.as_deref().and_then(Role::parse).ok_or_else(|| {
            ApiError::forbidden("you are no longer a member of this session's team: switch team")
        })
    }

    pub async fn create_api_key(
        &self,
        s: &SessionUser,
        req: CreateApiKeyRequest,
    ) -> Result<ApiKeyResponse> {
        self.team_role(s)?;
        let name = req.name.as_deref().map(str::trim).unwrap_or("");
        let name = if name.is_empty() {
            "Unnamed API Key"
        } else {
            name
        };
        if name.chars().count() > 100 || name.chars().any(char::is_control) {
            return Err(ApiError::invalid(
                "key name must be at most 100 printable characters",
            ));
        }
        let key = crate::auth::new_api_key();
        let id = new_id(prefix::API_KEY);
        let prefix = crate::auth::key_prefix(&key);
        self.store
            .create_api_key(
                &id,
                &s.team_id,
                name,
                &crate::auth::hash_api_key(&key),
                &prefix,
                Some(&s.user_id),
            )
            .await?;
        tracing::info!(team_id = %s.team_id, key_id = %id, "API key created");
        self.audit
            .record(
                Record::new(&user_actor(s), "api_key", &id, "create")
                    .team(Some(&s.team_id))
                    .meta("name", name)
                    .meta("key_prefix", prefix.as_str()),
            )
            .await;
        Ok(ApiKeyResponse {
            id,
            team_id: s.team_id.clone(),
            name: name.to_string(),
            key_prefix: prefix,
            created_at: self.now(),
            last_used: None,
            key: Some(key),
        })
    }

    pub async fn list_api_keys(&self, s: &SessionUser) -> Result<Vec<ApiKeyResponse>> {
        self.team_role(s)?;
        Ok(self
            .store
            .api_keys(&s.team_id)
            .await?
            .into_iter()
            .map(|k| ApiKeyResponse {
                id: k.id,
                team_id: k.team_id,
                name: k.name,
                key_prefix: k.key_prefix,
                created_at: k.created_at,
                last_used: k.last_used_at,
                key: None,
            })
            .collect())
    }

    pub async fn delete_api_key(&self, s: &SessionUser, id: &str) -> Result<()> {
        self.team_role(s)?;
        if self.store.delete_api_key(&s.team_id, id).await? {
            tracing::info!(team_id = %s.team_id, key_id = id, "API key deleted");
            self.audit
                .record(Record::new(&user_actor(s), "api_key", id, "revoke").team(Some(&s.team_id)))
                .await;
            Ok(())
        } else {
            Err(ApiError::not_found(format!("API key {id} not found")))
        }
    }

    // ---- users search --------------------------------------------------------------------

    pub async fn search_users(
        &self,
        s: &SessionUser,
        prefix: &str,
    ) -> Result<Vec<UserSearchResult>> {
        self.team_role(s)?;
        let prefix = normalize_email(prefix);
        if !prefix.contains('@') {
            return Err(ApiError::invalid(
                "the email prefix must contain \"@\" (for example alice@)",
            ));
        }
        Ok(self
            .store
            .search_users(&prefix, 10)
            .await?
            .into_iter()
            .map(|(user_id, email)| UserSearchResult { user_id, email })
            .collect())
    }

    // ---- teams ---------------------------------------------------------------------------

    pub async fn list_teams(&self, s: &SessionUser) -> Result<Vec<TeamWithRole>> {
        Ok(self
            .store
            .teams_of_user(&s.user_id)
            .await?
            .iter()
            .map(|(t, role)| TeamWithRole {
                team: team(t),
                role: role.clone(),
            })
            .collect())
    }

    pub async fn create_team(&self, s: &SessionUser, name: &str) -> Result<TeamWithRole> {
        let name = validate_team_name(name)?;
        let id = new_id(prefix::TEAM);
        let slug = team_slug();
        self.store
            .create_team(
                NewTeam {
                    id: &id,
                    name: &name,
                    slug: &slug,
                },
                &s.user_id,
                self.now(),
            )
            .await?;
        let t = self
            .store
            .team(&id)
            .await?
            .ok_or_else(|| ApiError::internal("team vanished"))?;
        tracing::info!(team_id = %id, user_id = %s.user_id, "team created");
        self.audit
            .record(
                Record::new(&user_actor(s), "team", &id, "create")
                    .team(Some(&id))
                    .meta("name", name.as_str()),
            )
            .await;
        Ok(TeamWithRole {
            team: team(&t),
            role: "owner".into(),
        })
    }

    /// The team and the caller's role in it; 404 for teams that do not exist and for teams
    /// the caller is not in (no probing of other teams' ids).
    async fn membership(&self, s: &SessionUser, team_id: &str) -> Result<(TeamRow, Role)> {
        let not_found = || ApiError::not_found(format!("team {team_id} not found"));
        let t = self.store.team(team_id).await?.ok_or_else(not_found)?;
        let role = self
            .store
            .role_in_team(team_id, &s.user_id)
            .await?
            .as_deref()
            .and_then(Role::parse)
            .ok_or_else(not_found)?;
        Ok((t, role))
    }

    pub async fn get_team(&self, s: &SessionUser, team_id: &str) -> Result<TeamDetail> {
        let (t, _) = self.membership(s, team_id).await?;
        Ok(TeamDetail {
            team: team(&t),
            members: self.members_of(team_id).await?,
        })
    }

    async fn members_of(&self, team_id: &str) -> Result<Vec<TeamMember>> {
        Ok(self
            .store
            .members(team_id)
            .await?
            .into_iter()
            .map(|m| TeamMember {
                user_id: m.user_id,
                email: m.email,
                name: m.name,
                role: m.role,
                joined_at: m.joined_at,
            })
            .collect())
    }

    pub async fn team_members(&self, s: &SessionUser, team_id: &str) -> Result<Vec<TeamMember>> {
        self.membership(s, team_id).await?;
        self.members_of(team_id).await
    }

    pub async fn rename_team(&self, s: &SessionUser, team_id: &str, name: &str) -> Result<()> {
        let (_, role) = self.membership(s, team_id).await?;
        if role < Role::Admin {
            return Err(ApiError::forbidden(
                "only the team's owner or admins can rename it",
            ));
        }
        let name = validate_team_name(name)?;
        self.store.rename_team(team_id, &name).await?;
        self.audit
            .record(
                Record::new(&user_actor(s), "team", team_id, "rename")
                    .team(Some(team_id))
                    .meta("name", name.as_str()),
            )
            .await;
        Ok(())
    }

    pub async fn delete_team(&self, s: &SessionUser, team_id: &str) -> Result<()> {
        let (_, role) = self.membership(s, team_id).await?;
        if role != Role::Owner {
            return Err(ApiError::forbidden("only the team's owner can delete it"));
        }
        self.delete_team_now(team_id).await?;
        self.audit
            .record(Record::new(&user_actor(s), "team", team_id, "delete").team(Some(team_id)))
            .await;
        Ok(())
    }

    async fn delete_team_now(&self, team_id: &str) -> Result<()> {
        self.destroy_team_capsules(team_id).await;
        if !self.store.soft_delete_team(team_id, self.now()).await? {
            return Err(ApiError::not_found(format!("team {team_id} not found")));
        }
        tracing::info!(team_id, "team deleted");
        Ok(())
    }

    async fn destroy_team_capsules(&self, team_id: &str) {
        self.capsules.destroy_team_capsules(team_id).await;
    }

    pub async fn add_member(
        &self,
        s: &SessionUser,
        team_id: &str,
        email: &str,
    ) -> Result<TeamMember> {
        let (_, role) = self.membership(s, team_id).await?;
        if role < Role::Admin {
            return Err(ApiError::forbidden(
                "only the team's owner or admins can add members",
            ));
        }
        let email = normalize_email(email);
        let user = match self.store.user_by_email(&email).await? {
            Some(u) if u.status == "active" => u,
            _ => {
                return Err(ApiError::not_found(format!(
                    "no active account with email {email}"
                )))
            }
        };
        let now = self.now();
        if !self
            .store
            .add_member(team_id, &user.id, "member", now)
            .await?
        {
            return Err(ApiError::invalid(format!(
                "{email} is already a member of this team"
            )));
        }
        tracing::info!(team_id, user_id = %user.id, "member added");
        self.audit
            .record(
                Record::new(&user_actor(s), "member", &user.id, "add")
                    .team(Some(team_id))
                    .meta("email", user.email.as_str()),
            )
            .await;
        Ok(TeamMember {
            user_id: user.id,
            email: user.email,
            name: user.name,
            role: "member".into(),
            joined_at: now,
        })
    }

    pub async fn set_member_role(
        &self,
        s: &SessionUser,
        team_id: &str,
        uid: &str,
        role: &str,
    ) -> Result<()> {
        let (_, my_role) = self.membership(s, team_id).await?;
        if my_role < Role::Admin {
            return Err(ApiError::forbidden(
                "only the team's owner or admins can change roles",
            ));
        }
        if !matches!(role, "admin" | "member") {
            return Err(ApiError::invalid("role must be admin or member"));
        }
        match self.store.role_in_team(team_id, uid).await?.as_deref() {
            None => Err(ApiError::not_found(format!(
                "{uid} is not a member of this team"
            ))),
            Some("owner") => Err(ApiError::forbidden("the owner's role cannot be changed")),
            Some(_) => {
                self.store.set_member_role(team_id, uid, role).await?;
                self.audit
                    .record(
                        Record::new(&user_actor(s), "member", uid, "role_update")
                            .team(Some(team_id))
                            .meta("role", role),
                    )
                    .await;
                Ok(())
            }
        }
    }

    pub async fn remove_member(&self, s: &SessionUser, team_id: &str, uid: &str) -> Result<()> {
        let (_, my_role) = self.membership(s, team_id).await?;
        if my_role < Role::Admin {
            return Err(ApiError::forbidden(
                "only the team's owner or admins can remove members",
            ));
        }
        match self.store.role_in_team(team_id, uid).await?.as_deref() {
            None => Err(ApiError::not_found(format!(
                "{uid} is not a member of this team"
            ))),
            Some("owner") => Err(ApiError::forbidden("the owner cannot be removed")),
            Some(_) => {
                self.store.remove_member(team_id, uid).await?;
                tracing::info!(team_id, user_id = uid, "member removed");
                self.audit
                    .record(
                        Record::new(&user_actor(s), "member", uid, "remove").team(Some(team_id)),
                    )
                    .await;
                Ok(())
            }
        }
    }

    pub async fn leave_team(&self, s: &SessionUser, team_id: &str) -> Result<()> {
        let (_, role) = self.membership(s, team_id).await?;
        if role == Role::Owner {
            return Err(ApiError::forbidden(
                "the owner cannot leave the team: delete it instead",
            ));
        }
        self.store.remove_member(team_id, &s.user_id).await?;
        self.audit
            .record(Record::new(&user_actor(s), "member", &s.user_id, "leave").team(Some(team_id)))
            .await;
        Ok(())
    }

    // ---- platform admin ------------------------------------------------------------------

    pub async fn admin_users(&self) -> Result<Vec<AdminUser>> {
        Ok(self
            .store
            .list_users()
            .await?
            .into_iter()
            .map(|(u, teams)| AdminUser {
                id: u.id,
                email: u.email,
                name: u.name,
                status: u.status,
                is_admin: u.is_admin,
                created_at: u.created_at,
                teams,
            })
            .collect())
    }

    pub async fn admin_set_active(&self, s: &SessionUser, uid: &str, active: bool) -> Result<()> {
        let u = self
            .store
            .user_by_id(uid)
            .await?
            .filter(|u| u.status != "deleted")
            .ok_or_else(|| ApiError::not_found(format!("user {uid} not found")))?;
        if active {
            match u.status.as_str() {
                "active" => Ok(()),
                "disabled" => {
                    self.store.enable_user(uid).await?;
                    tracing::info!(user_id = uid, "user reactivated");
                    self.audit_user(s, uid, "activate").await;
                    Ok(())
                }
                _ => Err(ApiError::invalid(
                    "this account was never activated by its owner",
                )),
            }
        } else {
            if uid == s.user_id {
                return Err(ApiError::invalid("you cannot deactivate yourself"));
            }
            if u.status != "active" {
                return Ok(());
            }
            if u.is_admin && self.store.count_active_admins().await? <= 1 {
                return Err(ApiError::invalid(
                    "the last platform admin cannot be deactivated",
                ));
            }
            for t in self.store.owned_teams(uid).await? {
                self.destroy_team_capsules(&t.team_id).await;
            }
            self.store.disable_user(uid).await?;
            tracing::info!(
                user_id = uid,
                "user deactivated: sessions and API keys revoked"
            );
            self.audit_user(s, uid, "deactivate").await;
            Ok(())
        }
    }

    pub async fn admin_set_admin(&self, s: &SessionUser, uid: &str, admin: bool) -> Result<()> {
        let u = self
            .store
            .user_by_id(uid)
            .await?
            .filter(|u| u.status != "deleted")
            .ok_or_else(|| ApiError::not_found(format!("user {uid} not found")))?;
        if admin {
            if u.status != "active" {
                return Err(ApiError::invalid(
                    "only active users can be platform admins",
                ));
            }
            self.store.set_user_admin(uid, true).await?;
        } else if u.is_admin && !self.store.revoke_admin_unless_last(uid).await? {
            return Err(ApiError::invalid(
                "the last platform admin cannot lose admin rights",
            ));
        }
        tracing::info!(user_id = uid, admin, "platform admin flag set");
        self.audit_user(s, uid, if admin { "grant_admin" } else { "revoke_admin" })
            .await;
        Ok(())
    }

    pub async fn admin_teams(&self) -> Result<Vec<AdminTeam>> {
        Ok(self
            .store
            .list_teams()
            .await?
            .into_iter()
            .map(|t| AdminTeam {
                team: team(&t.team),
                members: t.members,
                owner_email: t.owner_email,
                capsules: t.capsules,
            })
            .collect())
    }

    pub async fn admin_delete_team(&self, s: &SessionUser, team_id: &str) -> Result<()> {
        if self.store.team(team_id).await?.is_none() {
            return Err(ApiError::not_found(format!("team {team_id} not found")));
        }
        self.delete_team_now(team_id).await?;
        self.audit
            .record(
                Record::new(&user_actor(s), "team", team_id, "delete")
                    .team(Some(team_id))
                    .admin(),
            )
            .await;
        Ok(())
    }

    pub async fn admin_set_byoc(&self, s: &SessionUser, team_id: &str, byoc: bool) -> Result<()> {
        let t = self
            .store
            .team(team_id)
            .await?
            .ok_or_else(|| ApiError::not_found(format!("team {team_id} not found")))?;
        if t.byoc && !byoc {
            return Err(ApiError::invalid(
                "BYOC cannot be switched off once enabled",
            ));
        }
        self.store.set_team_byoc(team_id, byoc).await?;
        if byoc != t.byoc {
            self.audit
                .record(
                    Record::new(&user_actor(s), "team", team_id, "set_byoc")
                        .team(Some(team_id))
                        .admin()
                        .meta("byoc", byoc),
                )
                .await;
        }
        Ok(())
    }

    /// An admin action on a user: one platform entry, and one admin-scope entry in each team
    /// the user belongs to (so the team's owners and admins see it).
    async fn audit_user(&self, s: &SessionUser, uid: &str, action: &str) {
        let r = Record::new(&user_actor(s), "user", uid, action).admin();
        let teams: Vec<String> = match self.store.teams_of_user(uid).await {
            Ok(t) => t.into_iter().map(|(t, _)| t.id).collect(),
            Err(_) => vec![],
        };
        if teams.is_empty() {
            return self.audit.record(r).await;
        }
        for t in teams {
            self.audit.record(r.clone().team(Some(&t))).await;
        }
    }
}
