"""The port proxy: `{port}-{capsule}.{domain}` reaches a port inside a capsule. Requests go to
the platform's own address with that Host header (as a client resolving `*.localhost` would
send them): servers bound to every address and to the guest's loopback, streamed bodies and
redirects, auth (the team's API key; other teams 404), the errors, and auto-resume.

Runs on a platform of its own with the built-in `python` and `code-runner-beta` templates
(built once per machine, adopted from the image cache afterwards)."""

import time

import httpx
import pytest

from tests.support.platform import start_platform, stop_platform
from tests.support.waits import wait_status
from conftest import admin_browser, new_user, platform_env
from test_capsules import assert_error

SLOT_BASE = "10.201.180.0"
BUILD_TIMEOUT = 60 * 60


@pytest.fixture(scope="module")
def proxy_platform(mail_sink, github, receiver):
    env = {**platform_env(mail_sink, github, receiver),
           "WRENN_BUILTIN_TEMPLATES": "python,code-runner-beta"}
    p = start_platform(slot_base=SLOT_BASE, max_slots=16, env_extra=env)
    try:
        admin = admin_browser(p)
        deadline = time.time() + BUILD_TIMEOUT
        while not {"python", "code-runner-beta"} <= {t["name"] for t in admin.get("/v1/admin/templates").json()}:
            failed = [b for b in admin.get("/v1/admin/builds").json() if b["status"] == "failed"]
            assert not failed, failed
            assert time.time() < deadline, "the built-in templates were never built"
            time.sleep(2)
        yield p
    finally:
        stop_platform(p)


def run(api, cid, cmd):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 60})
    assert r.status_code == 200, r.text
    return r.json()


def test_proxy_reaches_ports_in_a_capsule(proxy_platform, mail_sink):
    p = proxy_platform
    api = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=120)
    r = api.post("/v1/capsules", json={"template": "python", "timeout_sec": 600})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    assert wait_status(api, cid, {"running", "error"}, timeout=180)["status"] == "running"
    run(api, cid, "mkdir -p /srv/site/sub && echo hello-proxy > /srv/site/index.html && "
                  "head -c 3000000 /dev/urandom > /srv/site/big.bin && sha256sum /srv/site/big.bin > /srv/big.sum && "
                  "echo inner > /srv/site/sub/x.txt")
    for port, bind in ((8000, "0.0.0.0"), (8001, "127.0.0.1")):
        r = api.post(f"/v1/capsules/{cid}/exec", json={
            "cmd": f"cd /srv/site && exec python3 -m http.server {port} --bind {bind}", "background": True})
        assert r.status_code in (200, 201, 202), r.text
    host = lambda port: {"Host": f"{port}-{cid}.localhost:{p.base_url.rsplit(':', 1)[1]}"}  # noqa: E731

    def get(port, path, **kw):
        headers = {**host(port), **kw.pop("headers", {})}
        deadline = time.time() + 30
        while True:
            r = api.get(path, headers=headers, **kw)
            # The server may still be starting.
            if r.status_code != 502 or time.time() > deadline:
                return r
            time.sleep(0.3)

    # A server on every address and one on the guest's loopback alike.
    for port in (8000, 8001):
        r = get(port, "/")
        assert r.status_code == 200 and r.text == "hello-proxy\n", (port, r.status_code, r.text)
    # Redirects keep their trailing slash (http.server redirects /sub to /sub/).
    r = get(8000, "/sub")
    assert r.status_code == 301 and r.headers["location"].endswith("/sub/"), r.headers
    assert get(8000, "/sub/x.txt").text == "inner\n"
    # A larger body streams through intact.
    import hashlib
    r = get(8000, "/big.bin")
    assert r.status_code == 200 and len(r.content) == 3000000
    want = run(api, cid, "cut -d' ' -f1 /srv/big.sum")["stdout"].strip()
    assert hashlib.sha256(r.content).hexdigest() == want
    # The platform's credentials never reach the guest; X-Forwarded-* do.
    run(api, cid, "cat > /srv/echo.py <<'EOF'\n"
                  "import http.server, json\n"
                  "class H(http.server.BaseHTTPRequestHandler):\n"
                  "    def do_POST(self):\n"
                  "        n = int(self.headers.get('content-length', 0))\n"
                  "        body = self.rfile.read(n)\n"
                  "        out = json.dumps({'headers': dict(self.headers), 'len': len(body)}).encode()\n"
                  "        self.send_response(200); self.send_header('content-length', str(len(out))); self.end_headers()\n"
                  "        self.wfile.write(out)\n"
                  "http.server.ThreadingHTTPServer(('127.0.0.1', 8002), H).serve_forever()\n"
                  "EOF")
    api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "exec python3 /srv/echo.py", "background": True})
    deadline = time.time() + 30
    while True:
        r = api.post("/echo", headers=host(8002), content=b"x" * 100000)
        if r.status_code != 502 or time.time() > deadline:
            break
        time.sleep(0.3)
    assert r.status_code == 200, r.text
    seen = {k.lower(): v for k, v in r.json()["headers"].items()}
    assert r.json()["len"] == 100000
    assert "x-api-key" not in seen, seen
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http", seen
    assert seen["x-forwarded-host"].startswith(f"8002-{cid}.localhost"), seen

    # Errors: nothing listening (502, naming the port), no key (401), another team (404),
    # unknown capsule (404), all in the API's envelope.
    assert_error(get(8999, "/"), 502, "port_not_listening")
    assert "8999" in get(8999, "/").json()["error"]["message"]
    # envd's own port is never proxied.
    assert_error(get(49983, "/"), 403, "forbidden")
    anon = httpx.Client(base_url=p.base_url, timeout=30)
    assert_error(anon.get("/", headers=host(8000)), 401, "unauthorized")
    other = new_user(p, mail_sink)
    key = other.post("/v1/api-keys", json={"name": "other"}).json()["key"]
    assert_error(anon.get("/", headers={**host(8000), "X-API-Key": key}), 404, "not_found")
    assert_error(api.get("/", headers={"Host": f"8000-cl-{'0' * 25}.localhost"}), 404, "not_found")
    # The API itself is untouched on its own host.
    assert api.get(f"/v1/capsules/{cid}").json()["id"] == cid

    # A paused capsule is resumed by a proxied request.
    assert api.post(f"/v1/capsules/{cid}/pause").status_code == 202
    wait_status(api, cid, {"paused"}, timeout=60)
    r = api.get("/", headers=host(8000))
    assert r.status_code == 200 and r.text == "hello-proxy\n", r.text
    assert api.get(f"/v1/capsules/{cid}").json()["status"] == "running"
    api.delete(f"/v1/capsules/{cid}")


