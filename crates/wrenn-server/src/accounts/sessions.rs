//! Sessions: who a cookie belongs to, listing and revoking them, switching team.

use wrenn_api::*;

use super::*;

impl AccountService {
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
        if user.status != UserStatus::Active {
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
        let response = self.session_response(&s.user_id, team_id).await?;
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
            response,
            IssuedSession {
                secret,
                csrf,
                expires_at: old.expires_at,
            },
        ))
    }
}
