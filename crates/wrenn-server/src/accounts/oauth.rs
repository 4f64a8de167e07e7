//! GitHub OAuth (authorization-code flow): login or signup, and connecting the provider to a
//! signed-in account. The provider's three endpoints come from configuration, so a test (or a
//! GitHub Enterprise installation) points them elsewhere.
//!
//! The state travels in a short-lived cookie and is also remembered server-side (hashed, in
//! the database, so any replica can finish the flow) with what the flow is for: the session
//! cookie is `SameSite=Strict`, so the browser does not send it on the provider's redirect
//! back, and "connect" must know the user another way.

use chrono::Duration;
use serde::Deserialize;
use wrenn_api::id::{new_id, prefix};
use wrenn_api::{ApiError, ErrorCode, SessionResponse, UserStatus};

use super::secrets::{random_hex, sha256_hex};
use super::{team_slug, AccountService, ClientMeta, IssuedSession, SessionUser};
use crate::store::{NewTeam, OAuthUser};

/// How long a started flow may take.
pub const STATE_TTL: Duration = Duration::minutes(10);

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub client_id: String,
    pub client_secret: String,
    /// e.g. `https://github.com/login/oauth/authorize`
    pub authorize_url: String,
    /// e.g. `https://github.com/login/oauth/access_token`
    pub token_url: String,
    /// e.g. `https://api.github.com`
    pub api_url: String,
}

impl ProviderConfig {
    pub fn github(
        client_id: String,
        client_secret: String,
        web_base: &str,
        api_base: &str,
    ) -> Self {
        let web = web_base.trim_end_matches('/');
        Self {
            client_id,
            client_secret,
            authorize_url: format!("{web}/login/oauth/authorize"),
            token_url: format!("{web}/login/oauth/access_token"),
            api_url: api_base.trim_end_matches('/').to_string(),
        }
    }
}

/// What a started flow is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Purpose {
    Login,
    Connect { user_id: String },
}

/// A started flow: where to send the browser and the state for its cookie.
pub struct Started {
    pub auth_url: String,
    pub state: String,
}

/// How a callback ended: a session for the browser, or an error code for the dashboard.
pub enum Finished {
    Session(Box<(SessionResponse, IssuedSession)>),
    Connected,
    Failed(&'static str),
}

#[derive(Deserialize)]
struct TokenAnswer {
    access_token: Option<String>,
}

#[derive(Deserialize)]
struct GithubUser {
    id: i64,
    login: String,
    name: Option<String>,
    email: Option<String>,
}

#[derive(Deserialize)]
struct GithubEmail {
    email: String,
    primary: bool,
    verified: bool,
}

struct Identity {
    id: String,
    email: String,
    name: String,
}

impl AccountService {
    /// The configuration of provider `name`; 404 `provider_not_found` when it is not set up.
    pub fn oauth_provider(&self, name: &str) -> Result<&ProviderConfig, ApiError> {
        self.provider(name)
    }

    fn provider(&self, name: &str) -> Result<&ProviderConfig, ApiError> {
        match (name, &self.config.github) {
            ("github", Some(cfg)) => Ok(cfg),
            _ => Err(ApiError::new(
                ErrorCode::ProviderNotFound,
                format!("OAuth provider {name:?} is not configured on this installation"),
            )),
        }
    }

    /// Where the provider sends the browser back.
    pub fn oauth_callback_url(&self, provider: &str) -> String {
        format!(
            "{}/auth/oauth/{provider}/callback",
            self.config.public_url.trim_end_matches('/')
        )
    }

    /// Where the dashboard receives the outcome of a flow.
    pub fn oauth_return_url(&self, provider: &str, error: Option<&str>) -> String {
        let base = format!(
            "{}/auth/{provider}/callback",
            self.config.oauth_redirect_url.trim_end_matches('/')
        );
        match error {
            Some(e) => format!("{base}?error={e}"),
            None => base,
        }
    }

