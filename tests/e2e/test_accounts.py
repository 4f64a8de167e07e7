"""Accounts over HTTP against the real platform: signup and activation by real mail (SMTP),
session cookies and CSRF, sessions, passwords, teams and members, API keys, GitHub OAuth
against a local stand-in, the admin surface and rate limits."""

import json
import secrets
import urllib.parse

import httpx
import httpx_ws
import pytest

from conftest import Browser, admin_browser, new_user
from tests.support.waits import wait_status


def err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["message"]


def attrs(set_cookie):
    parts = [p.strip() for p in set_cookie.split(";")]
    return {p.split("=", 1)[0].lower(): (p.split("=", 1)[1] if "=" in p else True) for p in parts[1:]}


def test_bootstrap_admin_logs_in_with_the_printed_password(platform):
    assert "password" not in (platform.data_dir / "bootstrap.json").read_text()
    admin = admin_browser(platform)
    assert admin.me["is_admin"] is True and admin.me["role"] == "owner"
    me = admin.get("/v1/me").json()
    assert me["email"] == platform.admin_email and me["has_password"] is True and me["providers"] == []


def test_signup_mail_activation_and_cookies(platform, mail_sink):
    email = f"Sig{secrets.token_hex(4)}@Example.test"
    b = Browser(platform.base_url)
    for body, status, code in [
        ({"email": "not-an-email", "password": "password-1", "name": "A"}, 400, "invalid_request"),
        ({"email": email, "password": "short", "name": "A"}, 400, "invalid_request"),
        ({"email": email, "password": "password-1", "name": ""}, 400, "invalid_request"),
        ({"email": email, "password": "password-1"}, 400, "invalid_request"),
    ]:
        err(b.post("/v1/auth/signup", json=body), status, code)
    r = b.post("/v1/auth/signup", json={"email": f"  {email} ", "password": "password-1", "name": " Sig "})
    assert r.status_code == 201, r.text
    assert r.json()["message"]
    normal = email.lower()
    err(b.post("/v1/auth/signup", json={"email": normal, "password": "password-1", "name": "Sig"}), 409, "signup_cooldown")
    # Not active yet.
    err(b.post("/v1/auth/login", json={"email": normal, "password": "password-1"}), 401, "unauthorized")
    msg, body = mail_sink.wait_for(normal, "/activate?token=")
    assert msg["Subject"] == "Activate your Wrenn account"
    token = mail_sink.link_token(normal, "/activate")
    assert f"{platform.public_url}/activate?token={token}" in body
    err(b.post("/v1/auth/activate", json={"token": "f" * 32}), 400, "invalid_token")
    r = b.post("/v1/auth/activate", json={"token": token})
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["email"] == normal and s["name"] == "Sig" and s["role"] == "owner" and s["is_admin"] is False
    assert s["user_id"].startswith("usr-") and s["team_id"].startswith("team-")
    cookies = {h.split("=", 1)[0]: attrs(h) for h in r.headers.get_list("set-cookie")}
    sid, csrf = cookies["wrenn_sid"], cookies["wrenn_csrf"]
    assert sid["httponly"] is True and sid["secure"] is True and sid["samesite"] == "Strict" and sid["path"] == "/"
    assert csrf.get("httponly") is None, "scripts read the CSRF cookie"
    assert csrf["secure"] is True and csrf["samesite"] == "Strict"
    assert 86000 < int(sid["max-age"]) <= 86400
    err(b.post("/v1/auth/activate", json={"token": token}), 400, "invalid_token")
    err(b.post("/v1/auth/signup", json={"email": normal, "password": "password-1", "name": "X"}), 409, "email_taken")
    teams = b.get("/v1/teams").json()
    assert [t["role"] for t in teams] == ["owner"] and teams[0]["name"] == "Sig's Team"