def test_jupyter_kernel_websocket_through_the_proxy(proxy_platform):
    """The code runner's path without DNS: Jupyter's REST API and a kernel's WebSocket channel
    on port 8888 of a code-runner-beta capsule, through the proxy (an upgraded connection
    spliced end to end): `1+1` answers `2`, state persists between cells, errors come back."""
    import json
    import uuid

    import httpx_ws

    p = proxy_platform
    api = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=120)
    r = api.post("/v1/capsules", json={"template": "code-runner-beta", "timeout_sec": 600})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    try:
        assert wait_status(api, cid, {"running", "error"}, timeout=180)["status"] == "running"
        h = {"Host": f"8888-{cid}.localhost:{p.base_url.rsplit(':', 1)[1]}"}
        kernels = api.get("/api/kernels", headers=h)
        assert kernels.status_code == 200, kernels.text
        kid = next((k["id"] for k in kernels.json() if k["name"] == "wrenn"), None)
        if kid is None:
            r = api.post("/api/kernels", headers=h, json={"name": "wrenn"})
            assert r.status_code in (200, 201), r.text
            kid = r.json()["id"]
        session = uuid.uuid4().hex

        def execute(ws, code):
            mid = uuid.uuid4().hex
            ws.send_text(json.dumps({
                "header": {"msg_id": mid, "username": "test", "session": session,
                           "msg_type": "execute_request", "version": "5.3"},
                "parent_header": {}, "metadata": {}, "channel": "shell",
                "content": {"code": code, "silent": False, "store_history": True,
                            "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
            }))
            out = {"result": None, "stdout": "", "error": None}
            deadline = time.time() + 60
            while time.time() < deadline:
                m = json.loads(ws.receive_text(timeout=60))
                if m.get("parent_header", {}).get("msg_id") != mid:
                    continue
                t = m["msg_type"]
                if t == "execute_result":
                    out["result"] = m["content"]["data"]["text/plain"]
                elif t == "stream":
                    out["stdout"] += m["content"]["text"]
                elif t == "error":
                    out["error"] = m["content"]["ename"]
                elif t == "status" and m["content"]["execution_state"] == "idle":
                    return out
            raise AssertionError(f"no answer to {code!r}")

        with httpx_ws.connect_ws(f"{p.base_url}/api/kernels/{kid}/channels", api, headers=h) as ws:
            assert execute(ws, "1+1")["result"] == "2"
            assert execute(ws, "x = 21\nprint('hi')")["stdout"] == "hi\n"
            assert execute(ws, "x * 2")["result"] == "42"
            assert execute(ws, "1/0")["error"] == "ZeroDivisionError"
    finally:
        api.delete(f"/v1/capsules/{cid}")


def test_the_sdk_reaches_capsule_ports_by_name(proxy_platform):
    """The official SDK, unchanged, pointed at `http://localhost:<port>` as `wrenn up` prints
    it: `get_url` builds `{port}-{capsule}.localhost:<port>`, which this machine resolves
    (libnss-myhostname: every `*.localhost` is loopback)."""
    from wrenn import Capsule

    p = proxy_platform
    kw = dict(wait=True, api_key=p.api_key, base_url=p.public_url)
    c = Capsule(template="python", **kw)
    try:
        c.commands.run("mkdir -p /srv/a && echo by-name > /srv/a/index.html")
        c.commands.run("cd /srv/a && python3 -m http.server 8000 --bind 127.0.0.1", background=True)
        url = c.get_url(8000)
        assert url.startswith(f"http://8000-{c.capsule_id}.localhost:"), url
        deadline = time.time() + 30
        while True:
            r = httpx.get(url + "/", headers={"X-API-Key": p.api_key}, timeout=30)
            if r.status_code != 502 or time.time() > deadline:
                break
            time.sleep(0.3)
        assert r.status_code == 200 and r.text == "by-name\n", (r.status_code, r.text)
        assert httpx.get(url + "/", timeout=30).status_code == 401
    finally:
        c.destroy()


def test_the_sdk_code_runner_runs_cells(proxy_platform):
    """The SDK's `code_runner`, unchanged, against `http://localhost:<port>`: it finds the
    `wrenn` kernel the template started (warm in the snapshot) through the proxy on port 8888
    and runs cells over its WebSocket: values, prints, state, errors, a PNG figure."""
    from wrenn.code_runner import Capsule as CodeRunner

    p = proxy_platform
    kw = dict(wait=True, api_key=p.api_key, base_url=p.public_url)
    cr = CodeRunner(**kw)
    try:
        assert cr.run_code("1+1").text == "2"
        ex = cr.run_code("y = 20\nprint('hello')")
        assert ex.logs.stdout == ["hello\n"], ex.logs
        assert cr.run_code("y + 22").text == "42"
        err = cr.run_code("raise ValueError('boom')").error
        assert err is not None and err.name == "ValueError" and "boom" in err.value, err
        fig = cr.run_code("import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()")
        assert any(r.png for r in fig.results), fig
    finally:
        cr.destroy()


# A WebSocket echo server with Python's standard library only (RFC 6455: handshake, masked
# client frames, unmasked server frames; text and close), bound to the guest's loopback.
WS_ECHO = r'''
import base64, hashlib, socket, struct, threading
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req:
        b = c.recv(4096)
        if not b:
            return
        req += b
    keys = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")]
    if not keys:
        c.sendall(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        c.close()
        return
    key = keys[0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    f = c.makefile("rb")
    while True:
        b0, b1 = f.read(2)
        n = b1 & 127
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        elif n == 127: n = struct.unpack(">Q", f.read(8))[0]
        mask = f.read(4)
        data = bytes(x ^ mask[i % 4] for i, x in enumerate(f.read(n)))
        op = b0 & 15
        if op == 8:
            c.sendall(b"\x88\x00"); return
        out = b"echo:" + data
        hdr = bytes([0x80 | op]) + (bytes([len(out)]) if len(out) < 126 else b"\x7e" + struct.pack(">H", len(out)))
        c.sendall(hdr + out)
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 9001)); s.listen()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
'''

# Answers each request with the port the connection came from, on kept-alive connections.
CONN_PORT = r'''
import http.server
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        out = str(self.client_address[1]).encode()
        self.send_response(200); self.send_header("content-length", str(len(out))); self.end_headers()
        self.wfile.write(out)
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("0.0.0.0", 9002), H).serve_forever()
'''


def until_listening(fetch, timeout=30):
    """`fetch()` again while the server in the guest is still starting (502)."""
    deadline = time.time() + timeout
    while True:
        r = fetch()
        if r.status_code != 502 or time.time() > deadline:
            return r
        time.sleep(0.3)


def test_the_sdk_reaches_websockets_and_resumes_paused_capsules(proxy_platform):
    """With the unchanged SDK's URLs: a WebSocket server in the guest echoes through the proxy;
    the proxy keeps connections to the guest alive between requests; a paused capsule is
    resumed by a request and then served."""
    import httpx_ws
    from wrenn import Capsule

    p = proxy_platform
    kw = dict(wait=True, api_key=p.api_key, base_url=p.public_url)
    c = Capsule(template="python", **kw)
    key = {"X-API-Key": p.api_key}
    try:
        c.commands.run(f"cat > /srv/ws.py <<'EOF'\n{WS_ECHO}\nEOF")
        c.commands.run(f"cat > /srv/conn.py <<'EOF'\n{CONN_PORT}\nEOF")
        c.commands.run("python3 /srv/ws.py", background=True)
        c.commands.run("python3 /srv/conn.py", background=True)
        ws_url = c.get_url(9001).replace("http://", "ws://")
        http = httpx.Client(headers=key, timeout=60)
        # A plain GET is answered 400 once the server listens.
        assert until_listening(lambda: http.get(c.get_url(9001))).status_code == 400
        with httpx_ws.connect_ws(ws_url + "/", http) as ws:
            for msg in ("hello", "x" * 5000):
                ws.send_text(msg)
                assert ws.receive_text(timeout=30) == "echo:" + msg
        # Sequential requests ride one kept-alive connection from the proxy.
        url = c.get_url(9002) + "/"
        assert until_listening(lambda: http.get(url)).status_code == 200
        ports = {http.get(url).text for _ in range(5)}
        assert len(ports) == 1, ports

        c.pause()
        deadline = time.time() + 60
        while c.get_info().status != "paused":
            assert time.time() < deadline, c.get_info().status
            time.sleep(0.2)
        r = httpx.get(url, headers=key, timeout=120)
        # The servers were paused with the capsule and answer again.
        assert r.status_code == 200, r.text
        assert c.get_info().status == "running"
        assert r.text not in ports, "a connection from before the pause was reused"
    finally:
        c.destroy()


def test_public_ports_and_browser_links(proxy_platform, mail_sink):
    """A capsule made public at create time answers anyone; one port made public later answers
    anyone while the others still need credentials; an access token link works in a browser
    (a cookie scoped to that host), only for its port, until revoked."""
    p = proxy_platform
    api = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=120)
    port = p.public_url.rsplit(":", 1)[1]
    anon = httpx.Client(timeout=60)

    def url(cid, n, path="/"):
        return f"http://{n}-{cid}.localhost:{port}{path}"

    def serve(cid, *ports):
        run(api, cid, "mkdir -p /srv/p && echo public-page > /srv/p/index.html")
        for n in ports:
            api.post(f"/v1/capsules/{cid}/exec", json={
                "cmd": f"cd /srv/p && exec python3 -m http.server {n}", "background": True})
        for n in ports:
            assert until_listening(lambda: api.get(url(cid, n))).status_code == 200

    # Public at create time (and bad access asked for is refused).
    assert_error(api.post("/v1/capsules", json={"template": "python", "proxy": {"public_ports": [0]}}),
                 400, "invalid_request")
    r = api.post("/v1/capsules", json={"template": "python", "timeout_sec": 600, "proxy": {"public": True}})
    assert r.status_code == 202, r.text
    pub = r.json()["id"]
    r = api.post("/v1/capsules", json={"template": "python", "timeout_sec": 600})
    cid = r.json()["id"]
    try:
        for x in (pub, cid):
            assert wait_status(api, x, {"running", "error"}, timeout=180)["status"] == "running"
        serve(pub, 8000)
        serve(cid, 8000, 8001)
        assert api.get(f"/v1/capsules/{pub}/proxy").json() == {"public": True, "public_ports": []}
        r = anon.get(url(pub, 8000))
        assert r.status_code == 200 and r.text == "public-page\n"

        # Private by default; one port public later.
        assert_error(anon.get(url(cid, 8000)), 401, "unauthorized")
        r = api.put(f"/v1/capsules/{cid}/proxy", json={"public_ports": [8001, 8001]})
        assert r.status_code == 200 and r.json() == {"public": False, "public_ports": [8001]}, r.text
        assert anon.get(url(cid, 8001)).text == "public-page\n"
        assert_error(anon.get(url(cid, 8000)), 401, "unauthorized")
        assert_error(api.put(f"/v1/capsules/{cid}/proxy", json={"public_ports": [70000]}), 400, "invalid_request")
        assert_error(api.put(f"/v1/capsules/{cid}/proxy", json={"open": True}), 400, "invalid_request")
        other = new_user(p, mail_sink)
        okey = other.post("/v1/api-keys", json={"name": "other"}).json()["key"]
        stranger = httpx.Client(base_url=p.base_url, headers={"X-API-Key": okey}, timeout=30)
        assert_error(stranger.put(f"/v1/capsules/{cid}/proxy", json={"public": True}), 404, "not_found")
        assert_error(stranger.post(f"/v1/capsules/{cid}/proxy/tokens", json={"port": 8000}), 404, "not_found")
        assert_error(stranger.get(url(cid, 8000)), 404, "not_found")
        # Another team's public port answers them like anyone.
        assert stranger.get(url(cid, 8001)).status_code == 200

        # A browser opens a token link: redirected to the same page without the token, with a
        # cookie for exactly that host, which the page's next requests carry.
        assert_error(api.post(f"/v1/capsules/{cid}/proxy/tokens", json={"port": 0}), 400, "invalid_request")
        r = api.post(f"/v1/capsules/{cid}/proxy/tokens", json={"port": 8000, "ttl_sec": 600})
        assert r.status_code == 201, r.text
        link = r.json()
        assert link["url"].startswith(url(cid, 8000, "/?wrenn_token=")), link
        browser = httpx.Client(timeout=60, follow_redirects=True)
        r = browser.get(link["url"])
        assert r.status_code == 200 and r.text == "public-page\n", r.text
        assert [h.status_code for h in r.history] == [302]
        assert r.history[0].headers["location"] == "/"
        cookie = r.history[0].headers["set-cookie"]
        assert "HttpOnly" in cookie and "Domain" not in cookie, cookie
        assert browser.get(url(cid, 8000, "/index.html")).text == "public-page\n"
        # Other query parameters stay; the token never reaches the app.
        r = browser.get(link["url"].replace("/?", "/index.html?a=1&") + "&b=2")
        assert str(r.url).endswith("/index.html?a=1&b=2"), r.url
        # The cookie is this host's only: another port of the same capsule wants its own token.
        assert [(k.name, k.domain) for k in browser.cookies.jar] == [("wrenn_proxy_token", f"8000-{cid}.localhost")]
        r = anon.get(url(cid, 8000), headers={"Cookie": f"wrenn_proxy_token={link['token']}"})
        assert r.status_code == 200
        r = anon.get(url(cid, 8002), headers={"Cookie": f"wrenn_proxy_token={link['token']}"})
        assert_error(r, 401, "unauthorized")
        # A forged or mangled token is refused.
        bad = link["token"][:-2] + ("AA" if not link["token"].endswith("AA") else "BB")
        assert_error(anon.get(url(cid, 8000, f"/?wrenn_token={bad}")), 401, "unauthorized")

        # Revoked: the browser's cookie and the link stop working.
        assert api.delete(f"/v1/capsules/{cid}/proxy/tokens").status_code == 204
        assert_error(browser.get(url(cid, 8000)), 401, "unauthorized")
        assert_error(anon.get(link["url"]), 401, "unauthorized")
        # Private again.
        assert api.put(f"/v1/capsules/{cid}/proxy", json={}).json() == {"public": False, "public_ports": []}
        assert_error(anon.get(url(cid, 8001)), 401, "unauthorized")
    finally:
        api.delete(f"/v1/capsules/{pub}")
        api.delete(f"/v1/capsules/{cid}")
