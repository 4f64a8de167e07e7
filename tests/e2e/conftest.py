"""End-to-end fixtures: one real `wrenn up` (real QEMU VMs, real SQLite file) for the session.

The platform runs from the freshly built binaries with its own data dir, port and network-slot
range, so it never touches a developer's running instance. At the end the fixture stops it and
asserts that nothing is left behind: no VMM process, no network namespace, no socket.
"""

import hashlib
import json
import os
import secrets
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
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
    return p


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


@pytest.fixture(scope="session")
def platform():
    p = start_platform()
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
