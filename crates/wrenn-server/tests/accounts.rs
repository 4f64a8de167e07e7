//! The account service against both backends, with a controllable clock and the outbox mailer
//! (whose files are the mails a user would receive).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use chrono::{Duration, TimeZone, Utc};
use wrenn_api::*;
use wrenn_server::accounts::limits::AuthLimits;
use wrenn_server::accounts::mail::Mailer;
use wrenn_server::accounts::{
    AccountConfig, AccountService, ClientMeta, IssuedSession, SessionUser, TeamCapsules,
};
use wrenn_server::clock::ManualClock;
use wrenn_server::store::Store;

#[macro_use]
mod common;
use common::*;

on_both_backends!(
    signup_activation_and_login_follow_the_rules,
    sessions_end_when_idle_or_too_old,
    passwords_change_reset_and_revoke_sessions,
    teams_members_and_roles,
    api_keys_belong_to_the_session_team,
    admins_govern_users_and_teams,
    deleted_accounts_free_their_email_and_are_purged,
);

/// Records which teams had their capsules destroyed.
#[derive(Default)]
struct Destroyed(Mutex<Vec<String>>);

#[async_trait::async_trait]
impl TeamCapsules for Destroyed {
    async fn destroy_team_capsules(&self, team_id: &str) {
        self.0.lock().unwrap().push(team_id.to_string());
    }
}

struct Env {
    svc: AccountService,
    store: Store,
    clock: Arc<ManualClock>,
    outbox: PathBuf,
    destroyed: Arc<Destroyed>,
}

fn env(store: Store) -> Env {
    let outbox = std::env::temp_dir().join(format!("wrenn-outbox-{}", wrenn_api::id::new_id("t-")));
    let clock = Arc::new(ManualClock::new(
        Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap(),
    ));
    let destroyed = Arc::new(Destroyed::default());
    let svc = AccountService::new(
        store.clone(),
        destroyed.clone(),
        Mailer::new(None, "Wrenn <noreply@localhost>", outbox.clone()).unwrap(),
        clock.clone(),
        AccountConfig {
            public_url: "https://wrenn.example".into(),
            oauth_redirect_url: "https://wrenn.example".into(),
            github: None,
            secure_cookies: true,
        },
        AuthLimits::new(10_000, 10_000),
    );
    Env {
        svc,
        store,
        clock,
        outbox,
        destroyed,
    }
}

fn meta() -> ClientMeta {
    ClientMeta {
        ip: Some("127.0.0.1".parse().unwrap()),
        user_agent: "tests".into(),
    }
}

impl Env {
    /// The token of the newest mail to `to` whose link contains `path`.
    fn token_from_mail(&self, to: &str, path: &str) -> String {
        let mut files: Vec<_> = std::fs::read_dir(&self.outbox)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for f in files.iter().rev() {
            // The body may be quoted-printable (long lines): undo soft breaks and `=3D`.
            let text = std::fs::read_to_string(f)
                .unwrap()
                .replace("=\r\n", "")
                .replace("=3D", "=");
            if text.contains(&format!("To: {to}")) {
                let marker = format!("{path}?token=");
                let start = text
                    .find(&marker)
                    .unwrap_or_else(|| panic!("no {path} link in {text}"))
                    + marker.len();
                return text[start..start + 32].to_string();
            }
        }
        panic!("no mail to {to}");
    }

    fn mails_to(&self, to: &str) -> usize {
        std::fs::read_dir(&self.outbox)
            .map(|d| {
                d.filter(|e| {
                    std::fs::read_to_string(e.as_ref().unwrap().path())
                        .unwrap()
                        .contains(&format!("To: {to}"))
                })
                .count()
            })
            .unwrap_or(0)
    }

    async fn user(&self, email: &str, password: &str) -> (SessionResponse, IssuedSession) {
        self.svc
            .signup(
                SignupRequest {
                    email: email.into(),
                    password: password.into(),
                    name: "Tess".into(),
                },
                &meta(),
            )
            .await
            .unwrap();
        let token = self.token_from_mail(email, "/activate");
        self.svc.activate(&token, &meta()).await.unwrap()
    }

