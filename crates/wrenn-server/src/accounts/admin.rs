//! The platform-admin surface: users, teams, BYOC.

use wrenn_api::*;

use super::*;

impl AccountService {
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
            .filter(|u| u.status != UserStatus::Deleted)
            .ok_or_else(|| ApiError::not_found(format!("user {uid} not found")))?;
        if active {
            match u.status {
                UserStatus::Active => Ok(()),
                UserStatus::Disabled => {
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
            if u.status != UserStatus::Active {
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
            .filter(|u| u.status != UserStatus::Deleted)
            .ok_or_else(|| ApiError::not_found(format!("user {uid} not found")))?;
        if admin {
            if u.status != UserStatus::Active {
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
    pub(super) async fn audit_user(&self, s: &SessionUser, uid: &str, action: &str) {
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
