//! Signup, activation and login: the ways a session begins.

use wrenn_api::id::{new_id, prefix};
use wrenn_api::*;

use super::*;

impl AccountService {
    pub async fn signup(&self, req: SignupRequest, meta: &ClientMeta) -> Result<SignupResponse> {
        let email = normalize_email(&req.email);
        self.limit(Action::Signup, meta.ip, Some(&email))?;
        validate_email(&email)?;
        validate_password(&req.password)?;
        let name = validate_name(&req.name)?;
        let now = self.now();
        if let Some(existing) = self.store.user_by_email(&email).await? {
            if existing.status != UserStatus::Inactive {
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
            .insert_user(
                &user_id,
                &email,
                &name,
                Some(&hash),
                UserStatus::Inactive,
                now,
            )
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
        if user.status != UserStatus::Inactive {
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
        match user.status {
            UserStatus::Active => {}
            UserStatus::Inactive => {
                return Err(ApiError::unauthorized(
                    "this account is not activated yet: open the link in the activation email",
                ))
            }
            UserStatus::Disabled => {
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
    pub(super) async fn redeem(&self, token: &str, purpose: &str, retry: &str) -> Result<String> {
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
    pub(super) async fn default_team(&self, user_id: &str) -> Result<String> {
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

    pub(super) fn new_session_secrets(&self) -> (String, String, String) {
        (new_id(prefix::SESSION), random_hex(32), random_hex(32))
    }

    /// Who a session for `user_id` in `team_id` is for; 403 when they are not a member (read
    /// before the session is made, so a refusal leaves no session behind).
    pub(super) async fn session_response(
        &self,
        user_id: &str,
        team_id: &str,
    ) -> Result<SessionResponse> {
        let user = self
            .store
            .user_by_id(user_id)
            .await?
            .ok_or_else(|| ApiError::internal("user vanished"))?;
        let role = self
            .store
            .role_in_team(team_id, user_id)
            .await?
            .ok_or_else(|| ApiError::forbidden("you are not a member of this team"))?;
        Ok(SessionResponse {
            user_id: user.id,
            team_id: team_id.to_string(),
            email: user.email,
            name: user.name,
            role,
            is_admin: user.is_admin,
        })
    }

    pub(super) async fn open_session(
        &self,
        user_id: &str,
        team_id: &str,
        meta: &ClientMeta,
    ) -> Result<(SessionResponse, IssuedSession)> {
        let response = self.session_response(user_id, team_id).await?;
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
            response,
            IssuedSession {
                secret,
                csrf,
                expires_at,
            },
        ))
    }
}