    async fn session(&self, issued: &IssuedSession) -> SessionUser {
        self.svc
            .authenticate(&issued.secret)
            .await
            .unwrap()
            .expect("session is valid")
    }
}

fn code<T: std::fmt::Debug>(r: Result<T, ApiError>) -> &'static str {
    r.expect_err("expected an error").code.as_str()
}

async fn signup_activation_and_login_follow_the_rules(store: Store) {
    let e = env(store);
    let m = meta();
    let req = |email: &str, pw: &str, name: &str| SignupRequest {
        email: email.into(),
        password: pw.into(),
        name: name.into(),
    };
    assert_eq!(
        code(e.svc.signup(req("nope", "password1", "A"), &m).await),
        "invalid_request"
    );
    assert_eq!(
        code(e.svc.signup(req("a@x.io", "short", "A"), &m).await),
        "invalid_request"
    );
    assert_eq!(
        code(e.svc.signup(req("a@x.io", "password1", "  "), &m).await),
        "invalid_request"
    );
    assert_eq!(
        code(
            e.svc
                .signup(req("a@x.io", "password1", &"n".repeat(101)), &m)
                .await
        ),
        "invalid_request"
    );

    // Normalised email; inactive until activated.
    e.svc
        .signup(req("  Ada@X.io ", "password1", " Ada "), &m)
        .await
        .unwrap();
    let u = e.store.user_by_email("ada@x.io").await.unwrap().unwrap();
    assert_eq!((u.status.as_str(), u.name.as_str()), ("inactive", "Ada"));
    assert_eq!(
        code(
            e.svc
                .login(
                    LoginRequest {
                        email: "ada@x.io".into(),
                        password: "password1".into()
                    },
                    &m
                )
                .await
        ),
        "unauthorized"
    );
    // Cooldown while the first mail is valid; then the stale signup is replaced.
    assert_eq!(
        code(e.svc.signup(req("ada@x.io", "password2", "Ada"), &m).await),
        "signup_cooldown"
    );
    let first_token = e.token_from_mail("ada@x.io", "/activate");
    e.clock.advance(Duration::minutes(31));
    assert_eq!(
        code(e.svc.activate(&first_token, &m).await),
        "invalid_token",
        "expired"
    );
    e.svc
        .signup(req("ada@x.io", "password2", "Ada"), &m)
        .await
        .unwrap();
    assert_eq!(e.mails_to("ada@x.io"), 2);
    let token = e.token_from_mail("ada@x.io", "/activate");
    assert_ne!(token, first_token);

    // Activation: session, default team with the user as owner, first active user is admin.
    let (resp, issued) = e.svc.activate(&token, &m).await.unwrap();
    assert_eq!(resp.email, "ada@x.io");
    assert_eq!(resp.role, Role::Owner);
    assert!(resp.is_admin, "the first active user is platform admin");
    assert_eq!(issued.secret.len(), 64);
    assert_eq!(
        code(e.svc.activate(&token, &m).await),
        "invalid_token",
        "single use"
    );
    let s = e.session(&issued).await;
    let teams = e.svc.list_teams(&s).await.unwrap();
    assert_eq!(teams.len(), 1);
    assert_eq!(teams[0].team.name, "Ada's Team");
    assert_eq!(teams[0].team.id, resp.team_id);
    assert!(teams[0].team.slug.len() == 13 && teams[0].team.slug.as_bytes()[6] == b'-');

    assert_eq!(
        code(
            e.svc
                .signup(req("ADA@x.io", "password3", "Other"), &m)
                .await
        ),
        "email_taken"
    );

    // Login: wrong password and unknown email look the same.
    let login = |email: &str, pw: &str| LoginRequest {
        email: email.into(),
        password: pw.into(),
    };
    assert_eq!(
        code(e.svc.login(login("ada@x.io", "password1"), &m).await),
        "unauthorized"
    );
    assert_eq!(
        code(e.svc.login(login("nobody@x.io", "password2"), &m).await),
        "unauthorized"
    );
    let (again, _) = e
        .svc
        .login(login(" ADA@x.io", "password2"), &m)
        .await
        .unwrap();
    assert_eq!(again.user_id, resp.user_id);

    // The second user is not an admin.
    let (bob, _) = e.user("bob@x.io", "password9").await;
    assert!(!bob.is_admin);
    // A garbage token.
    assert_eq!(code(e.svc.activate("0123", &m).await), "invalid_token");
}

