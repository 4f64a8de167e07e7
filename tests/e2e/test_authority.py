"""Authority that changes while a caller holds it: streams end when their credential no longer
holds, API keys die with their creator's membership, browser WebSockets must come from the
platform's origin, and malformed query strings and paths answer the JSON error envelope."""

import json
import os
import threading
import time

import httpx
import httpx_ws
import pytest

from conftest import new_user
from tests.support.waits import wait_status


def err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert r.json()["error"]["code"] == code, r.text


class SseLines:
    """Reads an SSE stream in a thread; `done` is set when the server ends it."""

    def __init__(self, url, headers):
        self.lines, self.status, self.done = [], None, threading.Event()
        threading.Thread(target=self.run, args=(url, headers), daemon=True).start()

    def run(self, url, headers):
        try:
            with httpx.Client(timeout=httpx.Timeout(10, read=None)) as c, c.stream("GET", url, headers=headers) as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError:
            pass
        self.done.set()

    def wait_for(self, text, timeout=15):
        deadline = time.time() + timeout
        while not any(text in line for line in self.lines):
            assert time.time() < deadline, f"{text!r} never came: {self.lines[-5:]}"
            time.sleep(0.1)


def ws_upgrade_headers(**extra):
    return {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
            "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", **extra}


def test_query_and_path_rejections_answer_the_error_envelope(platform, api):
    # A duplicated query key, a value of the wrong type, and a path that is not UTF-8.
    err(api.get("/v1/capsules/cl-nothing/metrics?range=5m&range=1h"), 400, "invalid_request")
    err(api.get("/v1/snapshots?type=a&type=b"), 400, "invalid_request")
    err(api.get("/v1/capsules/%FF%FE/processes"), 400, "invalid_request")


def test_a_foreign_origin_cannot_open_a_websocket_with_a_session(platform, mail_sink):
    b = new_user(platform, mail_sink)
    cookie = {"Cookie": f"wrenn_sid={b.cookies['wrenn_sid']}"}
    url = platform.base_url + "/v1/capsules/cl-nothing0000000000000000000/pty"
    r = httpx.get(url, headers=ws_upgrade_headers(Origin="https://evil.example", **cookie))
    err(r, 403, "forbidden")
    assert "evil.example" in r.json()["error"]["message"]
    # From the platform's own origin, or with no Origin (SDKs), the request goes on (and finds no
    # such capsule).
    err(httpx.get(url, headers=ws_upgrade_headers(Origin=platform.base_url, **cookie)), 404, "not_found")
    err(httpx.get(url, headers=ws_upgrade_headers(**cookie)), 404, "not_found")
    # API keys are not sent by browsers on their own: no Origin rule applies to them.
    api_key = {"X-API-Key": platform.api_key}
    err(httpx.get(url, headers=ws_upgrade_headers(Origin="https://evil.example", **api_key)), 404, "not_found")


@pytest.fixture
def team_capsule(platform, mail_sink):
    """A new account's browser, an API key of its own team and a running capsule made with it."""
    owner = new_user(platform, mail_sink)
    r = owner.post("/v1/api-keys", json={"name": "revocable"})
    assert r.status_code == 201, r.text
    key = r.json()
    with httpx.Client(base_url=platform.base_url, headers={"X-API-Key": key["key"]}, timeout=60) as c:
        r = c.post("/v1/capsules", json={})
        assert r.status_code == 202, r.text
        cap = wait_status(c, r.json()["id"], {"running", "error"})
        assert cap["status"] == "running", cap
        yield owner, key, cap
    # Through the session: the test may have deleted the key.
    assert owner.delete(f"/v1/capsules/{cap['id']}").status_code == 202


def test_streams_end_when_their_api_key_is_deleted(platform, team_capsule):
    owner, key, cap = team_capsule
    headers = {"X-API-Key": key["key"]}
    events = SseLines(platform.base_url + "/v1/events/stream", headers)
    events.wait_for("event: connected")
    with httpx.Client(base_url=platform.base_url, headers=headers, timeout=60) as c, \
            httpx_ws.connect_ws(f"/v1/capsules/{cap['id']}/exec/stream", c) as s:
        s.send_text(json.dumps({"type": "start", "cmd": "/bin/sleep", "args": ["300"]}))
        assert s.receive_json()["type"] == "start"
        assert owner.delete(f"/v1/api-keys/{key['id']}").status_code == 204
        t0 = time.time()
        e = s.receive_json(timeout=15)
        assert e["type"] == "error" and "API key deleted" in e["data"], e
        with pytest.raises(httpx_ws.WebSocketDisconnect) as closed:
            s.receive_text(timeout=5)
        assert closed.value.code == 1008, closed.value
        assert time.time() - t0 < 10
    events.wait_for("event: revoked")
    assert events.done.wait(5), "the SSE stream stays open after its key was deleted"
    # The key itself is refused from now on.
    err(httpx.get(platform.base_url + "/v1/capsules", headers=headers), 401, "unauthorized")


def test_a_removed_members_key_and_session_streams_stop(platform, mail_sink, team_capsule):
    owner, _, cap = team_capsule
    team = owner.me["team_id"]
    member = new_user(platform, mail_sink)
    assert owner.post(f"/v1/teams/{team}/members", json={"email": member.email}).status_code == 201
    assert member.post("/v1/auth/switch-team", json={"team_id": team}).status_code == 200
    key = member.post("/v1/api-keys", json={"name": "mine"}).json()["key"]
    headers = {"X-API-Key": key}
    assert httpx.get(f"{platform.base_url}/v1/capsules/{cap['id']}", headers=headers).status_code == 200
    session = SseLines(platform.base_url + "/v1/events/stream", {"Cookie": f"wrenn_sid={member.cookies['wrenn_sid']}"})
    session.wait_for("event: connected")
    r = owner.delete(f"/v1/teams/{team}/members/{member.me['user_id']}")
    assert r.status_code == 204, r.text
    r = httpx.get(f"{platform.base_url}/v1/capsules/{cap['id']}", headers=headers)
    err(r, 401, "unauthorized")
    assert "left the team" in r.json()["error"]["message"]
    session.wait_for("event: revoked")
    assert any("no longer a member" in line for line in session.lines), session.lines[-3:]
    assert session.done.wait(5)


def test_secrets_at_rest_are_sealed_and_owner_only(platform, api):
    import sqlite3
    import stat

    def mode(p):
        return stat.S_IMODE(os.stat(p).st_mode)

    assert mode(platform.data_dir) == 0o700
    for f in ("wrenn.db", "encryption.key", "bootstrap.json"):
        assert mode(platform.data_dir / f) == 0o600, f
    # The host CA's key and the token keys are stored sealed with the platform key.
    assert api.get("/v1/capsules").status_code == 200
    db = sqlite3.connect(platform.data_dir / "wrenn.db")
    rows = db.execute("SELECT name, value FROM platform_secrets").fetchall()
    db.close()
    assert {"host_ca", "host_token_key"} <= {n for n, _ in rows}, rows
    for name, value in rows:
        assert value.startswith("sealed:") and "PRIVATE KEY" not in value, name