    /// Starts a flow. It is recorded in the database (by SHA-256 of its state), so the
    /// callback may reach any replica; the state also goes into the browser's cookie.
    async fn start(&self, provider: &str, purpose: Purpose) -> Result<Started, ApiError> {
        let cfg = self.provider(provider)?;
        let state = random_hex(16);
        let now = self.now();
        let user_id = match &purpose {
            Purpose::Login => None,
            Purpose::Connect { user_id } => Some(user_id.as_str()),
        };
        self.store
            .put_oauth_flow(&sha256_hex(&state), provider, user_id, now + STATE_TTL, now)
            .await?;
        let mut url = reqwest::Url::parse(&cfg.authorize_url)
            .map_err(|e| ApiError::internal(format!("bad authorize URL in configuration: {e}")))?;
        url.query_pairs_mut()
            .append_pair("client_id", &cfg.client_id)
            .append_pair("redirect_uri", &self.oauth_callback_url(provider))
            .append_pair("scope", "read:user user:email")
            .append_pair("state", &state);
        Ok(Started {
            auth_url: url.into(),
            state,
        })
    }

    pub async fn oauth_login_start(&self, provider: &str) -> Result<Started, ApiError> {
        self.start(provider, Purpose::Login).await
    }

    pub async fn oauth_connect_start(
        &self,
        s: &SessionUser,
        provider: &str,
    ) -> Result<Started, ApiError> {
        self.start(
            provider,
            Purpose::Connect {
                user_id: s.user_id.clone(),
            },
        )
        .await
    }