async fn sessions_end_when_idle_or_too_old(store: Store) {
    let e = env(store);
    let (_, first) = e.user("s@x.io", "password1").await;
    // Active use keeps a session alive for at most 24 h.
    for _ in 0..4 {
        e.clock.advance(Duration::hours(5));
        assert!(e.svc.authenticate(&first.secret).await.unwrap().is_some());
    }
    e.clock.advance(Duration::hours(4));
    assert!(
        e.svc.authenticate(&first.secret).await.unwrap().is_none(),
        "absolute lifetime 24 h"
    );
    // Idle for 6 h ends it too.
    let (_, second) = e
        .svc
        .login(
            LoginRequest {
                email: "s@x.io".into(),
                password: "password1".into(),
            },
            &meta(),
        )
        .await
        .unwrap();
    e.clock.advance(Duration::minutes(359));
    assert!(e.svc.authenticate(&second.secret).await.unwrap().is_some());
    e.clock.advance(Duration::minutes(359));
    let s = e.session(&second).await;
    e.clock.advance(Duration::minutes(361));
    assert!(
        e.svc.authenticate(&second.secret).await.unwrap().is_none(),
        "idle window 6 h"
    );
    // An unknown secret is no session.
    assert!(e.svc.authenticate("00").await.unwrap().is_none());

    // List, current marker, revoke one, logout-all.
    let login = || LoginRequest {
        email: "s@x.io".into(),
        password: "password1".into(),
    };
    let (_, a) = e.svc.login(login(), &meta()).await.unwrap();
    let (_, b) = e.svc.login(login(), &meta()).await.unwrap();
    let sa = e.session(&a).await;
    let list = e.svc.sessions(&sa).await.unwrap().sessions;
    assert_eq!(list.len(), 2, "expired sessions are not listed: {list:?}");
    assert_eq!(list.iter().filter(|x| x.current).count(), 1);
    assert!(list
        .iter()
        .all(|x| x.ip_address == "127.0.0.1" && x.user_agent == "tests"));
    let sb = e.session(&b).await;
    e.svc.revoke_session(&sa, &sb.session_id).await.unwrap();
    assert!(e.svc.authenticate(&b.secret).await.unwrap().is_none());
    assert_eq!(
        code(e.svc.revoke_session(&sa, &sb.session_id).await),
        "not_found"
    );
    assert_eq!(
        code(e.svc.revoke_session(&sa, &s.session_id).await),
        "not_found"
    );
    e.svc.logout_all(&sa).await.unwrap();
    assert!(e.svc.authenticate(&a.secret).await.unwrap().is_none());
}