def test_csrf_is_required_for_session_writes_only(platform, mail_sink):
    b = new_user(platform, mail_sink)
    assert b.get("/v1/me", csrf=False).status_code == 200
    err(b.patch("/v1/me", json={"name": "New"}, csrf=False), 403, "forbidden")
    err(b.patch("/v1/me", json={"name": "New"}, headers={"X-CSRF-Token": "0" * 64}), 403, "forbidden")
    assert b.patch("/v1/me", json={"name": "New"}).status_code == 204
    assert b.get("/v1/me").json()["name"] == "New"
    err(b.patch("/v1/me", json={"name": " "}), 400, "invalid_request")
    # Session-only endpoints refuse API keys and anonymous callers.
    anon = httpx.Client(base_url=platform.base_url)
    err(anon.get("/v1/me"), 401, "unauthorized")
    err(anon.get("/v1/me", headers={"X-API-Key": platform.api_key}), 401, "unauthorized")
    err(anon.get("/v1/me", headers={"Cookie": "wrenn_sid=" + "a" * 64}), 401, "unauthorized")
    # API keys never need CSRF; a key made in this session acts for its team.
    r = b.post("/v1/api-keys", json={"name": "ci"})
    assert r.status_code == 201, r.text
    key = r.json()
    assert key["key"].startswith("wrn_") and key["key_prefix"] == key["key"][:10] and key["team_id"] == b.me["team_id"]
    listed = b.get("/v1/api-keys").json()
    assert [k["id"] for k in listed] == [key["id"]] and "key" not in listed[0]
    with httpx.Client(base_url=platform.base_url, headers={"X-API-Key": key["key"]}) as k:
        assert k.get("/v1/capsules").status_code == 200
        err(k.post("/v1/capsules/cl-nope/pause"), 404, "not_found")
    # Capsule routes take the session too (CSRF on writes).
    assert b.get("/v1/capsules").status_code == 200
    err(b.post("/v1/capsules/cl-nope/pause", csrf=False), 403, "forbidden")
    assert b.delete(f"/v1/api-keys/{key['id']}").status_code == 204
    err(b.delete(f"/v1/api-keys/{key['id']}"), 404, "not_found")
    with httpx.Client(base_url=platform.base_url, headers={"X-API-Key": key["key"]}) as k:
        err(k.get("/v1/capsules"), 401, "unauthorized")


def test_sessions_list_revoke_logout(platform, mail_sink):
    a = new_user(platform, mail_sink)
    b = Browser(platform.base_url)
    r = b.post("/v1/auth/login", json={"email": a.email, "password": a.password}, headers={"User-Agent": "second-device"})
    assert r.status_code == 200
    sessions = a.get("/v1/me/sessions").json()["sessions"]
    assert len(sessions) == 2
    mine = [s for s in sessions if s["current"]]
    other = [s for s in sessions if not s["current"]]
    assert len(mine) == 1 and other[0]["user_agent"] == "second-device" and other[0]["ip_address"] == "127.0.0.1"
    for f in ("created_at", "last_seen_at", "expires_at"):
        assert other[0][f].endswith("Z")
    assert a.delete(f"/v1/me/sessions/{other[0]['id']}").status_code == 204
    err(b.get("/v1/me"), 401, "unauthorized")
    err(a.delete(f"/v1/me/sessions/{other[0]['id']}"), 404, "not_found")
    # Logout clears the cookies and ends the session.
    old = dict(a.cookies)
    r = a.post("/v1/auth/logout")
    assert r.status_code == 204
    assert all("Max-Age=0" in h for h in r.headers.get_list("set-cookie")) and not a.cookies
    a.cookies = old
    err(a.get("/v1/me"), 401, "unauthorized")
    # Logout-all.
    c1, c2 = Browser(platform.base_url), Browser(platform.base_url)
    for c in (c1, c2):
        assert c.post("/v1/auth/login", json={"email": a.email, "password": a.password}).status_code == 200
    assert c1.post("/v1/auth/logout-all").status_code == 204
    err(c2.get("/v1/me"), 401, "unauthorized")


