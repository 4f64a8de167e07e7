//! The signed-in user's own account: profile, deletion, passwords.

use wrenn_api::*;

use super::*;

impl AccountService {
    pub(super) async fn user(&self, id: &str) -> Result<UserRow> {
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
        if u.status != UserStatus::Active {
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
        if u.status != UserStatus::Active {
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
}