async fn passwords_change_reset_and_revoke_sessions(store: Store) {
    let e = env(store);
    let (_, issued) = e.user("p@x.io", "password1").await;
    let s = e.session(&issued).await;
    let change = |cur: Option<&str>, new: &str| ChangePasswordRequest {
        current_password: cur.map(Into::into),
        new_password: new.into(),
        confirm_password: None,
    };
    assert_eq!(
        code(
            e.svc
                .change_password(&s, change(Some("wrong-one"), "password2"))
                .await
        ),
        "wrong_password"
    );
    assert_eq!(
        code(e.svc.change_password(&s, change(None, "password2")).await),
        "invalid_request"
    );
    assert_eq!(
        code(
            e.svc
                .change_password(&s, change(Some("password1"), "short"))
                .await
        ),
        "invalid_request"
    );
    e.svc
        .change_password(&s, change(Some("password1"), "password2"))
        .await
        .unwrap();
    assert!(
        e.svc.authenticate(&issued.secret).await.unwrap().is_none(),
        "change revokes every session"
    );

    // Reset: always accepted, mail only to active accounts, 15 min, single use.
    let before = e.mails_to("nobody@x.io");
    e.svc.request_reset("nobody@x.io", &meta()).await.unwrap();
    assert_eq!(e.mails_to("nobody@x.io"), before);
    let (_, live) = e
        .svc
        .login(
            LoginRequest {
                email: "p@x.io".into(),
                password: "password2".into(),
            },
            &meta(),
        )
        .await
        .unwrap();
    e.svc.request_reset(" P@x.io", &meta()).await.unwrap();
    let token = e.token_from_mail("p@x.io", "/reset-password");
    let confirm = |t: &str, p: &str| ResetConfirmRequest {
        token: t.into(),
        new_password: p.into(),
    };
    assert_eq!(
        code(e.svc.confirm_reset(confirm(&token, "short"), &meta()).await),
        "invalid_request"
    );
    e.svc
        .confirm_reset(confirm(&token, "password3"), &meta())
        .await
        .unwrap();
    assert_eq!(
        code(
            e.svc
                .confirm_reset(confirm(&token, "password4"), &meta())
                .await
        ),
        "invalid_token"
    );
    assert!(
        e.svc.authenticate(&live.secret).await.unwrap().is_none(),
        "reset revokes every session"
    );
    e.svc
        .login(
            LoginRequest {
                email: "p@x.io".into(),
                password: "password3".into(),
            },
            &meta(),
        )
        .await
        .unwrap();
    e.svc.request_reset("p@x.io", &meta()).await.unwrap();
    let late = e.token_from_mail("p@x.io", "/reset-password");
    e.clock.advance(Duration::minutes(16));
    assert_eq!(
        code(
            e.svc
                .confirm_reset(confirm(&late, "password5"), &meta())
                .await
        ),
        "invalid_token"
    );
}

