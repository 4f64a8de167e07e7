"""Events over SSE: team streams (API key and session), the admin stream, no cross-team leak,
frames as the spec shows them (event + data lines, `connected` first, `: keepalive`), the
official SDK's iterator, and two control planes sharing one Redis stream."""

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import Browser, admin_browser
from tests.support.platform import free_port, wait_serving, wrenn_bin
from tests.support.waits import wait_status


class Reader:
    """Reads an SSE stream in a thread and keeps every line."""

    def __init__(self, url, headers):
        self.lines = []
        self.status = None
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.run, args=(url, headers), daemon=True)
        self.thread.start()

    def run(self, url, headers):
        try:
            with httpx.Client(timeout=httpx.Timeout(10, read=None)) as c, c.stream("GET", url, headers=headers) as r:
                self.status = r.status_code
                self.content_type = r.headers.get("content-type", "")
                for line in r.iter_lines():
                    self.lines.append(line)
        except httpx.HTTPError:
            pass

    def events(self):
        """(name, data) pairs of the frames so far."""
        out, name = [], None
        for line in list(self.lines):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                out.append((name, json.loads(line[5:].strip())))
                name = None
        return out

    def wait(self, pred, timeout=20):
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(pred(n, d) for n, d in self.events()):
                return
            time.sleep(0.1)
        raise AssertionError(f"event never arrived; got {[n for n, _ in self.events()]}")


def about(cid):
    return lambda n, d: d.get("resource", {}).get("id") == cid


def test_capsule_events_reach_their_team_and_admins_only(platform, api):
    url = platform.base_url + "/v1/events/stream"
    mine = Reader(url, {"X-API-Key": platform.api_key})
    other = Reader(url, {"X-API-Key": platform.add_team_with_key()})
    admin = admin_browser(platform)
    admin_all = Reader(platform.base_url + "/v1/admin/events/stream", {"Cookie": f"wrenn_sid={admin.cookies['wrenn_sid']}"})
    session = Reader(url, {"Cookie": f"wrenn_sid={admin.cookies['wrenn_sid']}"})
    from wrenn import WrennClient

    sdk_events = []

    def sdk():
        with WrennClient(api_key=platform.api_key, base_url=platform.base_url) as w:
            for ev in w.events.stream():
                sdk_events.append(ev)

    threading.Thread(target=sdk, daemon=True).start()
    for r in (mine, other, admin_all, session):
        r.wait(lambda n, d: n == "connected")
        assert r.status == 200 and r.content_type.startswith("text/event-stream")
    assert mine.events()[0][0] == "connected", "connected comes first"

    r = api.post("/v1/capsules", json={"timeout_sec": 300})
    cid = r.json()["id"]
    wait_status(api, cid, {"running"})
    assert api.post(f"/v1/capsules/{cid}/pause").status_code in (200, 202)
    wait_status(api, cid, {"paused"})
    assert api.post(f"/v1/capsules/{cid}/resume").status_code in (200, 202)
    wait_status(api, cid, {"running"})
    snap = api.post("/v1/snapshots", json={"sandbox_id": cid, "name": "ev-snap"})
    assert snap.status_code == 201, snap.text
    assert api.delete("/v1/snapshots/ev-snap").status_code == 204
    assert api.delete(f"/v1/capsules/{cid}").status_code in (200, 202)
    wait_status(api, cid, {"stopped"})

    mine.wait(lambda n, d: n == "capsule.destroy" and d["resource"]["id"] == cid)
    # The state change is published right after the action: wait for it too.
    mine.wait(lambda n, d: n == "capsule.state.changed" and d["resource"]["id"] == cid and d["metadata"]["to"] == "stopped")
    got = [(n, d) for n, d in mine.events() if about(cid)(n, d)]
    names = [n for n, _ in got]
    for want in ("capsule.create", "capsule.pause", "capsule.resume", "capsule.destroy"):
        assert want in names, names
        n, d = next((n, d) for n, d in got if n == want)
        assert d["event"] == want and d["outcome"] == "success"
        assert d["actor"]["type"] == "api_key" and d["actor"]["id"].startswith("key-")
        assert d["sandbox"]["id"] == cid and d["timestamp"].endswith("Z")
    changes = [(d["metadata"]["from"], d["metadata"]["to"]) for n, d in got if n == "capsule.state.changed"]
    for step in [("starting", "running"), ("running", "paused"), ("paused", "running"), ("running", "stopped")]:
        assert step in changes, changes
    mine.wait(lambda n, d: n == "template.snapshot.delete" and d["resource"]["id"] == "ev-snap")
    assert any(n == "template.snapshot.create" and d["resource"]["id"] == "ev-snap" for n, d in mine.events())

    # Admins see every team; the session stream sees its team; other teams see nothing of it.
    admin_all.wait(lambda n, d: n == "capsule.destroy" and d["resource"]["id"] == cid)
    session.wait(lambda n, d: n == "capsule.destroy" and d["resource"]["id"] == cid)
    time.sleep(1)
    assert not [1 for n, d in other.events() if about(cid)(n, d) or d.get("resource", {}).get("id") == "ev-snap"]
    # The official SDK parses every frame.
    deadline = time.time() + 10
    while not any(getattr(e.resource, "id", None) == cid and str(getattr(e.event, "value", e.event)) == "capsule.destroy" for e in sdk_events):
        assert time.time() < deadline, [str(e.event) for e in sdk_events]
        time.sleep(0.1)
    # Anonymous callers get 401; non-admins 403 on the admin stream.
    assert httpx.get(url).status_code == 401
    assert httpx.get(platform.base_url + "/v1/admin/events/stream", headers={"X-API-Key": platform.api_key}).status_code == 401
    # A `: keepalive` comment after 30 s without events.
    deadline = time.time() + 40
    while ": keepalive" not in mine.lines:
        assert time.time() < deadline, mine.lines[-3:]
        time.sleep(0.5)