def test_passwords_change_and_reset_by_mail(platform, mail_sink):
    a = new_user(platform, mail_sink)
    err(a.post("/v1/me/password", json={"current_password": "wrong-pass", "new_password": "password-2"}), 401, "wrong_password")
    err(a.post("/v1/me/password", json={"current_password": a.password, "new_password": "short"}), 400, "invalid_request")
    assert a.post("/v1/me/password", json={"current_password": a.password, "new_password": "password-2"}).status_code == 204
    err(a.get("/v1/me"), 401, "unauthorized")
    anon = Browser(platform.base_url)
    err(anon.post("/v1/auth/login", json={"email": a.email, "password": a.password}), 401, "unauthorized")
    assert anon.post("/v1/auth/login", json={"email": a.email, "password": "password-2"}).status_code == 200
    # Reset: 204 whether or not the account exists; the link comes by mail.
    assert anon.post("/v1/me/password/reset", json={"email": "nobody@example.test"}).status_code == 204
    assert anon.post("/v1/me/password/reset", json={"email": a.email.upper()}).status_code == 204
    token = mail_sink.link_token(a.email, "/reset-password")
    err(anon.post("/v1/me/password/reset/confirm", json={"token": token, "new_password": "short"}), 400, "invalid_request")
    assert anon.post("/v1/me/password/reset/confirm", json={"token": token, "new_password": "password-3"}).status_code == 204
    err(anon.post("/v1/me/password/reset/confirm", json={"token": token, "new_password": "password-4"}), 400, "invalid_token")
    err(anon.get("/v1/me"), 401, "unauthorized")
    fresh = Browser(platform.base_url)
    assert fresh.post("/v1/auth/login", json={"email": a.email, "password": "password-3"}).status_code == 200


def test_teams_members_roles_and_switching(platform, mail_sink):
    owner = new_user(platform, mail_sink)
    member = new_user(platform, mail_sink)
    team = owner.me["team_id"]
    err(owner.post("/v1/teams", json={"name": "no/slashes"}), 400, "invalid_request")
    r = owner.post("/v1/teams", json={"name": "Lab Two"})
    assert r.status_code == 201 and r.json()["role"] == "owner" and r.json()["name"] == "Lab Two"
    lab = r.json()["id"]
    err(owner.get("/v1/users/search", params={"email": "u"}), 400, "invalid_request")
    found = owner.get("/v1/users/search", params={"email": member.email[:6] + "@"}).json()
    assert found == [] or all(f["email"].startswith(member.email[:6]) for f in found)
    found = owner.get("/v1/users/search", params={"email": member.email.split("@")[0] + "@"}).json()
    assert found == [{"user_id": member.me["user_id"], "email": member.email}]
    err(owner.post(f"/v1/teams/{lab}/members", json={"email": "ghost@example.test"}), 404, "not_found")
    r = owner.post(f"/v1/teams/{lab}/members", json={"email": member.email})
    assert r.status_code == 201 and r.json()["role"] == "member"
    err(owner.post(f"/v1/teams/{lab}/members", json={"email": member.email}), 400, "invalid_request")
    # Switch into it: new session, same user.
    err(member.post("/v1/auth/switch-team", json={"team_id": team}), 403, "forbidden")
    err(member.post("/v1/auth/switch-team", json={"team_id": "team-doesnotexist"}), 404, "not_found")
    old_sid = member.cookies["wrenn_sid"]
    r = member.post("/v1/auth/switch-team", json={"team_id": lab})
    assert r.status_code == 200 and r.json()["team_id"] == lab and r.json()["role"] == "member"
    assert member.cookies["wrenn_sid"] != old_sid
    err(member.patch(f"/v1/teams/{lab}", json={"name": "Mine"}), 403, "forbidden")
    err(member.delete(f"/v1/teams/{lab}"), 403, "forbidden")
    detail = member.get(f"/v1/teams/{lab}").json()
    assert detail["team"]["id"] == lab and {m["role"] for m in detail["members"]} == {"owner", "member"}
    assert member.get(f"/v1/teams/{lab}/members").status_code == 200
    # Promote; the owner stays the owner.
    uid = member.me["user_id"]
    err(owner.patch(f"/v1/teams/{lab}/members/{uid}", json={"role": "owner"}), 400, "invalid_request")
    assert owner.patch(f"/v1/teams/{lab}/members/{uid}", json={"role": "admin"}).status_code == 204
    assert member.patch(f"/v1/teams/{lab}", json={"name": "Lab Renamed"}).status_code == 204
    err(member.patch(f"/v1/teams/{lab}/members/{owner.me['user_id']}", json={"role": "member"}), 403, "forbidden")
    err(member.delete(f"/v1/teams/{lab}/members/{owner.me['user_id']}"), 403, "forbidden")
    err(owner.post(f"/v1/teams/{lab}/leave"), 403, "forbidden")
    # Another team's ids look like nothing.
    err(member.get(f"/v1/teams/{team}"), 404, "not_found")
    err(member.get(f"/v1/teams/{team}/members"), 404, "not_found")
    # Leave: the session in that team loses its rights at once.
    assert member.post(f"/v1/teams/{lab}/leave").status_code == 204
    err(member.get("/v1/api-keys"), 403, "forbidden")
    err(member.get("/v1/capsules"), 403, "forbidden")
    assert member.post("/v1/auth/switch-team", json={"team_id": member.me["team_id"]}).status_code == 200
    assert member.get("/v1/capsules").status_code == 200
    # Delete the team.
    err(owner.delete(f"/v1/teams/{team}/members/{uid}"), 404, "not_found")
    assert owner.delete(f"/v1/teams/{lab}").status_code == 204
    assert all(t["id"] != lab for t in owner.get("/v1/teams").json())