async fn teams_members_and_roles(store: Store) {
    let e = env(store);
    let (owner_r, owner_i) = e.user("owner@x.io", "password1").await;
    let (admin_r, admin_i) = e.user("admin@x.io", "password1").await;
    let (_, member_i) = e.user("member@x.io", "password1").await;
    let owner = e.session(&owner_i).await;
    let team = owner_r.team_id.clone();

    assert_eq!(
        code(e.svc.create_team(&owner, "bad/name").await),
        "invalid_request"
    );
    assert_eq!(code(e.svc.create_team(&owner, "").await), "invalid_request");
    let extra = e.svc.create_team(&owner, " Research_Lab-2 ").await.unwrap();
    assert_eq!(
        (extra.team.name.as_str(), extra.role.as_str()),
        ("Research_Lab-2", "owner")
    );

    assert_eq!(
        code(e.svc.add_member(&owner, &team, "ghost@x.io").await),
        "not_found"
    );
    e.svc.add_member(&owner, &team, "ADMIN@x.io").await.unwrap();
    assert_eq!(
        code(e.svc.add_member(&owner, &team, "admin@x.io").await),
        "invalid_request"
    );
    e.svc
        .add_member(&owner, &team, "member@x.io")
        .await
        .unwrap();
    e.svc
        .set_member_role(&owner, &team, &admin_r.user_id, "admin")
        .await
        .unwrap();
    assert_eq!(
        code(
            e.svc
                .set_member_role(&owner, &team, &admin_r.user_id, "owner")
                .await
        ),
        "invalid_request"
    );
    assert_eq!(
        code(
            e.svc
                .set_member_role(&owner, &team, &owner_r.user_id, "member")
                .await
        ),
        "forbidden"
    );
    assert_eq!(
        code(
            e.svc
                .set_member_role(&owner, &team, "usr-nobody", "member")
                .await
        ),
        "not_found"
    );

    // The admin switches into the team; the member too.
    let admin0 = e.session(&admin_i).await;
    assert_eq!(
        code(e.svc.switch_team(&admin0, &extra.team.id, &meta()).await),
        "forbidden"
    );
    assert_eq!(
        code(e.svc.switch_team(&admin0, "team-nope", &meta()).await),
        "not_found"
    );
    let (sw, admin_i2) = e.svc.switch_team(&admin0, &team, &meta()).await.unwrap();
    assert_eq!(
        (sw.team_id.as_str(), sw.role.as_str()),
        (team.as_str(), "admin")
    );
    assert!(
        e.svc.authenticate(&admin_i.secret).await.unwrap().is_none(),
        "switch rotates the session"
    );
    let admin = e.session(&admin_i2).await;
    let member0 = e.session(&member_i).await;
    let (_, member_i2) = e.svc.switch_team(&member0, &team, &meta()).await.unwrap();
    let member = e.session(&member_i2).await;

    // Rights: members read; admins rename and manage members; only the owner deletes.
    let detail = e.svc.get_team(&member, &team).await.unwrap();
    assert_eq!(detail.members.len(), 3);
    assert_eq!(detail.members[0].role, Role::Owner);
    assert_eq!(
        code(e.svc.rename_team(&member, &team, "Mine").await),
        "forbidden"
    );
    e.svc
        .rename_team(&admin, &team, "Shared Team")
        .await
        .unwrap();
    assert_eq!(
        code(e.svc.add_member(&member, &team, "owner@x.io").await),
        "forbidden"
    );
    assert_eq!(
        code(e.svc.remove_member(&admin, &team, &owner_r.user_id).await),
        "forbidden"
    );
    assert_eq!(code(e.svc.delete_team(&admin, &team).await), "forbidden");
    assert_eq!(code(e.svc.leave_team(&owner, &team).await), "forbidden");
    // Outsiders cannot see the team exists.
    assert_eq!(
        code(e.svc.get_team(&admin, &extra.team.id).await),
        "not_found"
    );
    assert_eq!(
        code(e.svc.team_members(&member, &extra.team.id).await),
        "not_found"
    );

    // Search: prefix with @, at most 10, active users only.
    assert_eq!(
        code(e.svc.search_users(&member, "adm").await),
        "invalid_request"
    );
    let found = e.svc.search_users(&member, "admin@").await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].email, "admin@x.io");
    assert!(
        e.svc.search_users(&member, "%@").await.unwrap().is_empty(),
        "LIKE wildcards match themselves"
    );

    // The member leaves: their session in that team loses its rights at once.
    e.svc.leave_team(&member, &team).await.unwrap();
    let after = e.session(&member_i2).await;
    assert!(after.role.is_none());
    assert_eq!(code(e.svc.list_api_keys(&after).await), "forbidden");
    assert_eq!(code(e.svc.get_team(&after, &team).await), "not_found");
    // Removing the admin: the API key they made in the team stops working with them.
    let admin_key = e
        .svc
        .create_api_key(&admin, CreateApiKeyRequest::default())
        .await
        .unwrap()
        .key
        .unwrap();
    let key_owner = || async {
        e.store
            .api_key_by_hash(&wrenn_server::accounts::hash_api_key(&admin_key))
            .await
            .unwrap()
            .unwrap()
    };
    assert!(key_owner().await.creator_active);
    e.svc
        .remove_member(&owner, &team, &admin_r.user_id)
        .await
        .unwrap();
    assert!(!key_owner().await.creator_active);
    assert_eq!(
        code(e.svc.remove_member(&owner, &team, &admin_r.user_id).await),
        "not_found"
    );

    // Deleting a team destroys its capsules, and it is gone for everyone.
    e.svc.delete_team(&owner, &extra.team.id).await.unwrap();
    assert_eq!(*e.destroyed.0.lock().unwrap(), vec![extra.team.id.clone()]);
    assert!(e
        .svc
        .list_teams(&owner)
        .await
        .unwrap()
        .iter()
        .all(|t| t.team.id != extra.team.id));
    assert_eq!(
        code(e.svc.get_team(&owner, &extra.team.id).await),
        "not_found"
    );
}