def wrenn():
    return str(wrenn_bin())


@pytest.fixture
def shared_database():
    db = f"wrenn_events_{os.getpid()}"
    admin = os.environ.get("WRENN_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    subprocess.run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], check=True)
    subprocess.run(["psql", admin, "-qc", f"CREATE DATABASE {db}"], check=True)
    yield admin.rsplit("/", 1)[0] + "/" + db
    subprocess.run(["psql", admin, "-qc", f"DROP DATABASE IF EXISTS {db} WITH (FORCE)"], check=True)


def test_two_control_planes_share_events_through_redis(shared_database, receiver, github):
    """Two `wrenn server`s on one database and one Redis: a host's loss is published once (by
    whichever monitor notices first) and reaches the admin streams of both; a channel created
    through one is notified once of events produced on either; each lands once in the audit
    log."""
    procs, urls, logs = [], [], []
    try:
        for i in range(2):
            data_dir = Path(tempfile.mkdtemp(prefix=f"wrenn-cp{i}-"))
            logs.append(data_dir / "server.log")
            port = free_port()
            env = dict(
                os.environ,
                WRENN_DATA_DIR=str(data_dir),
                WRENN_LISTEN=f"127.0.0.1:{port}",
                DATABASE_URL=shared_database,
                REDIS_URL=os.environ.get("WRENN_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
                WRENN_HEARTBEAT_INTERVAL_SEC="1",
                WRENN_ADMIN_PASSWORD="shared-admin-pass",
                # Replicas share the key that seals channel configs.
                WRENN_ENCRYPTION_KEY="5e" * 32,
                WRENN_CHANNEL_ALLOW_PRIVATE_TARGETS="true",
                WRENN_GITHUB_CLIENT_ID="test-client",
                WRENN_GITHUB_CLIENT_SECRET="test-secret",
                WRENN_GITHUB_URL=github.base_url,
                WRENN_GITHUB_API_URL=github.base_url + "/api",
            )
            log = open(data_dir / "server.log", "w")
            procs.append(subprocess.Popen([wrenn(), "server"], env=env, stdout=log, stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
            wait_serving(urls[-1], procs[-1], data_dir / "server.log", timeout=60, what="wrenn server")
        admins = []
        for u in urls:
            b = Browser(u)
            assert b.post("/v1/auth/login", json={"email": "admin@localhost", "password": "shared-admin-pass"}).status_code == 200
            admins.append(b)
        readers = [Reader(u + "/v1/admin/events/stream", {"Cookie": f"wrenn_sid={b.cookies['wrenn_sid']}"}) for u, b in zip(urls, admins)]
        for r in readers:
            r.wait(lambda n, d: n == "connected")
        # A channel of the admin's team, created through the first replica.
        hook = f"/hook/replicas-{os.getpid()}"
        r = admins[0].post("/v1/channels", json={"name": "ops", "provider": "webhook", "config": {"url": receiver.base_url + hook}, "events": ["host.up", "host.down"]})
        assert r.status_code == 201, r.text
        secret = r.json()["secret"]
        # A host that registers on the first and then falls silent.
        token = admins[0].post("/v1/hosts", json={"type": "regular"}).json()["registration_token"]
        reg = httpx.post(urls[0] + "/v1/hosts/register", json={"token": token, "address": "127.0.0.1:7001"}).json()
        hid = reg["host"]["id"]
        for r in readers:
            r.wait(lambda n, d: n == "host.down" and d["resource"]["id"] == hid, timeout=30)
        # Published once: each stream has it once.
        for r in readers:
            assert len([1 for n, d in r.events() if n == "host.down" and d["resource"]["id"] == hid]) == 1
        # Back: a heartbeat through the second control plane; both streams see host.up.
        assert httpx.post(f"{urls[1]}/v1/hosts/{hid}/heartbeat", headers={"X-Host-Token": reg["token"]}).status_code == 204
        for r in readers:
            r.wait(lambda n, d: n == "host.up" and d["resource"]["id"] == hid)
        # It stays up from now on.
        beating = threading.Event()

        def beat():
            while not beating.wait(0.5):
                httpx.post(f"{urls[1]}/v1/hosts/{hid}/heartbeat", headers={"X-Host-Token": reg["token"]})

        threading.Thread(target=beat, daemon=True).start()
        # Each event reached the channel once, whichever replica handled it, signed.
        receiver.wait_for(hook, 2)
        time.sleep(3)
        got = receiver.requests(hook)
        import hashlib
        import hmac

        names = []
        for req in got:
            ts = req["headers"]["x-wrenn-timestamp"]
            sig = "sha256=" + hmac.new(secret.encode(), ts.encode() + b"." + req["body"], hashlib.sha256).hexdigest()
            assert req["headers"]["x-wrenn-signature"] == sig
            ev = json.loads(req["body"])
            assert ev["resource"] == {"id": hid, "type": "host"}
            names.append(ev["event"])
        assert sorted(names) == ["host.down", "host.up"], names
        # And the audit log (either replica) has the host's life once each.
        log = admins[1].get("/v1/admin/audit-logs", params={"resource_type": "host", "limit": 200}).json()["entries"]
        actions = [e["action"] for e in log if e["resource_id"] == hid]
        assert sorted(actions) == ["create", "marked_down", "marked_up"], actions
        assert all(e["scope"] == "admin" and e["team_id"] is None for e in log if e["resource_id"] == hid)
        beating.set()
        # An OAuth flow started on one replica finishes on the other (flows live in the
        # database, not in a replica's memory).
        import secrets as _secrets
        import urllib.parse

        github.profiles["code-replicas"] = {"id": 777000 + os.getpid() % 1000, "login": "repl", "name": "Rep Lica", "email": f"repl{_secrets.token_hex(4)}@example.test"}
        first = Browser(urls[0])
        r = first.get("/auth/oauth/github")
        state = urllib.parse.parse_qs(urllib.parse.urlparse(r.headers["location"]).query)["state"][0]
        second = Browser(urls[1])
        second.cookies = dict(first.cookies)
        r = second.get("/auth/oauth/github/callback", params={"code": "code-replicas", "state": state})
        assert r.status_code in (302, 303, 307) and "error" not in r.headers["location"], r.headers.get("location")
        assert second.get("/v1/me").json()["name"] == "Rep Lica"
        # Single use, on either replica.
        again = Browser(urls[0])
        again.cookies = dict(first.cookies)
        r = again.get("/auth/oauth/github/callback", params={"code": "code-replicas", "state": state})
        assert r.headers["location"].endswith("error=invalid_state")
        # One replica samples team statistics (usage counted once): the lease holder.
        import re

        sampling = [len(re.findall(r"sampling\S*=\S*true", log.read_text())) for log in logs]
        assert sorted(sampling) == [0, 1], sampling
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)


def test_replicas_on_redis_must_share_an_encryption_key(shared_database):
    """Without WRENN_ENCRYPTION_KEY each replica would seal channel secrets with a key of its
    own, and the others could not deliver: `wrenn server` with REDIS_URL refuses to start."""
    data_dir = Path(tempfile.mkdtemp(prefix="wrenn-nokey-"))
    env = dict(
        os.environ,
        WRENN_DATA_DIR=str(data_dir),
        WRENN_LISTEN=f"127.0.0.1:{free_port()}",
        DATABASE_URL=shared_database,
        REDIS_URL=os.environ.get("WRENN_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
    )
    env.pop("WRENN_ENCRYPTION_KEY", None)
    r = subprocess.run([wrenn(), "server"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "WRENN_ENCRYPTION_KEY" in r.stdout + r.stderr
    assert not (data_dir / "encryption.key").exists()
