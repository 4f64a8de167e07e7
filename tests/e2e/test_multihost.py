"""One control plane (`wrenn server`) and two host agents (`wrenn agent`) on this machine, each
with its own data dir, slot range and listen address: registration, capsules spread over both
and driven through gRPC over mutual TLS (exec, files), kill -9 of an agent (host unreachable,
capsules missing, 503), its restart (reconciled, credentials rotated), force-delete of a host
with capsules, and nothing left behind."""

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from conftest import Browser
from tests.support.platform import envd_bin, free_port, images_dir, slot_namespaces, wait_serving, wrenn_bin
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status

SLOTS = {"a": "10.201.130.0", "b": "10.201.140.0"}
INTERVAL = "2"


def env_base(data_dir):
    return dict(
        os.environ,
        WRENN_DATA_DIR=str(data_dir),
        WRENN_IMAGES_DIR=str(images_dir()),
        WRENN_ENVD=str(envd_bin()),
        WRENN_HEARTBEAT_INTERVAL_SEC=INTERVAL,
        RUST_LOG=os.environ.get("RUST_LOG", "info"),
    )


def wrenn():
    return str(wrenn_bin())


def wait_log(path, pattern, proc, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = Path(path).read_text() if Path(path).exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        assert proc.poll() is None, f"process exited:\n{text[-4000:]}"
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} never appeared in {path}")


class Agent:
    def __init__(self, name, cp_url, token=None, data_dir=None, port=None, slot_base=None):
        self.name = name
        self.slot_base = slot_base or SLOTS[name]
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix=f"wrenn-agent-{name}-"))
        self.port = port or free_port()
        self.cp_url = cp_url
        self.start(token)

    def start(self, token=None):
        env = env_base(self.data_dir)
        env.pop("DATABASE_URL", None)
        env.update(WRENN_SLOT_BASE=self.slot_base, WRENN_MAX_SLOTS="16", WRENN_DESTROY_ON_EXIT="true")
        args = [wrenn(), "agent", "--control-plane", self.cp_url]
        if token:
            args += ["--register", token, "--address", f"127.0.0.1:{self.port}"]
        self.log_path = self.data_dir / "agent.log"
        self.log = open(self.log_path, "a")
        self.log.write("\n--- start ---\n")
        self.log.flush()
        self.offset = self.log_path.stat().st_size
        self.proc = subprocess.Popen(args, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        while "serving the control plane" not in self.log_path.read_text()[self.offset:]:
            assert self.proc.poll() is None, self.log_path.read_text()[-4000:]
            assert time.time() < deadline, "agent never came up"
            time.sleep(0.2)

    def creds(self):
        return json.loads((self.data_dir / "agent-credentials.json").read_text())

    def capsule_dirs(self):
        d = self.data_dir / "capsules"
        return {p.name for p in d.iterdir()} if d.exists() else set()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=120)
        self.log.close()