async fn api_keys_belong_to_the_session_team(store: Store) {
    let e = env(store);
    let (a_r, a_i) = e.user("ka@x.io", "password1").await;
    let (_, b_i) = e.user("kb@x.io", "password1").await;
    let a = e.session(&a_i).await;
    let b = e.session(&b_i).await;
    let k = e
        .svc
        .create_api_key(&a, CreateApiKeyRequest { name: None })
        .await
        .unwrap();
    assert_eq!(k.name, "Unnamed API Key");
    let plain = k.key.clone().unwrap();
    assert!(plain.starts_with("wrn_") && plain.len() == 36);
    assert_eq!(k.key_prefix, plain[..10]);
    let owner = e
        .store
        .api_key_by_hash(&wrenn_server::accounts::hash_api_key(&plain))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.team_id, a_r.team_id);
    let listed = e.svc.list_api_keys(&a).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert!(listed[0].key.is_none(), "plaintext is shown once");
    assert!(e.svc.list_api_keys(&b).await.unwrap().is_empty());
    assert_eq!(
        code(e.svc.delete_api_key(&b, &k.id).await),
        "not_found",
        "another team's key"
    );
    assert_eq!(
        code(
            e.svc
                .create_api_key(
                    &a,
                    CreateApiKeyRequest {
                        name: Some("x".repeat(101))
                    }
                )
                .await
        ),
        "invalid_request"
    );
    e.svc.delete_api_key(&a, &k.id).await.unwrap();
    assert!(e
        .store
        .api_key_by_hash(&wrenn_server::accounts::hash_api_key(&plain))
        .await
        .unwrap()
        .is_none());
}

async fn admins_govern_users_and_teams(store: Store) {
    let e = env(store);
    let (root_r, root_i) = e.user("root@x.io", "password1").await;
    let (user_r, user_i) = e.user("user@x.io", "password1").await;
    let root = e.session(&root_i).await;
    assert!(root.is_admin);
    let users = e.svc.admin_users().await.unwrap();
    assert_eq!(users.len(), 2);
    // The last admin stays one.
    assert_eq!(
        code(e.svc.admin_set_admin(&root, &root_r.user_id, false).await),
        "invalid_request"
    );
    assert_eq!(
        code(e.svc.admin_set_active(&root, &root_r.user_id, false).await),
        "invalid_request"
    );
    e.svc
        .admin_set_admin(&root, &user_r.user_id, true)
        .await
        .unwrap();
    assert!(
        e.session(&user_i).await.is_admin,
        "takes effect on the next request"
    );
    e.svc
        .admin_set_admin(&root, &user_r.user_id, false)
        .await
        .unwrap();
    assert!(!e.session(&user_i).await.is_admin);
    assert_eq!(
        code(e.svc.admin_set_admin(&root, "usr-nope", true).await),
        "not_found"
    );

    // Deactivation: sessions and keys revoked, owned teams' capsules destroyed, no login.
    let u = e.session(&user_i).await;
    let key = e
        .svc
        .create_api_key(&u, CreateApiKeyRequest::default())
        .await
        .unwrap()
        .key
        .unwrap();
    e.svc
        .admin_set_active(&root, &user_r.user_id, false)
        .await
        .unwrap();
    assert!(e.svc.authenticate(&user_i.secret).await.unwrap().is_none());
    assert!(e
        .store
        .api_key_by_hash(&wrenn_server::accounts::hash_api_key(&key))
        .await
        .unwrap()
        .is_none());
    assert!(e.destroyed.0.lock().unwrap().contains(&user_r.team_id));
    let login = || LoginRequest {
        email: "user@x.io".into(),
        password: "password1".into(),
    };
    assert_eq!(
        code(e.svc.login(login(), &meta()).await),
        "account_deactivated"
    );
    e.svc
        .admin_set_active(&root, &user_r.user_id, true)
        .await
        .unwrap();
    e.svc.login(login(), &meta()).await.unwrap();

    // Teams: list, BYOC only switches on, delete.
    let teams = e.svc.admin_teams().await.unwrap();
    assert_eq!(teams.len(), 2);
    assert!(teams
        .iter()
        .any(|t| t.owner_email.as_deref() == Some("user@x.io") && t.members == 1));
    e.svc
        .admin_set_byoc(&root, &user_r.team_id, true)
        .await
        .unwrap();
    assert_eq!(
        code(e.svc.admin_set_byoc(&root, &user_r.team_id, false).await),
        "invalid_request"
    );
    assert!(e.store.team(&user_r.team_id).await.unwrap().unwrap().byoc);
    e.svc
        .admin_delete_team(&root, &user_r.team_id)
        .await
        .unwrap();
    assert_eq!(
        code(e.svc.admin_delete_team(&root, &user_r.team_id).await),
        "not_found"
    );
    assert_eq!(e.svc.admin_teams().await.unwrap().len(), 1);
}