def test_tenant_isolation_on_capsule_and_team_routes(platform, mail_sink, api):
    """Team B, by API key and by session, reaches none of team A's resources."""
    a = new_user(platform, mail_sink)
    b = new_user(platform, mail_sink)
    a_key = a.post("/v1/api-keys", json={"name": "a"}).json()
    b_key = b.post("/v1/api-keys", json={"name": "b"}).json()["key"]
    with httpx.Client(base_url=platform.base_url, headers={"X-API-Key": a_key["key"]}, timeout=60) as ak:
        r = ak.post("/v1/capsules", json={"timeout_sec": 300})
        assert r.status_code == 202, r.text
        cid = r.json()["id"]
        wait_status(ak, cid, {"running"})
        calls = [
            ("GET", f"/v1/capsules/{cid}", None),
            ("POST", f"/v1/capsules/{cid}/exec", {"cmd": "true"}),
            ("POST", f"/v1/capsules/{cid}/pause", None),
            ("POST", f"/v1/capsules/{cid}/resume", None),
            ("POST", f"/v1/capsules/{cid}/ping", None),
            ("GET", f"/v1/capsules/{cid}/metrics", None),
            ("GET", f"/v1/capsules/{cid}/processes", None),
            ("DELETE", f"/v1/capsules/{cid}/processes/1", None),
            ("POST", f"/v1/capsules/{cid}/files/list", {"path": "/"}),
            ("POST", f"/v1/capsules/{cid}/files/read", {"path": "/etc/hostname"}),
            ("POST", f"/v1/capsules/{cid}/files/mkdir", {"path": "/tmp/x"}),
            ("POST", f"/v1/capsules/{cid}/files/remove", {"path": "/tmp/x"}),
            ("POST", "/v1/snapshots", {"sandbox_id": cid, "name": "stolen"}),
            # WebSocket routes check the capsule before the upgrade.
            ("GET", f"/v1/capsules/{cid}/exec/stream", None),
            ("GET", f"/v1/capsules/{cid}/pty", None),
            ("GET", f"/v1/capsules/{cid}/processes/1/stream", None),
            ("DELETE", f"/v1/capsules/{cid}", None),
        ]
        with httpx.Client(base_url=platform.base_url, headers={"X-API-Key": b_key}, timeout=60) as bk:
            for method, path, body in calls:
                for who, r in (("key", bk.request(method, path, json=body)), ("session", b.request(method, path, json=body))):
                    assert r.status_code == 404, (who, method, path, r.status_code, r.text)
                    assert cid not in r.text or "not found" in r.text
            assert all(c["id"] != cid for c in bk.get("/v1/capsules").json())
            err(bk.post(f"/v1/capsules/{cid}/files/write", data={"path": "/tmp/f"}, files={"file": ("f", b"x")}), 404, "not_found")
        # Keys and teams: B cannot delete A's key or read A's team.
        err(b.delete(f"/v1/api-keys/{a_key['id']}"), 404, "not_found")
        err(b.get(f"/v1/teams/{a.me['team_id']}"), 404, "not_found")
        err(b.patch(f"/v1/teams/{a.me['team_id']}", json={"name": "x"}), 404, "not_found")
        err(b.delete(f"/v1/teams/{a.me['team_id']}"), 404, "not_found")
        err(b.post(f"/v1/teams/{a.me['team_id']}/members", json={"email": b.email}), 404, "not_found")
        # A still owns a running capsule; non-admins cannot use the admin routes.
        assert ak.get(f"/v1/capsules/{cid}").json()["status"] == "running"
        err(b.get(f"/v1/admin/capsules/{cid}"), 403, "forbidden")
        err(b.get("/v1/admin/users"), 403, "forbidden")
        # The platform admin reaches it through the admin routes (same implementation).
        admin = admin_browser(platform)
        assert any(c["id"] == cid for c in admin.get("/v1/admin/capsules").json())
        assert admin.get(f"/v1/admin/capsules/{cid}").json()["id"] == cid
        r = admin.post(f"/v1/admin/capsules/{cid}/exec", json={"cmd": "echo admin-was-here"})
        assert r.status_code == 200 and "admin-was-here" in r.json()["stdout"], r.text
        err(admin.get("/v1/admin/capsules/cl-nope"), 404, "not_found")
        r = admin.post(f"/v1/admin/capsules/{cid}/files/write", data={"path": "/tmp/by-admin"}, files={"file": ("f", b"from admin")})
        assert r.status_code in (200, 201, 204), r.text
        assert ak.post(f"/v1/capsules/{cid}/files/read", json={"path": "/tmp/by-admin"}).content == b"from admin"
        # The admin's WebSocket routes too (the session cookie is what a browser sends).
        with httpx.Client(base_url=platform.base_url, headers={"Cookie": f"wrenn_sid={admin.cookies['wrenn_sid']}"}) as wc:
            with httpx_ws.connect_ws(f"/v1/admin/capsules/{cid}/exec/stream", wc) as s:
                s.send_text(json.dumps({"type": "start", "cmd": "echo over-ws"}))
                events = []
                while not events or events[-1]["type"] not in ("exit", "error"):
                    events.append(s.receive_json())
            assert "".join(e.get("data", "") for e in events if e["type"] == "stdout") == "over-ws\n", events
        # Create on behalf of a team.
        err(admin.post("/v1/admin/capsules", params={"team_id": "team-nope"}, json={}), 404, "not_found")
        r = admin.post("/v1/admin/capsules", params={"team_id": a.me["team_id"]}, json={"timeout_sec": 300})
        assert r.status_code == 201, r.text
        wait_status(ak, r.json()["id"], {"running"})
        # Deleting the team destroys its capsules.
        assert a.delete(f"/v1/teams/{a.me['team_id']}").status_code == 204
        assert admin.get(f"/v1/admin/capsules/{cid}").json()["status"] in ("stopped", "stopping")
        err(ak.get("/v1/capsules"), 401, "unauthorized")


