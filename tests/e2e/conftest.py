"""End-to-end fixtures: one real `wrenn up` (real QEMU VMs, real SQLite file) for the session.

The platform runs from the freshly built binaries with its own data dir, port and network-slot
range, so it never touches a developer's running instance. At the end the fixture stops it and
asserts that nothing is left behind: no VMM process, no network namespace, no socket.
"""

import email
import email.policy
import hashlib
import http.server
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SLOT_BASE = "10.201.100.0"
# The first slot's namespace number (see crates/wrenn-agent/src/net.rs: /30 number within a /10).
_a, _b, _c, _d = (int(x) for x in SLOT_BASE.split("."))
FIRST_TAG = (((_a << 24) | (_b << 16) | (_c << 8) | _d) >> 2) & 0xFFFFF
MAX_SLOTS = 64


def slot_namespaces():
    """Network namespaces inside this test platform's slot range."""
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        if n.startswith("wrenn-s") and n[7:].isdigit() and 0 <= int(n[7:]) - FIRST_TAG < MAX_SLOTS:
            out.append(n)
    return out


def vmm_processes(marker):
    """PIDs of QEMU processes whose command line mentions `marker` (our data dir)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        if b"qemu-system" in cmd and marker.encode() in cmd:
            pids.append(int(p.name))
    return pids


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Platform:
    def __init__(self, base_url, api_key, data_dir, proc):
        self.base_url = base_url
        self.api_key = api_key
        self.data_dir = Path(data_dir)
        self.proc = proc

    def client(self, key=None):
        headers = {} if key == "" else {"X-API-Key": key or self.api_key}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def add_team_with_key(self):
        """A second team and its API key, written straight into the platform's SQLite file."""
        db = sqlite3.connect(self.data_dir / "wrenn.db")
        team_id = "team-" + secrets.token_hex(12)[:25]
        key = "wrn_" + secrets.token_hex(16)
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())
        with db:
            db.execute(
                "INSERT INTO teams (id, name, slug, created_at) VALUES (?, ?, ?, ?)",
                (team_id, "Other", secrets.token_hex(3) + "-" + secrets.token_hex(3), now),
            )
            db.execute(
                "INSERT INTO api_keys (id, team_id, name, key_hash, key_prefix, created_at) VALUES (?, ?, ?, ?, ?, ?)",
                ("key-" + secrets.token_hex(12)[:25], team_id, "other", hashlib.sha256(key.encode()).hexdigest(), key[:10], now),
            )
        db.close()
        return key