async fn deleted_accounts_free_their_email_and_are_purged(store: Store) {
    let e = env(store);
    let (a_r, a_i) = e.user("del@x.io", "password1").await;
    let (_, b_i) = e.user("friend@x.io", "password1").await;
    let a = e.session(&a_i).await;
    assert_eq!(
        code(e.svc.delete_me(&a, "other@x.io").await),
        "invalid_request"
    );
    e.svc
        .add_member(&a, &a_r.team_id, "friend@x.io")
        .await
        .unwrap();
    assert_eq!(
        code(e.svc.delete_me(&a, "DEL@x.io").await),
        "owns_team_with_members"
    );
    let friend0 = e.session(&b_i).await;
    let (_, fi) = e
        .svc
        .switch_team(&friend0, &a_r.team_id, &meta())
        .await
        .unwrap();
    e.svc
        .leave_team(&e.session(&fi).await, &a_r.team_id)
        .await
        .unwrap();
    e.svc.delete_me(&a, "DEL@x.io").await.unwrap();
    assert!(e.svc.authenticate(&a_i.secret).await.unwrap().is_none());
    assert!(
        e.store.team(&a_r.team_id).await.unwrap().is_none(),
        "teams owned alone go with the account"
    );
    assert!(e.destroyed.0.lock().unwrap().contains(&a_r.team_id));
    let row = e.store.user_by_id(&a_r.user_id).await.unwrap().unwrap();
    assert_eq!(row.status, UserStatus::Deleted);
    // The email can sign up again.
    e.user("del@x.io", "password2").await;
    // Purged after 15 days.
    e.clock.advance(Duration::days(14));
    assert_eq!(e.svc.purge_deleted().await.unwrap(), 0);
    e.clock.advance(Duration::days(2));
    assert_eq!(e.svc.purge_deleted().await.unwrap(), 1);
    assert!(e.store.user_by_id(&a_r.user_id).await.unwrap().is_none());
}

#[tokio::test]
async fn attempts_beyond_the_limits_answer_429() {
    let store = sqlite("accounts-limits").await;
    let mut e = env(store);
    e.svc = AccountService::new(
        e.store.clone(),
        e.destroyed.clone(),
        Mailer::new(None, "Wrenn <noreply@localhost>", e.outbox.clone()).unwrap(),
        e.clock.clone(),
        AccountConfig {
            public_url: "https://wrenn.example".into(),
            oauth_redirect_url: "https://wrenn.example".into(),
            github: None,
            secure_cookies: true,
        },
        AuthLimits::new(100, 3),
    );
    let login = || LoginRequest {
        email: "x@x.io".into(),
        password: "password1".into(),
    };
    for _ in 0..3 {
        assert_eq!(code(e.svc.login(login(), &meta()).await), "unauthorized");
    }
    let err = e.svc.login(login(), &meta()).await.unwrap_err();
    assert_eq!(
        (err.code.as_str(), err.code.status()),
        ("rate_limited", 429)
    );
    // Another email from the same address still gets through.
    let other = LoginRequest {
        email: "y@x.io".into(),
        password: "password1".into(),
    };
    assert_eq!(code(e.svc.login(other, &meta()).await), "unauthorized");
}