    /// Finishes a flow. `cookie_state` is the state cookie the browser sent back.
    pub async fn oauth_finish(
        &self,
        provider: &str,
        code: Option<&str>,
        state: Option<&str>,
        provider_error: Option<&str>,
        cookie_state: Option<&str>,
        meta: &ClientMeta,
    ) -> Finished {
        let now = self.now();
        let Ok(cfg) = self.provider(provider) else {
            return Finished::Failed("internal_error");
        };
        // The state must match the cookie and a flow this server started (single use).
        let pending = match (state, cookie_state) {
            (Some(s), Some(c)) if !s.is_empty() && super::secrets::constant_time_eq(s, c) => {
                match self.store.take_oauth_flow(&sha256_hex(s), provider).await {
                    Ok(Some((user_id, expires_at))) if expires_at > now => Some(match user_id {
                        None => Purpose::Login,
                        Some(user_id) => Purpose::Connect { user_id },
                    }),
                    Ok(_) => None,
                    Err(e) => {
                        tracing::warn!(error = %e, "OAuth flow lookup failed");
                        return Finished::Failed("internal_error");
                    }
                }
            }
            _ => None,
        };
        if provider_error.is_some() {
            return Finished::Failed("access_denied");
        }
        let Some(pending) = pending else {
            return Finished::Failed("invalid_state");
        };
        let Some(code) = code.filter(|c| !c.is_empty()) else {
            return Finished::Failed("missing_code");
        };
        let identity = match self.exchange(cfg, provider, code).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(provider, error = %e, "OAuth exchange failed");
                return Finished::Failed("exchange_failed");
            }
        };
        match self.complete(provider, identity, pending, meta).await {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(provider, error = %e, "OAuth completion failed");
                Finished::Failed("internal_error")
            }
        }
    }

    async fn exchange(
        &self,
        cfg: &ProviderConfig,
        provider: &str,
        code: &str,
    ) -> Result<Identity, String> {
        let token: TokenAnswer = self
            .http
            .post(&cfg.token_url)
            .header("Accept", "application/json")
            .form(&[
                ("client_id", cfg.client_id.as_str()),
                ("client_secret", cfg.client_secret.as_str()),
                ("code", code),
                ("redirect_uri", &self.oauth_callback_url(provider)),
            ])
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("token request: {e}"))?
            .json()
            .await
            .map_err(|e| format!("token answer: {e}"))?;
        let access = token
            .access_token
            .ok_or("no access_token in the token answer")?;
        let api = cfg.api_url.trim_end_matches('/');
        let get = |path: String| {
            self.http
                .get(format!("{api}{path}"))
                .header("Accept", "application/vnd.github+json")
                .header("User-Agent", "wrenn")
                .bearer_auth(&access)
                .send()
        };
        let user: GithubUser = get("/user".into())
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("user request: {e}"))?
            .json()
            .await
            .map_err(|e| format!("user answer: {e}"))?;
        let email = match user.email.filter(|e| !e.is_empty()) {
            Some(e) => e,
            None => {
                let emails: Vec<GithubEmail> = get("/user/emails".into())
                    .await
                    .and_then(|r| r.error_for_status())
                    .map_err(|e| format!("emails request: {e}"))?
                    .json()
                    .await
                    .map_err(|e| format!("emails answer: {e}"))?;
                emails
                    .into_iter()
                    .find(|e| e.primary && e.verified)
                    .map(|e| e.email)
                    .ok_or("the GitHub account has no verified primary email")?
            }
        };
        let name = user
            .name
            .filter(|n| !n.trim().is_empty())
            .unwrap_or(user.login);
        Ok(Identity {
            id: user.id.to_string(),
            email: email.trim().to_lowercase(),
            name: name.trim().chars().take(100).collect(),
        })
    }

    async fn complete(
        &self,
        provider: &str,
        who: Identity,
        purpose: Purpose,
        meta: &ClientMeta,
    ) -> Result<Finished, ApiError> {
        let now = self.now();
        let linked = self.store.oauth_user(provider, &who.id).await?;
        match purpose {
            Purpose::Connect { user_id } => {
                match linked {
                    Some(owner) if owner == user_id => return Ok(Finished::Connected),
                    Some(_) => return Ok(Finished::Failed("already_linked")),
                    None => {}
                }
                if !self
                    .store
                    .providers_of(&user_id)
                    .await?
                    .iter()
                    .any(|p| p == provider)
                {
                    self.store
                        .link_oauth(provider, &who.id, &user_id, &who.email, now)
                        .await?;
                    tracing::info!(user_id, provider, "OAuth identity connected");
                    Ok(Finished::Connected)
                } else {
                    // One identity per provider per account.
                    Ok(Finished::Failed("already_linked"))
                }
            }
            Purpose::Login => {
                if let Some(user_id) = linked {
                    let user = self.store.user_by_id(&user_id).await?;
                    return match user {
                        Some(u) if u.status == UserStatus::Active => {
                            let team = self.default_team(&u.id).await?;
                            Ok(Finished::Session(Box::new(
                                self.open_session(&u.id, &team, meta).await?,
                            )))
                        }
                        _ => Ok(Finished::Failed("access_denied")),
                    };
                }
                if self.store.user_by_email(&who.email).await?.is_some() {
                    // Linking by email alone would let whoever controls the provider account
                    // take over an existing account: the owner connects it from settings.
                    return Ok(Finished::Failed("email_taken"));
                }
                let user_id = new_id(prefix::USER);
                let team_id = new_id(prefix::TEAM);
                let slug = team_slug();
                let name = if who.name.is_empty() {
                    who.email.clone()
                } else {
                    who.name.clone()
                };
                let team_name: String = format!("{name}'s Team").chars().take(128).collect();
                if !self
                    .store
                    .create_oauth_user(
                        OAuthUser {
                            user_id: &user_id,
                            email: &who.email,
                            name: &name,
                            provider,
                            provider_user_id: &who.id,
                        },
                        NewTeam {
                            id: &team_id,
                            name: &team_name,
                            slug: &slug,
                        },
                        now,
                    )
                    .await?
                {
                    return Ok(Finished::Failed("email_taken"));
                }
                tracing::info!(user_id, provider, "account created from OAuth");
                Ok(Finished::Session(Box::new(
                    self.open_session(&user_id, &team_id, meta).await?,
                )))
            }
        }
    }

    /// Unlinks a provider from the account, unless it is the last way to sign in.
    pub async fn disconnect_provider(
        &self,
        s: &SessionUser,
        provider: &str,
    ) -> Result<(), ApiError> {
        if provider != "github" {
            return Err(ApiError::new(
                ErrorCode::ProviderNotFound,
                format!("unknown OAuth provider {provider:?}"),
            ));
        }
        let user = self.user(&s.user_id).await?;
        let providers = self.store.providers_of(&s.user_id).await?;
        if !providers.iter().any(|p| p == provider) {
            return Err(ApiError::new(
                ErrorCode::ProviderNotFound,
                format!("{provider} is not connected to this account"),
            ));
        }
        if user.password_hash.is_none() && providers.len() == 1 {
            return Err(ApiError::new(
                ErrorCode::LastLoginMethod,
                "this is your only way to sign in: set a password first",
            ));
        }
        self.store.unlink_oauth(&s.user_id, provider).await?;
        Ok(())
    }
}
