"""Notification channels and the audit log, against a real local HTTP receiver.

Channels: CRUD and validation, configs sealed at rest, every provider's request shape (through
the test endpoint), events delivered to a subscribed webhook with a signature the receiver
verifies, retries (a receiver that fails twice gets the event once), failures recorded.
Audit: every action of a team's day lands in its log; pages follow their cursor; members see
team scope, owners and admins also admin scope; the admin log sees every team."""

import calendar
import hashlib
import hmac
import json
import sqlite3
import time

import pytest

from conftest import admin_browser, new_user
from tests.support.waits import wait_status

ALL_EVENTS = [
    "capsule.create",
    "capsule.pause",
    "capsule.resume",
    "capsule.destroy",
    "template.snapshot.create",
    "template.snapshot.delete",
    "host.up",
    "host.down",
]


def error_code(r):
    return r.json()["error"]["code"]


def verify(req, secret):
    """The receiver's side of the webhook contract: `X-Wrenn-Signature` is `sha256=` and the hex
    HMAC-SHA256, under the channel's secret, of `X-Wrenn-Timestamp` (RFC 3339 UTC), "." and the
    body; `X-Wrenn-Delivery` is a UUID; the body is the event's JSON."""
    h = req["headers"]
    ts = h["x-wrenn-timestamp"]
    want = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(h["x-wrenn-signature"], want), "bad signature"
    assert ts.endswith("Z") and abs(time.time() - calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%SZ"))) < 120
    assert len(h["x-wrenn-delivery"]) == 36
    return json.loads(req["body"])


def team_key(browser):
    r = browser.post("/v1/api-keys", json={"name": "ci"})
    assert r.status_code == 201, r.text
    return r.json()["key"]


def test_channel_crud_validation_and_sealed_config(platform, mail_sink, receiver):
    owner = new_user(platform, mail_sink)
    url = receiver.base_url + "/hook/crud"
    r = owner.post("/v1/channels", json={"name": "  Ops Alerts ", "provider": "webhook", "config": {"url": url}, "events": ["capsule.create", "capsule.create"]})
    assert r.status_code == 201, r.text
    ch = r.json()
    assert ch["id"].startswith("ch-") and ch["name"] == "ops-alerts" and ch["provider"] == "webhook"
    tid = owner.get("/v1/me").json()["team_id"]
    assert ch["events"] == ["capsule.create"] and ch["team_id"] == tid
    secret = ch["secret"]
    assert len(secret) == 64 and int(secret, 16) >= 0, "generated: 32 random bytes as hex"
    # Never shown again.
    assert not owner.get(f"/v1/channels/{ch['id']}").json().get("secret")
    listed = owner.get("/v1/channels").json()
    assert [c["id"] for c in listed] == [ch["id"]] and not listed[0].get("secret")
    # Sealed at rest: neither the URL nor the secret is in the database file's row.
    db = sqlite3.connect(platform.data_dir / "wrenn.db")
    (sealed,) = db.execute("SELECT config FROM channels WHERE id = ?", (ch["id"],)).fetchone()
    db.close()
    assert "hook/crud" not in sealed and secret not in sealed and set(json.loads(sealed)) == {"url", "secret"}

    # Validation: each wrong input a 400 naming what is wrong; a taken name 409.
    bad = [
        ({"name": "x", "provider": "slack", "config": {}, "events": ["capsule.create"]}, "webhook_url"),
        ({"name": "x", "provider": "matrix", "config": {"homeserver_url": "http://h", "room_id": "!r"}, "events": ["host.up"]}, "access_token"),
        ({"name": "x", "provider": "telegram", "config": {"bot_token": "1:a"}, "events": ["host.up"]}, "chat_id"),
        ({"name": "x", "provider": "email", "config": {}, "events": ["host.up"]}, "provider"),
        ({"name": "x", "provider": "webhook", "config": {"url": url}, "events": ["capsule.exploded"]}, "event"),
        ({"name": "x", "provider": "webhook", "config": {"url": url}, "events": []}, "event"),
        ({"name": "x", "provider": "webhook", "config": {"url": "file:///etc/passwd"}, "events": ["host.up"]}, "url"),
        ({"name": "x", "provider": "webhook", "config": {"url": url, "colour": "red"}, "events": ["host.up"]}, "colour"),
        ({"name": "-x", "provider": "webhook", "config": {"url": url}, "events": ["host.up"]}, "name"),
        ({"name": "x", "provider": "webhook", "config": {"url": url, "secret": "short"}, "events": ["host.up"]}, "secret"),
    ]
    for body, word in bad:
        r = owner.post("/v1/channels", json=body)
        assert r.status_code == 400, (body, r.text)
        assert error_code(r) == "invalid_request" and word in r.json()["error"]["message"], (body, r.text)
    r = owner.post("/v1/channels", json={"name": "OPS-ALERTS", "provider": "slack", "config": {"webhook_url": url}, "events": ["host.up"]})
    assert r.status_code == 409 and error_code(r) == "conflict"

    # Update: name and events; rotate: a new config (and, for a webhook, a new secret shown once).
    r = owner.patch(f"/v1/channels/{ch['id']}", json={"name": "ops", "events": ["capsule.pause", "host.down"]})
    assert r.status_code == 200 and r.json()["name"] == "ops" and r.json()["events"] == ["capsule.pause", "host.down"]
    r = owner.put(f"/v1/channels/{ch['id']}/config", json={"config": {"url": url + "/v2"}})
    assert r.status_code == 200, r.text
    assert r.json()["secret"] and r.json()["secret"] != secret
    r = owner.put(f"/v1/channels/{ch['id']}/config", json={"config": {"webhook_url": url}})
    assert r.status_code == 400 and "webhook_url" in r.json()["error"]["message"]

    # Other teams see nothing; members read but do not change.
    other = new_user(platform, mail_sink)
    assert other.get(f"/v1/channels/{ch['id']}").status_code == 404
    assert other.delete(f"/v1/channels/{ch['id']}").status_code == 404
    assert other.get("/v1/channels").json() == []
    assert owner.post(f"/v1/teams/{tid}/members", json={"email": other.email}).status_code in (200, 201)
    r = other.post("/v1/auth/switch-team", json={"team_id": ch["team_id"]})
    assert r.status_code == 200, r.text
    assert [c["id"] for c in other.get("/v1/channels").json()] == [ch["id"]]
    assert other.patch(f"/v1/channels/{ch['id']}", json={"name": "mine", "events": ["host.up"]}).status_code == 403
    assert other.post("/v1/channels/test", json={"provider": "webhook", "config": {"url": url}}).status_code == 403
    # API keys are for capsules; channels need a session.
    assert platform.client().get("/v1/channels").status_code == 401

    assert owner.delete(f"/v1/channels/{ch['id']}").status_code == 204
    assert owner.get(f"/v1/channels/{ch['id']}").status_code == 404
    assert owner.delete(f"/v1/channels/{ch['id']}").status_code == 404


def test_every_provider_gets_its_own_format(platform, mail_sink, receiver):
    owner = new_user(platform, mail_sink)
    base = receiver.base_url
    cases = {
        "slack": {"webhook_url": base + "/p/slack"},
        "discord": {"webhook_url": base + "/p/discord"},
        "teams": {"webhook_url": base + "/p/teams"},
        "googlechat": {"webhook_url": base + "/p/googlechat"},
        "telegram": {"bot_token": "123456:ABC-def_9", "chat_id": "-1001"},
        "matrix": {"homeserver_url": base + "/p/matrix", "access_token": "syt_secret", "room_id": "!room:example.org"},
        "webhook": {"url": base + "/p/webhook", "secret": "s" * 32},
    }
    for provider, config in cases.items():
        r = owner.post("/v1/channels/test", json={"provider": provider, "config": config})
        assert r.status_code == 200 and r.json() == {"status": "ok"}, (provider, r.text)
    body = lambda prefix: json.loads(receiver.requests(prefix)[-1]["body"])  # noqa: E731
    assert "Test notification" in body("/p/slack")["text"]
    assert "Test notification" in body("/p/discord")["content"] and body("/p/discord")["allowed_mentions"] == {"parse": []}
    assert body("/p/teams")["@type"] == "MessageCard" and "Test notification" in body("/p/teams")["text"]
    assert "Test notification" in body("/p/googlechat")["text"]
    tg = receiver.requests("/telegram/bot123456:ABC-def_9/sendMessage")[-1]
    assert json.loads(tg["body"])["chat_id"] == "-1001" and "Test notification" in json.loads(tg["body"])["text"]
    mx = receiver.requests("/p/matrix/_matrix/client/v3/rooms/%21room%3Aexample.org/send/m.room.message/")[-1]
    assert mx["method"] == "PUT" and mx["headers"]["authorization"] == "Bearer syt_secret"
    assert json.loads(mx["body"])["msgtype"] == "m.text"
    ev = verify(receiver.requests("/p/webhook")[-1], "s" * 32)
    assert ev["event"] == "channel.test" and ev["team_id"] and ev["actor"]["type"] == "user"
    # Nothing was saved.
    assert owner.get("/v1/channels").json() == []
    # A receiver that refuses, or redirects, fails the test with the reason, never the secret.
    r = owner.post("/v1/channels/test", json={"provider": "slack", "config": {"webhook_url": base + "/fail/x"}})
    assert r.status_code == 400 and error_code(r) == "delivery_failed" and "500" in r.json()["error"]["message"]
    r = owner.post("/v1/channels/test", json={"provider": "discord", "config": {"webhook_url": base + "/redirect/x"}})
    assert r.status_code == 400 and "redirect" in r.json()["error"]["message"]
    r = owner.post("/v1/channels/test", json={"provider": "telegram", "config": {"bot_token": "999:TOPSECRET", "chat_id": "1"}})
    assert r.status_code == 200  # the stand-in answers 200 for any bot
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead = s.getsockname()[1]
    s.close()
    r = owner.post("/v1/channels/test", json={"provider": "webhook", "config": {"url": f"http://127.0.0.1:{dead}/TOPSECRET"}})
    assert r.status_code == 400 and "TOPSECRET" not in r.text


def test_team_events_reach_a_signed_webhook_and_the_audit_log(platform, mail_sink, receiver):
    owner = new_user(platform, mail_sink)
    me = owner.get("/v1/me").json()
    path = "/hook/team-" + owner.email.split("@")[0]
    r = owner.post("/v1/channels", json={"name": "all", "provider": "webhook", "config": {"url": receiver.base_url + path}, "events": ALL_EVENTS})
    assert r.status_code == 201, r.text
    ch, secret = r.json(), r.json()["secret"]
    key = team_key(owner)
    api = platform.client(key)
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    wait_status(api, cid, {"running"})
    assert api.post(f"/v1/capsules/{cid}/pause").status_code in (200, 202)
    wait_status(api, cid, {"paused"})
    assert api.post(f"/v1/capsules/{cid}/resume").status_code in (200, 202)
    wait_status(api, cid, {"running"})
    assert api.post("/v1/snapshots", json={"sandbox_id": cid, "name": "aud-snap"}).status_code == 201
    assert api.delete("/v1/snapshots/aud-snap").status_code == 204
    assert api.delete(f"/v1/capsules/{cid}").status_code in (200, 202)
    wait_status(api, cid, {"stopped"})

    got = receiver.wait_for(path, 6)
    time.sleep(1.5)
    events = [verify(req, secret) for req in receiver.requests(path)]
    names = [e["event"] for e in events]
    assert sorted(names) == sorted(ALL_EVENTS[:6]), names
    for e in events:
        assert e["actor"] == {"type": "api_key", "id": e["actor"]["id"], "name": "ci"} and e["actor"]["id"].startswith("key-")
        assert e["outcome"] == "success" and e["timestamp"].endswith("Z")
    assert {e["resource"]["id"] for e in events} == {cid, "aud-snap"}
    assert len({req["headers"]["x-wrenn-delivery"] for req in got}) == len(got)
    # Outcomes are recorded.
    d = owner.get(f"/v1/channels/{ch['id']}/deliveries").json()
    assert len(d) == 6 and all(x["status"] == "delivered" and x["attempts"] == 1 for x in d)

    # The audit log holds the day, newest first, with the key as actor.
    log = owner.get("/v1/audit-logs", params={"limit": 200}).json()
    assert log["next_cursor"] is None
    seen = [(e["resource_type"], e["action"]) for e in log["entries"]]
    for want in [("capsule", "create"), ("capsule", "pause"), ("capsule", "resume"), ("capsule", "destroy"), ("snapshot", "create"), ("snapshot", "delete"), ("api_key", "create"), ("channel", "create")]:
        assert want in seen, seen
    stamps = [(e["created_at"], e["id"]) for e in log["entries"]]
    assert stamps == sorted(stamps, reverse=True)
    cap = next(e for e in log["entries"] if e["resource_type"] == "capsule" and e["action"] == "create")
    assert cap["actor_type"] == "api_key" and cap["actor_name"] == "ci" and cap["status"] == "success" and cap["scope"] == "team"
    assert cap["resource_id"] == cid and cap["id"].startswith("log-")
    chan = next(e for e in log["entries"] if e["resource_type"] == "channel")
    assert chan["actor_type"] == "user" and chan["actor_id"] == me["user_id"] and chan["actor_name"] == owner.email
    # Filters, repeated or comma-separated.
    f = owner.get("/v1/audit-logs", params=[("resource_type", "capsule"), ("action", "pause,resume")]).json()["entries"]
    assert sorted(e["action"] for e in f) == ["pause", "resume"]
    # Another team's log shows none of it.
    other = new_user(platform, mail_sink)
    assert not [e for e in other.get("/v1/audit-logs").json()["entries"] if e["resource_id"] in (cid, "aud-snap")]


def test_a_receiver_that_fails_twice_gets_the_event_once(platform, mail_sink, receiver):
    owner = new_user(platform, mail_sink)
    tag = owner.email.split("@")[0]
    flaky = owner.post("/v1/channels", json={"name": "flaky", "provider": "webhook", "config": {"url": f"{receiver.base_url}/flaky/{tag}"}, "events": ["capsule.create"]}).json()
    dead = owner.post("/v1/channels", json={"name": "dead", "provider": "slack", "config": {"webhook_url": f"{receiver.base_url}/fail/{tag}"}, "events": ["capsule.create"]}).json()
    api = platform.client(team_key(owner))
    started = time.time()
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 202
    cid = r.json()["id"]
    assert time.time() - started < 5, "a failing channel does not slow the API"
    try:
        reqs = receiver.wait_for(f"/flaky/{tag}", 3, timeout=60)
        assert len({q["headers"]["x-wrenn-delivery"] for q in reqs}) == 1, "one delivery, three attempts"
        # Backoff: the configured 1 s then 2 s.
        gaps = [b["at"] - a["at"] for a, b in zip(reqs, reqs[1:])]
        assert gaps[0] >= 0.9 and gaps[1] >= 1.9, gaps
        receiver.wait_for(f"/fail/{tag}", 3, timeout=60)
        deadline = time.time() + 20
        while True:
            f = owner.get(f"/v1/channels/{flaky['id']}/deliveries").json()
            d = owner.get(f"/v1/channels/{dead['id']}/deliveries").json()
            if f and d and f[0]["status"] != "pending" and d[0]["status"] != "pending":
                break
            assert time.time() < deadline, (f, d)
            time.sleep(0.2)
        assert (f[0]["status"], f[0]["attempts"], f[0]["last_error"]) == ("delivered", 3, None)
        assert (d[0]["status"], d[0]["attempts"]) == ("failed", 3) and "500" in d[0]["last_error"]
        time.sleep(2.5)
        assert len(receiver.requests(f"/flaky/{tag}")) == 3 and len(receiver.requests(f"/fail/{tag}")) == 3, "bounded"
        assert verify(receiver.requests(f"/flaky/{tag}")[-1], flaky["secret"])["resource"]["id"] == cid
    finally:
        api.delete(f"/v1/capsules/{cid}")


def test_audit_pages_and_scopes(platform, mail_sink):
    owner = new_user(platform, mail_sink)
    tid = owner.get("/v1/me").json()["team_id"]
    for i in range(7):
        assert owner.post("/v1/api-keys", json={"name": f"k{i}"}).status_code == 201
    # Pages of 3 follow their cursor to the end, without gaps or repeats.
    seen, params = [], {"limit": 3, "resource_type": "api_key"}
    for _ in range(10):
        page = owner.get("/v1/audit-logs", params=params).json()
        assert len(page["entries"]) <= 3
        seen += page["entries"]
        if page["next_cursor"] is None:
            break
        params = {**params, **page["next_cursor"]}
    assert [e["metadata"]["name"] for e in seen] == [f"k{i}" for i in reversed(range(7))]
    assert len({e["id"] for e in seen}) == 7
    for bad in ({"limit": 0}, {"limit": 201}, {"limit": "many"}, {"before": "yesterday"}, {"before_id": "log-x"}):
        r = owner.get("/v1/audit-logs", params=bad)
        assert r.status_code == 400 and error_code(r) == "invalid_request", (bad, r.text)
    assert len(owner.get("/v1/audit-logs").json()["entries"]) <= 50

    # An admin action on the team is admin scope: the owner sees it, a member does not.
    admin = admin_browser(platform)
    assert admin.put(f"/v1/admin/teams/{tid}/byoc", json={"byoc": True}).status_code in (200, 204)
    byoc = [e for e in owner.get("/v1/audit-logs").json()["entries"] if e["action"] == "set_byoc"]
    assert len(byoc) == 1 and byoc[0]["scope"] == "admin" and byoc[0]["actor_name"] == platform.admin_email
    member = new_user(platform, mail_sink)
    assert owner.post(f"/v1/teams/{tid}/members", json={"email": member.email}).status_code in (200, 201)
    assert member.post("/v1/auth/switch-team", json={"team_id": tid}).status_code == 200
    mine = member.get("/v1/audit-logs", params={"limit": 200}).json()["entries"]
    assert mine and all(e["scope"] == "team" for e in mine)
    assert any(e["resource_type"] == "member" and e["action"] == "add" for e in mine)
    # The platform log sees every team; it is for admins only.
    every = admin.get("/v1/admin/audit-logs", params={"limit": 200}).json()["entries"]
    assert any(e["action"] == "set_byoc" and e["resource_id"] == tid for e in every)
    assert owner.get("/v1/admin/audit-logs").status_code == 403
    only = admin.get("/v1/admin/audit-logs", params={"team_id": tid, "limit": 200}).json()["entries"]
    assert only and all(e["team_id"] == tid for e in only)
