"""End-to-end fixtures: one real `wrenn up` (real QEMU VMs, real SQLite file) for the session.

The platform (`tests.support.platform`) runs from the freshly built binaries with its own data
dir, port and network-slot range, so it never touches a developer's running instance. At the end
the fixture stops it and asserts that nothing is left behind: no VMM process, no network
namespace, no capsule directory.
"""

import email
import email.policy
import http.server
import json
import re
import secrets
import threading
import time
import urllib.parse

import httpx
import pytest

from tests.support.platform import free_port, start_platform, stop_platform
from tests.support.waits import wait_status


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


def platform_env(mail_sink, github, receiver):
    """The settings of the tests' platforms: mail, GitHub and notification receivers are the
    local stand-ins above; short intervals and retries so the tests see things happen."""
    return {
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
        # Streams re-check their caller's credential every second, so revocations show at once.
        "WRENN_STREAM_RECHECK_SEC": "1",
        # Few enough streams per team that test_limits.py can open one past the cap.
        "WRENN_TEAM_MAX_STREAMS": "24",
        # Notifications: Telegram's API is the local receiver; retries come quickly.
        "WRENN_TELEGRAM_API_URL": receiver.base_url + "/telegram",
        "WRENN_CHANNEL_RETRY_DELAYS": "1,2",
        # The receivers are on loopback (off by default: public addresses only).
        "WRENN_CHANNEL_ALLOW_PRIVATE_TARGETS": "true",
    }


@pytest.fixture(scope="session")
def platform(mail_sink, github, receiver):
    p = start_platform(env_extra=platform_env(mail_sink, github, receiver))
    assert p.base_url.startswith("http://127.0.0.1:")
    b = json.loads((p.data_dir / "bootstrap.json").read_text())
    assert b["base_url"] == p.public_url
    assert b["admin_email"]
    assert b["api_key"].startswith("wrn_") and len(b["api_key"]) == 36
    yield p
    stop_platform(p)  # and asserts that nothing is left behind


@pytest.fixture
def api(platform):
    with platform.client() as c:
        yield c


@pytest.fixture
def running_capsule(api):
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 202, r.text
    c = wait_status(api, r.json()["id"], {"running", "error"})
    assert c["status"] == "running", c
    yield c
    api.delete(f"/v1/capsules/{c['id']}")