def start_platform(data_dir=None, slot_base=SLOT_BASE, max_slots=MAX_SLOTS, destroy_on_exit=True, env_extra=None):
    """Starts `wrenn up` and waits until it serves; `data_dir` may hold a previous run's state."""
    wrenn = Path(os.environ.get("WRENN_BIN", ROOT / "target/debug/wrenn"))
    envd = Path(os.environ.get("WRENN_ENVD", ROOT / "target/x86_64-unknown-linux-gnu/release/envd"))
    assert wrenn.is_file(), f"build the platform first: {wrenn}"
    assert envd.is_file(), f"build envd first: {envd}"
    data_dir = data_dir or tempfile.mkdtemp(prefix="wrenn-e2e-")
    port = free_port()
    env = dict(
        os.environ,
        WRENN_DATA_DIR=str(data_dir),
        WRENN_LISTEN=f"127.0.0.1:{port}",
        WRENN_IMAGES_DIR=os.environ.get("WRENN_IMAGES_DIR", str(ROOT / "target/wrenn-images")),
        WRENN_ENVD=str(envd),
        WRENN_SLOT_BASE=slot_base,
        WRENN_MAX_SLOTS=str(max_slots),
        WRENN_DESTROY_ON_EXIT="true" if destroy_on_exit else "false",
        RUST_LOG=os.environ.get("RUST_LOG", "info"),
    )
    env.pop("DATABASE_URL", None)  # SQLite under the data dir unless a test asks otherwise
    env.update(env_extra or {})
    log = open(Path(data_dir) / "wrenn-up.log", "a")
    proc = subprocess.Popen([str(wrenn), "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 900  # the first start may build guest images
    bootstrap = Path(data_dir) / "bootstrap.json"
    while True:
        assert proc.poll() is None, "wrenn up exited:\n" + (Path(data_dir) / "wrenn-up.log").read_text()[-4000:]
        assert time.time() < deadline, "wrenn up did not come up"
        if bootstrap.exists():
            try:
                httpx.get(base_url + "/openapi.yaml", timeout=2)
                break
            except httpx.HTTPError:
                pass
        time.sleep(0.2)
    b = json.loads(bootstrap.read_text())
    p = Platform(base_url, b["api_key"], data_dir, proc)
    p.log = log
    p.admin_email = b["admin_email"]
    # Printed once, on the start that created the admin (stdout is the log; wait for the line).
    p.admin_password = None
    for _ in range(50):
        m = re.findall(r"password: ([0-9a-f]{24})", (Path(data_dir) / "wrenn-up.log").read_text())
        if m or "Wrenn is up" in (Path(data_dir) / "wrenn-up.log").read_text():
            p.admin_password = m[-1] if m else None
            break
        time.sleep(0.1)
    return p


class Browser:
    """What a browser does with the session: keeps the cookies (by hand: they are `Secure` and
    this is plain http, so an HTTP client's jar would not send them) and sends the CSRF token
    header on state-changing requests, as the dashboard does."""

    def __init__(self, base_url):
        self.http = httpx.Client(base_url=base_url, timeout=60, follow_redirects=False)
        self.cookies = {}
        self.set_cookie_headers = []

    def absorb(self, r):
        for h in r.headers.get_list("set-cookie"):
            self.set_cookie_headers.append(h)
            name, rest = h.split("=", 1)
            value = rest.split(";", 1)[0]
            if "Max-Age=0" in h:
                self.cookies.pop(name, None)
            else:
                self.cookies[name] = value

    def request(self, method, url, csrf=True, **kw):
        headers = dict(kw.pop("headers", None) or {})
        if self.cookies:
            headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        if csrf and method not in ("GET", "HEAD") and "wrenn_csrf" in self.cookies:
            headers.setdefault("X-CSRF-Token", self.cookies["wrenn_csrf"])
        r = self.http.request(method, url, headers=headers, **kw)
        self.http.cookies.clear()
        self.absorb(r)
        return r

    def get(self, url, **kw):
        return self.request("GET", url, **kw)

    def post(self, url, **kw):
        return self.request("POST", url, **kw)

    def put(self, url, **kw):
        return self.request("PUT", url, **kw)

    def patch(self, url, **kw):
        return self.request("PATCH", url, **kw)

    def delete(self, url, **kw):
        return self.request("DELETE", url, **kw)


def new_user(platform, mail_sink, email=None, password="password-1", name="Tess"):
    """Signs a new account up, activates it from its mail and returns the logged-in browser."""
    email = email or f"u{secrets.token_hex(5)}@example.test"
    b = Browser(platform.base_url)
    r = b.post("/v1/auth/signup", json={"email": email, "password": password, "name": name})
    assert r.status_code == 201, r.text
    token = mail_sink.link_token(email, "/activate")
    r = b.post("/v1/auth/activate", json={"token": token})
    assert r.status_code == 200, r.text
    b.email, b.password, b.me = email, password, r.json()
    return b


def admin_browser(platform):
    """The bootstrap admin, logged in with the password `wrenn up` printed."""
    assert platform.admin_password, "wrenn up printed no admin password"
    b = Browser(platform.base_url)
    r = b.post("/v1/auth/login", json={"email": platform.admin_email, "password": platform.admin_password})
    assert r.status_code == 200, r.text
    b.me = r.json()
    return b


def stop_platform(p):
    """Stops `wrenn up` cleanly and asserts that nothing is left behind."""
    p.proc.send_signal(signal.SIGTERM)
    try:
        p.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        p.proc.kill()
        raise
    p.log.close()
    assert p.proc.returncode == 0, (p.data_dir / "wrenn-up.log").read_text()[-4000:]
    assert vmm_processes(str(p.data_dir)) == [], "VMM processes left running"
    assert not any((p.data_dir / "capsules").iterdir()), "capsule directories left behind"


class MailSink:
    """A real SMTP listener (aiosmtpd) that keeps every message it receives."""

    def __init__(self):
        self.messages = []

    async def handle_DATA(self, server, session, envelope):
        self.messages.append(email.message_from_bytes(envelope.content, policy=email.policy.default))
        return "250 OK"

    def wait_for(self, to, contains, timeout=15):
        """The newest message to `to` whose body contains `contains`; waits for it."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for m in reversed(self.messages):
                body = m.get_body(("plain",)).get_content()
                if m["To"] == to and contains in body:
                    return m, body
            time.sleep(0.1)
        raise AssertionError(f"no mail to {to} containing {contains!r}")

    def link_token(self, to, path):
        _, body = self.wait_for(to, path + "?token=")
        return re.search(re.escape(path) + r"\?token=([0-9a-f]{32})", body).group(1)


@pytest.fixture(scope="session")
def mail_sink():
    from aiosmtpd.controller import Controller

    sink = MailSink()
    ctl = Controller(sink, hostname="127.0.0.1", port=free_port())
    ctl.start()
    sink.port = ctl.port
    yield sink
    ctl.stop()


class GitHubStandIn(http.server.ThreadingHTTPServer):
    """GitHub's three OAuth endpoints, served locally: an authorization code names a profile in
    `profiles`; the code `bad` makes the token exchange fail."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _GitHubHandler)
        self.profiles = {}
        self.tokens = {}


class _GitHubHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _json(self, status, obj):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        n = int(self.headers.get("Content-Length", 0))
        form = urllib.parse.parse_qs(self.rfile.read(n).decode())
        if self.path != "/login/oauth/access_token" or form.get("client_id") != ["test-client"] or form.get("client_secret") != ["test-secret"]:
            return self._json(404, {"error": "not found"})
        code = form.get("code", [""])[0]
        if code not in self.server.profiles:
            return self._json(401, {"error": "bad_verification_code"})
        token = "gho_" + secrets.token_hex(8)
        self.server.tokens[token] = self.server.profiles[code]
        self._json(200, {"access_token": token, "token_type": "bearer", "scope": "read:user,user:email"})

    def do_GET(self):
        auth = self.headers.get("Authorization", "")
        profile = self.server.tokens.get(auth.removeprefix("Bearer "))
        if profile is None:
            return self._json(401, {"message": "Bad credentials"})
        if self.path == "/api/user":
            return self._json(200, {"id": profile["id"], "login": profile["login"], "name": profile.get("name"), "email": profile.get("public_email")})
        if self.path == "/api/user/emails":
            return self._json(200, [{"email": profile["email"], "primary": True, "verified": True}])
        self._json(404, {"message": "Not Found"})


@pytest.fixture(scope="session")
def github():
    srv = GitHubStandIn()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()


class Receiver(http.server.ThreadingHTTPServer):
    """A real local HTTP server standing in for notification receivers (webhooks, chat
    providers' incoming webhooks, Telegram's bot API, a Matrix homeserver). It records every
    request. Paths choose the answer: `/flaky/<key>` fails twice per key then succeeds,
    `/fail/...` always answers 500, `/redirect/...` 302; anything else 200."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ReceiverHandler)
        self.received = []
        self.failures = {}
        self.lock = threading.Lock()

    def requests(self, prefix):
        with self.lock:
            return [r for r in self.received if r["path"].startswith(prefix)]

    def wait_for(self, prefix, n=1, timeout=30):
        deadline = time.time() + timeout
        while time.time() < deadline:
            got = self.requests(prefix)
            if len(got) >= n:
                return got
            time.sleep(0.1)
        raise AssertionError(f"{prefix}: {len(self.requests(prefix))} requests, wanted {n}")


class _ReceiverHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _handle(self):
        n = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(n)
        rec = {"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body, "at": time.time()}
        status = 200
        with self.server.lock:
            self.server.received.append(rec)
            if self.path.startswith("/flaky/"):
                k = self.server.failures.get(self.path, 0)
                if k < 2:
                    self.server.failures[self.path] = k + 1
                    status = 500
            elif self.path.startswith("/fail/"):
                status = 500
            elif self.path.startswith("/redirect/"):
                status = 302
        out = b'{"ok":true}' if status == 200 else b"receiver says no"
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/elsewhere")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    do_POST = _handle
    do_PUT = _handle


@pytest.fixture(scope="session")
def receiver():
    srv = Receiver()
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    srv.base_url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()


@pytest.fixture(scope="session")
def platform(mail_sink, github, receiver):
    p = start_platform(
        env_extra={
            "WRENN_SMTP_URL": f"smtp://127.0.0.1:{mail_sink.port}",
            "WRENN_GITHUB_CLIENT_ID": "test-client",
            "WRENN_GITHUB_CLIENT_SECRET": "test-secret",
            "WRENN_GITHUB_URL": github.base_url,
            "WRENN_GITHUB_API_URL": github.base_url + "/api",
            # Many accounts sign up from 127.0.0.1 in one run; the per-email limit is tested.
            "WRENN_AUTH_IP_LIMIT": "100000",
            # Hosts silent for 3 intervals are unreachable: short, so the test sees it happen.
            "WRENN_HEARTBEAT_INTERVAL_SEC": "2",
            "WRENN_RECONCILE_INTERVAL_SEC": "3",
            # Notifications: Telegram's API is the local receiver; retries come quickly.
            "WRENN_TELEGRAM_API_URL": receiver.base_url + "/telegram",
            "WRENN_CHANNEL_RETRY_DELAYS": "1,2",
            # The receivers are on loopback (off by default: public addresses only).
            "WRENN_CHANNEL_ALLOW_PRIVATE_TARGETS": "true",
        }
    )
    assert p.base_url.startswith("http://127.0.0.1:")
    b = json.loads((p.data_dir / "bootstrap.json").read_text())
    assert b["base_url"] == p.base_url
    assert b["admin_email"]
    assert b["api_key"].startswith("wrn_") and len(b["api_key"]) == 36
    yield p
    stop_platform(p)
    assert slot_namespaces() == [], "network namespaces left behind"


@pytest.fixture
def api(platform):
    with platform.client() as c:
        yield c


def wait_status(api, capsule_id, targets, timeout=30):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        r = api.get(f"/v1/capsules/{capsule_id}")
        assert r.status_code == 200, r.text
        last = r.json()
        if last["status"] in targets:
            return last
        time.sleep(0.25)
    raise AssertionError(f"capsule {capsule_id} stuck in {last and last['status']}")


@pytest.fixture
def running_capsule(api):
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 202, r.text
    c = wait_status(api, r.json()["id"], {"running", "error"})
    assert c["status"] == "running", c
    yield c
    api.delete(f"/v1/capsules/{c['id']}")