def test_admin_users_and_teams(platform, mail_sink):
    admin = admin_browser(platform)
    u = new_user(platform, mail_sink)
    users = admin.get("/v1/admin/users").json()
    row = next(x for x in users if x["email"] == u.email)
    assert row["status"] == "active" and row["is_admin"] is False and row["teams"] == 1
    uid = u.me["user_id"]
    assert admin.put(f"/v1/admin/users/{uid}/admin", json={"admin": True}).status_code == 204
    assert u.get("/v1/admin/users").status_code == 200, "admin on the very next request"
    assert admin.put(f"/v1/admin/users/{uid}/admin", json={"admin": False}).status_code == 204
    err(u.get("/v1/admin/users"), 403, "forbidden")
    err(admin.put("/v1/admin/users/usr-nope/admin", json={"admin": True}), 404, "not_found")
    err(admin.put(f"/v1/admin/users/{admin.me['user_id']}/active", json={"active": False}), 400, "invalid_request")
    # Deactivation revokes sessions and keys.
    key = u.post("/v1/api-keys", json={}).json()["key"]
    assert admin.put(f"/v1/admin/users/{uid}/active", json={"active": False}).status_code == 204
    err(u.get("/v1/me"), 401, "unauthorized")
    err(httpx.get(platform.base_url + "/v1/capsules", headers={"X-API-Key": key}), 401, "unauthorized")
    err(Browser(platform.base_url).post("/v1/auth/login", json={"email": u.email, "password": u.password}), 403, "account_deactivated")
    assert admin.put(f"/v1/admin/users/{uid}/active", json={"active": True}).status_code == 204
    assert Browser(platform.base_url).post("/v1/auth/login", json={"email": u.email, "password": u.password}).status_code == 200
    # Teams: list, BYOC on (never off), delete.
    teams = admin.get("/v1/admin/teams").json()
    t = next(x for x in teams if x["id"] == u.me["team_id"])
    assert t["owner_email"] == u.email and t["members"] == 1 and t["byoc"] is False
    assert admin.put(f"/v1/admin/teams/{t['id']}/byoc", json={"byoc": True}).status_code == 204
    err(admin.put(f"/v1/admin/teams/{t['id']}/byoc", json={"byoc": False}), 400, "invalid_request")
    assert admin.delete(f"/v1/admin/teams/{t['id']}").status_code == 204
    err(admin.delete(f"/v1/admin/teams/{t['id']}"), 404, "not_found")
    err(u.get("/v1/admin/teams"), 401, "unauthorized")