@pytest.fixture
def cluster():
    data_dir = Path(tempfile.mkdtemp(prefix="wrenn-cp-"))
    port = free_port()
    env = env_base(data_dir)
    env.pop("DATABASE_URL", None)
    env["WRENN_LISTEN"] = f"127.0.0.1:{port}"
    log_path = data_dir / "server.log"
    log = open(log_path, "a")
    cp = subprocess.Popen([wrenn(), "server"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    password = wait_log(log_path, r"password: ([0-9a-f]{24})", cp, timeout=120).group(1)
    key = json.loads((data_dir / "bootstrap.json").read_text())["api_key"]
    admin = Browser(url)
    r = admin.post("/v1/auth/login", json={"email": "admin@localhost", "password": password})
    assert r.status_code == 200, r.text
    agents = []
    state = {"url": url, "key": key, "admin": admin, "agents": agents, "cp": cp, "data_dir": data_dir}

    def restart_cp():
        """Starts the control plane again on the same data dir and port (after a test stopped it)."""
        state["cp"] = subprocess.Popen([wrenn(), "server"], env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_serving(url, state["cp"], log_path, timeout=60, what="the restarted control plane")

    state["restart_cp"] = restart_cp
    yield state
    for a in agents:
        a.stop()
    if state["cp"].poll() is None:
        state["cp"].send_signal(signal.SIGTERM)
        state["cp"].wait(timeout=60)
    log.close()
    for a in agents:
        assert vmm_processes(str(a.data_dir)) == [], f"VMs of agent {a.name} left running"
    for base in SLOTS.values():
        assert slot_namespaces(base, 16) == [], "network namespaces left behind"


def wait_host(admin, hid, status, timeout=60):
    deadline = time.time() + timeout
    while True:
        h = admin.get(f"/v1/hosts/{hid}").json()
        if h["status"] == status:
            return h
        assert time.time() < deadline, f"host {hid} stayed {h['status']}, expected {status}"
        time.sleep(0.3)


def wait_capsule(c, cid, targets, timeout=90):
    return wait_status(c, cid, targets, timeout=timeout, interval=0.3)["status"]


def test_two_agents_one_control_plane(cluster):
    url, admin = cluster["url"], cluster["admin"]
    c = httpx.Client(base_url=url, headers={"X-API-Key": cluster["key"]}, timeout=120)
    # No host yet: nowhere to run.
    r = c.post("/v1/capsules", json={})
    assert r.status_code == 503 and r.json()["error"]["code"] == "no_hosts_available", r.text

    ids = {}
    for name in ("a", "b"):
        r = admin.post("/v1/hosts", json={"type": "regular", "provider": "bare-metal"})
        assert r.status_code == 201, r.text
        agent = Agent(name, url, token=r.json()["registration_token"])
        cluster["agents"].append(agent)
        ids[name] = r.json()["host"]["id"]
        assert agent.creds()["host_id"] == ids[name]
    agents = {a.name: a for a in cluster["agents"]}
    for name, hid in ids.items():
        h = wait_host(admin, hid, "online")
        assert h["address"] == f"127.0.0.1:{agents[name].port}" and h["cpu_cores"] >= 1

    # A process without the control plane's client certificate gets nowhere: the agent's
    # certificate checks out against the CA, but the agent demands a client certificate.
    ctx = ssl.create_default_context(cadata=agents["a"].creds()["tls"]["ca_cert"])
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", agents["a"].port), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            with pytest.raises((ssl.SSLError, ConnectionError)) as refused:
                tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                assert tls.recv(1) == b"", "the agent answered a client without a certificate"
                raise ConnectionError("closed")
    assert "CERTIFICATE_REQUIRED" in str(refused.value), refused.value

    # Capsules spread over both hosts and run through them.
    cids = []
    for _ in range(4):
        r = c.post("/v1/capsules", json={"timeout_sec": 600})
        assert r.status_code == 202, r.text
        cids.append(r.json()["id"])
    for cid in cids:
        assert wait_capsule(c, cid, {"running", "error"}) == "running"
    on = {n: agents[n].capsule_dirs() & set(cids) for n in agents}
    assert on["a"] and on["b"], f"capsules were not spread: {on}"
    for cid in cids:
        r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo hello-from-$(hostname)"})
        assert r.status_code == 200 and r.json()["stdout"].startswith("hello-from-"), r.text
    a_cid, b_cid = sorted(on["a"])[0], sorted(on["b"])[0]
    r = c.post(f"/v1/capsules/{a_cid}/files/write", data={"path": "/tmp/x"}, files={"file": ("x", b"through the tunnel" * 1000)})
    assert r.status_code in (200, 201, 204), r.text
    assert c.post(f"/v1/capsules/{a_cid}/files/read", json={"path": "/tmp/x"}).content == b"through the tunnel" * 1000

    # kill -9 agent a: host unreachable, its capsules missing and answering 503.
    old_refresh = agents["a"].creds()["refresh_token"]
    agents["a"].proc.send_signal(signal.SIGKILL)
    agents["a"].proc.wait()
    wait_host(admin, ids["a"], "unreachable", timeout=30)
    for cid in on["a"]:
        assert wait_capsule(c, cid, {"missing"}, timeout=10) == "missing"
    r = c.post(f"/v1/capsules/{a_cid}/exec", json={"cmd": "true"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "host_unavailable", r.text
    assert c.post(f"/v1/capsules/{b_cid}/exec", json={"cmd": "true"}).status_code == 200

    # Restart: credentials rotate, the host is back and its capsules run again.
    agents["a"].log.close()
    agents["a"].start()
    assert agents["a"].creds()["refresh_token"] != old_refresh
    r = httpx.post(url + "/v1/hosts/auth/refresh", json={"refresh_token": old_refresh})
    assert r.status_code == 401, "a rotated refresh token is refused"
    wait_host(admin, ids["a"], "online", timeout=30)
    for cid in on["a"]:
        assert wait_capsule(c, cid, {"running"}, timeout=30) == "running"
    r = c.post(f"/v1/capsules/{a_cid}/exec", json={"cmd": "cat /tmp/x | wc -c"})
    assert r.status_code == 200 and r.json()["stdout"].strip() == str(len(b"through the tunnel" * 1000)), r.text

    # Force-delete host b with its capsules.
    r = admin.delete(f"/v1/hosts/{ids['b']}")
    assert r.status_code == 409, r.text
    body = r.json()
    assert body["error"]["code"] == "host_has_capsules"
    assert set(body["error"]["sandbox_ids"]) == on["b"] and set(body["capsule_ids"]) == on["b"]
    assert set(admin.get(f"/v1/hosts/{ids['b']}/delete-preview").json()["sandbox_ids"]) == on["b"]
    assert admin.delete(f"/v1/hosts/{ids['b']}", params={"force": "true"}).status_code == 204
    for cid in on["b"]:
        assert c.get(f"/v1/capsules/{cid}").json()["status"] == "stopped"
    deadline = time.time() + 30
    while vmm_processes(str(agents["b"].data_dir)):
        assert time.time() < deadline, "host b's VMs survived the force delete"
        time.sleep(0.3)
    # Its agent learns at the next heartbeat, forgets its credentials and stops.
    assert agents["b"].proc.wait(timeout=30) != 0
    assert not (agents["b"].data_dir / "agent-credentials.json").exists()
    assert "deleted this host" in agents["b"].log_path.read_text()

    # An agent whose stored credentials the control plane no longer accepts stops and says so
    # (here: a copy of a's credentials with the refresh token that was rotated away).
    stale_dir = Path(tempfile.mkdtemp(prefix="wrenn-agent-stale-"))
    stale = agents["a"].creds()
    stale["refresh_token"] = old_refresh
    (stale_dir / "agent-credentials.json").write_text(json.dumps(stale))
    env = env_base(stale_dir)
    env.update(WRENN_SLOT_BASE=SLOTS["b"], WRENN_MAX_SLOTS="16")
    out = subprocess.run([wrenn(), "agent"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no longer accepts this host's credentials" in out.stderr, out.stderr[-2000:]
    # Without credentials and without a token, it says how to register.
    out = subprocess.run([wrenn(), "agent"], env=env_base(tempfile.mkdtemp()), capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "--register" in out.stderr, out.stderr[-2000:]

    # New capsules now all go to host a; destroy everything.
    r = c.post("/v1/capsules", json={})
    assert r.status_code == 202
    assert wait_capsule(c, r.json()["id"], {"running"}) == "running"
    assert r.json()["id"] in agents["a"].capsule_dirs()

    # What an agent reports about a capsule applies and is published as a state change.
    from test_events import Reader

    watcher = Reader(url + "/v1/events/stream", {"X-API-Key": cluster["key"]})
    watcher.wait(lambda n, d: n == "connected")
    victim = sorted(on["a"])[-1]
    a_token = agents["a"].creds()["token"]
    ev = {"event": "sandbox.error", "sandbox_id": victim, "host_id": ids["a"], "reason": "disk on fire"}
    assert httpx.post(url + "/v1/hosts/sandbox-events", json=ev, headers={"X-Host-Token": a_token}).status_code == 204
    got = c.get(f"/v1/capsules/{victim}").json()
    assert got["status"] == "error", got
    watcher.wait(lambda n, d: n == "capsule.state.changed" and d["resource"]["id"] == victim
                 and d["metadata"].get("to") == "error" and d["metadata"].get("reason") == "sandbox.error")
    on["a"].discard(victim)
    for cid in list(on["a"]) + [r.json()["id"]]:
        assert c.delete(f"/v1/capsules/{cid}").status_code in (200, 202)
        assert wait_capsule(c, cid, {"stopped"}) == "stopped"


def test_an_agent_pauses_its_capsules_while_the_control_plane_is_away(cluster):
    """After 3 consecutive heartbeats that cannot reach the control plane the agent pauses
    every running capsule, so nothing runs unobserved; when the control plane is back the
    capsules are `paused`, and resume with everything they held."""
    url, admin = cluster["url"], cluster["admin"]
    c = httpx.Client(base_url=url, headers={"X-API-Key": cluster["key"]}, timeout=120)
    token = admin.post("/v1/hosts", json={"type": "regular"}).json()["registration_token"]
    a = Agent("a", url, token)
    cluster["agents"].append(a)
    hid = a.creds()["host_id"]
    wait_host(admin, hid, "online")
    r = c.post("/v1/capsules", json={"timeout_sec": 3600})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    wait_capsule(c, cid, {"running"})
    assert c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo kept > /root/mark"}).json()["exit_code"] == 0

    cp = cluster["cp"]
    cp.send_signal(signal.SIGTERM)
    cp.wait(timeout=60)
    wait_log(a.log_path, f"paused while the control plane is unreachable.*{cid}", a.proc, timeout=90)
    assert vmm_processes(cid) == [], "paused to disk: no VM runs"

    cluster["restart_cp"]()
    assert wait_capsule(c, cid, {"paused", "error", "stopped"}, timeout=60) == "paused"
    wait_host(admin, hid, "online")
    assert c.post(f"/v1/capsules/{cid}/resume").status_code in (200, 202)
    wait_capsule(c, cid, {"running"})
    out = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "cat /root/mark"}).json()
    assert out["stdout"].strip() == "kept", out
    assert c.delete(f"/v1/capsules/{cid}").status_code in (200, 202, 204)
    wait_capsule(c, cid, {"stopped"})


def test_templates_built_on_one_host_boot_on_another(cluster):
    """A template built on host a is copied to host b (each file checked by digest) when a
    capsule is placed there: here a BYOC team whose only host is b. Placement otherwise prefers
    a holder; deleting the template removes every host's files once its capsules are gone."""
    from test_builds import submit, wait_build

    url, admin = cluster["url"], cluster["admin"]
    c = httpx.Client(base_url=url, headers={"X-API-Key": cluster["key"]}, timeout=120)
    r = admin.post("/v1/hosts", json={"type": "regular", "provider": "bare-metal"})
    assert r.status_code == 201, r.text
    a_id = r.json()["host"]["id"]
    cluster["agents"].append(Agent("a", url, token=r.json()["registration_token"]))
    wait_host(admin, a_id, "online")

    # Built on a (the only host): a snapshot template with a process running, and a base one.
    suffix = str(int(time.time()) % 100000)
    snap_name, base_name = f"copied-snap-{suffix}", f"copied-base-{suffix}"
    builds = []
    for name, health in ((snap_name, "test -f /etc/marker"), (base_name, None)):
        cfg = {"name": name, "base_template": "minimal", "skip_pre_post": True,
               "recipe": ["RUN echo built-on-a > /etc/marker",
                          "START sh -c 'exec sleep 86400'",
                          "ENV GREETING=hello"]}
        if health:
            cfg["healthcheck"] = health
        r = submit(admin, cfg)
        assert r.status_code in (200, 201, 202), r.text
        builds.append(r.json()["id"])
    for bid in builds:
        b = wait_build(admin, bid, timeout=600)
        assert b["status"] == "success", b
    templates = {t["name"]: t for t in admin.get("/v1/admin/templates").json()}
    assert templates[snap_name]["type"] == "snapshot" and templates[base_name]["type"] == "base"

    # The team's only host becomes b (BYOC): its capsules can only run there.
    team = admin.get("/v1/me").json()["team_id"]
    assert admin.put(f"/v1/admin/teams/{team}/byoc", json={"byoc": True}).status_code == 204
    r = admin.post("/v1/hosts", json={"type": "byoc", "team_id": team})
    assert r.status_code == 201, r.text
    b_id = r.json()["host"]["id"]
    cluster["agents"].append(Agent("b", url, token=r.json()["registration_token"]))
    wait_host(admin, b_id, "online")
    agents = {x.name: x for x in cluster["agents"]}

    def snapshots_on(agent):
        d = agent.data_dir / "snapshots"
        return {p.name for p in d.iterdir() if (p / "meta.json").exists()} if d.exists() else set()

    held_by_a = snapshots_on(agents["a"])
    assert len(held_by_a) == 2 and snapshots_on(agents["b"]) == set()

    cids = []
    for name in (snap_name, base_name, snap_name):
        r = c.post("/v1/capsules", json={"template": name, "timeout_sec": 600})
        assert r.status_code == 202, r.text
        cid = r.json()["id"]
        cids.append(cid)
        assert wait_capsule(c, cid, {"running", "error"}, timeout=300) == "running", c.get(f"/v1/capsules/{cid}").json()
        assert cid in agents["b"].capsule_dirs()
        out = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "cat /etc/marker; echo $GREETING; pgrep -x sleep >/dev/null && echo running"}).json()
        expect = "built-on-a\nhello\n" + ("running\n" if name == snap_name else "")
        assert out["stdout"] == expect, (name, out)
    # b got both snapshots once each (the second capsule of the snapshot template found it).
    assert snapshots_on(agents["b"]) == held_by_a
    b_log = agents["b"].log_path.read_text()
    assert b_log.count("snapshot copied to this host") == 2, b_log[-3000:]
    # The base template's copy is its disk alone; the snapshot template's holds its memory.
    kinds = []
    for sid in held_by_a:
        files = {p.name for p in (agents["b"].data_dir / "snapshots" / sid).iterdir()}
        assert {"disk.qcow2", "meta.json"} <= files, files
        kinds.append("state" in files)
    assert sorted(kinds) == [False, True], kinds
    assert not any((agents["b"].data_dir / "transfers").glob("*")), "a transfer was left behind"
    # Their disk use counts every host's files: the builder's, the copy, the per-shape snapshot
    # b made to boot the base template.
    listed = {t["name"]: t for t in admin.get("/v1/admin/templates").json()}
    snap, base = listed[snap_name], listed[base_name]
    assert snap["disk_usage_bytes"] == 2 * snap["size_bytes"], snap
    assert base["disk_usage_bytes"] > base["size_bytes"], base
    assert listed["minimal"]["disk_usage_bytes"] > listed["minimal"]["size_bytes"], listed["minimal"]

    # Deleting the templates keeps their running capsules; their files go once those do.
    for name in (snap_name, base_name):
        assert admin.delete(f"/v1/admin/templates/{name}").status_code == 204
    out = c.post(f"/v1/capsules/{cids[0]}/exec", json={"cmd": "cat /etc/marker"}).json()
    assert out["stdout"] == "built-on-a\n", out
    assert snapshots_on(agents["a"]) == set(), "the builder's files stay though no capsule uses them"
    for cid in cids:
        assert c.delete(f"/v1/capsules/{cid}").status_code in (200, 202, 204)
    for cid in cids:
        assert wait_capsule(c, cid, {"stopped"}) == "stopped"
    deadline = time.time() + 30
    while snapshots_on(agents["b"]) and time.time() < deadline:
        time.sleep(0.5)
    assert snapshots_on(agents["b"]) == set(), "copies outlived their template and capsules"
