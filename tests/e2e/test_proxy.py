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
    base_url = "http://localhost:" + p.base_url.rsplit(":", 1)[1]
    kw = dict(wait=True, api_key=p.api_key, base_url=base_url)
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
    base_url = "http://localhost:" + p.base_url.rsplit(":", 1)[1]
    kw = dict(wait=True, api_key=p.api_key, base_url=base_url)
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