def test_delete_account(platform, mail_sink):
    a = new_user(platform, mail_sink)
    err(a.request("DELETE", "/v1/me", json={"confirmation": "someone@else"}), 400, "invalid_request")
    friend = new_user(platform, mail_sink)
    assert a.post(f"/v1/teams/{a.me['team_id']}/members", json={"email": friend.email}).status_code == 201
    err(a.request("DELETE", "/v1/me", json={"confirmation": a.email.upper()}), 409, "owns_team_with_members")
    assert a.delete(f"/v1/teams/{a.me['team_id']}/members/{friend.me['user_id']}").status_code == 204
    r = a.request("DELETE", "/v1/me", json={"confirmation": a.email.upper()})
    assert r.status_code == 204
    err(a.get("/v1/me"), 401, "unauthorized")
    err(Browser(platform.base_url).post("/v1/auth/login", json={"email": a.email, "password": a.password}), 401, "unauthorized")
    # The address is free again.
    new_user(platform, mail_sink, email=a.email)


def _oauth_start(platform, browser=None):
    b = browser or Browser(platform.base_url)
    r = b.get("/auth/oauth/github")
    assert r.status_code in (302, 303, 307), r.text
    loc = urllib.parse.urlparse(r.headers["location"])
    q = urllib.parse.parse_qs(loc.query)
    state_cookie = attrs(next(h for h in r.headers.get_list("set-cookie") if h.startswith("wrenn_oauth_state=")))
    assert state_cookie["httponly"] is True and state_cookie["samesite"] == "Lax"
    return b, loc, q


def _callback(platform, b, **params):
    r = b.get("/auth/oauth/github/callback", params=params)
    assert r.status_code in (302, 303, 307), r.text
    return r.headers["location"]


