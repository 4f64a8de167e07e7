//! Teams, members and roles; user search.

use wrenn_api::id::{new_id, prefix};
use wrenn_api::*;

use super::*;

impl AccountService {
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
                role: *role,
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
            role: Role::Owner,
        })
    }

    /// The team and the caller's role in it; 404 for teams that do not exist and for teams
    /// the caller is not in (no probing of other teams' ids).
    pub(super) async fn membership(
        &self,
        s: &SessionUser,
        team_id: &str,
    ) -> Result<(TeamRow, Role)> {
        let not_found = || ApiError::not_found(format!("team {team_id} not found"));
        let t = self.store.team(team_id).await?.ok_or_else(not_found)?;
        let role = self
            .store
            .role_in_team(team_id, &s.user_id)
            .await?
            .ok_or_else(not_found)?;
        Ok((t, role))
    }

    /// `Ok` when the session's user is a member of `team_id` (404 otherwise, as for a team
    /// that does not exist).
    pub async fn check_member(&self, s: &SessionUser, team_id: &str) -> Result<()> {
        self.membership(s, team_id).await.map(|_| ())
    }

    pub async fn get_team(&self, s: &SessionUser, team_id: &str) -> Result<TeamDetail> {
        let (t, _) = self.membership(s, team_id).await?;
        Ok(TeamDetail {
            team: team(&t),
            members: self.members_of(team_id).await?,
        })
    }

    pub(super) async fn members_of(&self, team_id: &str) -> Result<Vec<TeamMember>> {
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

    pub(super) async fn delete_team_now(&self, team_id: &str) -> Result<()> {
        self.destroy_team_capsules(team_id).await;
        if !self.store.soft_delete_team(team_id, self.now()).await? {
            return Err(ApiError::not_found(format!("team {team_id} not found")));
        }
        tracing::info!(team_id, "team deleted");
        Ok(())
    }

    pub(super) async fn destroy_team_capsules(&self, team_id: &str) {
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
            Some(u) if u.status == UserStatus::Active => u,
            _ => {
                return Err(ApiError::not_found(format!(
                    "no active account with email {email}"
                )))
            }
        };
        let now = self.now();
        if !self
            .store
            .add_member(team_id, &user.id, Role::Member, now)
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
            role: Role::Member,
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
        let role = match Role::parse(role) {
            Some(r @ (Role::Admin | Role::Member)) => r,
            _ => return Err(ApiError::invalid("role must be admin or member")),
        };
        match self.store.role_in_team(team_id, uid).await? {
            None => Err(ApiError::not_found(format!(
                "{uid} is not a member of this team"
            ))),
            Some(Role::Owner) => Err(ApiError::forbidden("the owner's role cannot be changed")),
            Some(_) => {
                self.store.set_member_role(team_id, uid, role).await?;
                self.audit
                    .record(
                        Record::new(&user_actor(s), "member", uid, "role_update")
                            .team(Some(team_id))
                            .meta("role", role.as_str()),
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
        match self.store.role_in_team(team_id, uid).await? {
            None => Err(ApiError::not_found(format!(
                "{uid} is not a member of this team"
            ))),
            Some(Role::Owner) => Err(ApiError::forbidden("the owner cannot be removed")),
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
}