def test_github_oauth_against_a_local_stand_in(platform, mail_sink, github):
    b, loc, q = _oauth_start(platform)
    assert f"{loc.scheme}://{loc.netloc}" == github.base_url and loc.path == "/login/oauth/authorize"
    assert q["client_id"] == ["test-client"] and q["redirect_uri"] == [platform.public_url + "/auth/oauth/github/callback"]
    state = q["state"][0]
    done = platform.public_url + "/auth/github/callback"
    # Error paths.
    assert _callback(platform, b, error="access_denied", state=state) == done + "?error=access_denied"
    b, _, q = _oauth_start(platform)
    assert _callback(platform, b, code="x", state="forged") == done + "?error=invalid_state"
    b, _, q = _oauth_start(platform)
    assert _callback(platform, b, state=q["state"][0]) == done + "?error=missing_code"
    b, _, q = _oauth_start(platform)
    assert _callback(platform, b, code="bad", state=q["state"][0]) == done + "?error=exchange_failed"
    # A state is single use and bound to the browser's cookie.
    b, _, q = _oauth_start(platform)
    other = Browser(platform.base_url)
    assert _callback(platform, other, code="x", state=q["state"][0]) == done + "?error=invalid_state"

    # A new user: account, team and session from the GitHub profile (email from /user/emails).
    gh_email = f"octo{secrets.token_hex(4)}@example.test"
    github.profiles["code-new"] = {"id": 4242 + len(github.profiles), "login": "octo", "name": "Octo Cat", "email": gh_email}
    b, _, q = _oauth_start(platform)
    assert _callback(platform, b, code="code-new", state=q["state"][0]) == done
    me = b.get("/v1/me").json()
    assert me["email"] == gh_email and me["name"] == "Octo Cat" and me["has_password"] is False and me["providers"] == ["github"]
    # The only way in cannot be disconnected; adding a password needs the confirmation.
    err(b.delete("/v1/me/providers/github"), 400, "last_login_method")
    err(b.post("/v1/me/password", json={"new_password": "password-9", "confirm_password": "password-8"}), 400, "invalid_request")
    assert b.post("/v1/me/password", json={"new_password": "password-9", "confirm_password": "password-9"}).status_code == 204
    # Logging in again through GitHub finds the same account.
    b2, _, q = _oauth_start(platform)
    assert _callback(platform, b2, code="code-new", state=q["state"][0]) == done
    assert b2.get("/v1/me").json()["user_id"] == me["user_id"]
    assert b2.delete("/v1/me/providers/github").status_code == 204
    err(b2.delete("/v1/me/providers/github"), 404, "provider_not_found")

    # A GitHub email that already has an account is not taken over.
    taken = new_user(platform, mail_sink)
    github.profiles["code-taken"] = {"id": 9000 + len(github.profiles), "login": "t", "name": None, "public_email": taken.email, "email": taken.email}
    b3, _, q = _oauth_start(platform)
    assert _callback(platform, b3, code="code-taken", state=q["state"][0]) == done + "?error=email_taken"
    # …but its owner can connect it from their settings.
    r = taken.get("/v1/me/providers/github/connect")
    assert r.status_code == 200
    cq = urllib.parse.parse_qs(urllib.parse.urlparse(r.json()["auth_url"]).query)
    taken.absorb(r)
    assert _callback(platform, taken, code="code-taken", state=cq["state"][0]) == done
    assert taken.get("/v1/me").json()["providers"] == ["github"]
    # Unknown providers.
    err(taken.get("/v1/me/providers/gitlab/connect"), 404, "provider_not_found")
    err(httpx.get(platform.base_url + "/auth/oauth/gitlab"), 404, "provider_not_found")
    err(httpx.get(platform.base_url + "/auth/oauth/gitlab/callback?code=x&state=y"), 404, "provider_not_found")


def test_login_attempts_are_rate_limited_per_email(platform):
    email = f"brute{secrets.token_hex(4)}@example.test"
    b = Browser(platform.base_url)
    codes = [b.post("/v1/auth/login", json={"email": email, "password": "guess-guess"}).status_code for _ in range(12)]
    assert codes[:10] == [401] * 10 and codes[10:] == [429, 429], codes
    err(b.post("/v1/auth/login", json={"email": email, "password": "guess-guess"}), 429, "rate_limited")
