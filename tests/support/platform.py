"""A real `wrenn up` (control plane and one embedded host agent, real QEMU VMs, SQLite under its
data dir) for tests and benchmarks.

Each platform runs with its own data dir, port and network-slot range, so it never touches a
developer's running instance or another platform started by the same run. Slot ranges in use:

    10.201.100.0  the e2e session platform (64 slots)   10.201.110.0  test_crash.py
    10.201.120.0  test_postgres.py                      10.201.130.0, 10.201.140.0  test_multihost.py
    10.201.150.0  benchmarks (256 slots)                10.201.160.0  test_schema.py
    10.201.170.0  test_builtin_templates.py             10.201.200.0  test_replicas.py
    10.201.180.0  test_proxy.py                         10.201.190.0  test_security.py
    10.201.210.0  test_builds.py (restart)             10.201.220.0  test_load.py
    10.201.230.0  test_chaos.py

A slot is a /30: 64 slots span a /24, 256 slots a /22 (10.201.150.0-10.201.153.255).
"""

import hashlib
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from tests.support.qemu import vmm_processes

ROOT = Path(__file__).resolve().parents[2]
SLOT_BASE = "10.201.100.0"
MAX_SLOTS = 64
# The platform's own default when WRENN_MAX_SLOTS is not set.
DEFAULT_MAX_SLOTS = 256


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slot_tag(slot_base):
    """The network namespace number of a slot range's first slot (`wrenn-s<number>`): the /30's
    number within its /10, as the agent numbers them."""
    a, b, c, d = (int(x) for x in slot_base.split("."))
    return (((a << 24) | (b << 16) | (c << 8) | d) >> 2) & 0xFFFFF


def slot_namespaces(slot_base=SLOT_BASE, count=MAX_SLOTS):
    """Network namespaces inside the slot range of `count` slots from `slot_base` (by default the
    e2e session platform's)."""
    first = first_slot_tag(slot_base)
    try:
        names = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith("wrenn-s") and n[7:].isdigit() and 0 <= int(n[7:]) - first < count]


def wrenn_bin(newest=False):
    """The `wrenn` binary: WRENN_BIN; else the debug build (what the test suite runs), or with
    `newest` whichever of the release and debug builds is newer (what the benchmarks run)."""
    if os.environ.get("WRENN_BIN"):
        return Path(os.environ["WRENN_BIN"])
    if newest:
        builds = [p for p in (ROOT / "target/release/wrenn", ROOT / "target/debug/wrenn") if p.exists()]
        return max(builds, key=lambda p: p.stat().st_mtime) if builds else ROOT / "target/release/wrenn"
    return ROOT / "target/debug/wrenn"


def envd_bin(wrenn=None):
    """The static guest agent: WRENN_ENVD; else where `wrenn` itself looks for it: cargo's
    static-target build (`scripts/build.sh`) for a binary of this checkout, the file next to
    the binary for one installed elsewhere."""
    if os.environ.get("WRENN_ENVD"):
        return Path(os.environ["WRENN_ENVD"])
    d = Path(wrenn or wrenn_bin()).resolve().parent
    static = d.parent / "x86_64-unknown-linux-gnu/release/envd"
    # In a checkout, target/debug/envd is a dynamically linked build: never the one to inject.
    return static if static.is_file() or d.parent == (ROOT / "target").resolve() else d / "envd"


# Guest images and built templates are cached machine-wide, keyed by what made them (recipes,
# kernel, envd, VMM): every checkout and every run on a machine shares them, so only the first
# run builds them (the built-in templates take minutes under TCG).
IMAGE_CACHE = "/var/cache/wrenn-tests/images"


def images_dir():
    """Guest kernel, initramfs and template images, shared by every platform of every run on
    this machine (WRENN_IMAGES_DIR overrides)."""
    return Path(os.environ.get("WRENN_IMAGES_DIR", IMAGE_CACHE))


def wait_serving(base_url, proc, log_path, timeout=60, what="the platform", ready=None):
    """Waits until `proc` (a `wrenn up`/`server` started on `base_url`) answers HTTP, and
    `ready()` holds when given; fails with the tail of its log if it exits or `timeout` passes."""
    deadline = time.time() + timeout
    while True:
        assert proc.poll() is None, f"{what} exited:\n" + Path(log_path).read_text()[-4000:]
        assert time.time() < deadline, f"{what} did not come up"
        if ready is None or ready():
            try:
                httpx.get(base_url + "/openapi.yaml", timeout=2)
                return
            except httpx.HTTPError:
                pass
        time.sleep(0.2)


class Platform:
    def __init__(self, base_url, api_key, data_dir, proc):
        self.base_url = base_url
        # What the platform calls itself in links and redirects: on loopback `localhost`
        # (port-proxy URLs resolve under it); the tests talk to the address directly.
        self.public_url = base_url.replace("://127.0.0.1:", "://localhost:")
        self.api_key = api_key
        self.data_dir = Path(data_dir)
        self.proc = proc

    def client(self, key=None, timeout=60):
        headers = {} if key == "" else {"X-API-Key": key or self.api_key}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

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


def start_platform(data_dir=None, slot_base=SLOT_BASE, max_slots=MAX_SLOTS, destroy_on_exit=True, env_extra=None,
                   wrenn=None, rust_log=None):
    """Starts `wrenn up` and waits until it serves; `data_dir` may hold a previous run's state.

    `max_slots=None` leaves the platform's default (256); `wrenn` defaults to `wrenn_bin()`,
    envd to the one beside it (`envd_bin`); `rust_log` defaults to RUST_LOG or `info`.
    The platform's output goes to `<data dir>/wrenn-up.log`."""
    wrenn = Path(wrenn or wrenn_bin())
    envd = envd_bin(wrenn)
    assert wrenn.is_file(), f"build the platform first: {wrenn}"
    assert envd.is_file(), f"build envd first: {envd}"
    data_dir = data_dir or tempfile.mkdtemp(prefix="wrenn-e2e-")
    port = free_port()
    env = dict(
        os.environ,
        WRENN_DATA_DIR=str(data_dir),
        WRENN_LISTEN=f"127.0.0.1:{port}",
        WRENN_IMAGES_DIR=str(images_dir()),
        WRENN_ENVD=str(envd),
        WRENN_SLOT_BASE=slot_base,
        WRENN_DESTROY_ON_EXIT="true" if destroy_on_exit else "false",
        RUST_LOG=rust_log or os.environ.get("RUST_LOG", "info"),
        # Built-in templates take minutes to build: only the tests about them ask for them.
        WRENN_BUILTIN_TEMPLATES="none",
    )
    if max_slots is not None:
        env["WRENN_MAX_SLOTS"] = str(max_slots)
    env.pop("DATABASE_URL", None)  # SQLite under the data dir unless the caller asks otherwise
    env.update(env_extra or {})
    log_path = Path(data_dir) / "wrenn-up.log"
    log = open(log_path, "a")
    proc = subprocess.Popen([str(wrenn), "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    bootstrap = Path(data_dir) / "bootstrap.json"
    # The first start may build guest images.
    wait_serving(base_url, proc, log_path, timeout=900, what="wrenn up", ready=bootstrap.exists)
    b = json.loads(bootstrap.read_text())
    p = Platform(base_url, b["api_key"], data_dir, proc)
    p.log = log
    p.slot_base = slot_base
    p.max_slots = DEFAULT_MAX_SLOTS if max_slots is None else max_slots
    p.admin_email = b["admin_email"]
    # Printed once, on the start that created the admin (stdout is the log; wait for the line).
    p.admin_password = None
    for _ in range(50):
        text = log_path.read_text()
        m = re.findall(r"password: ([0-9a-f]{24})", text)
        if m or "Wrenn is up" in text:
            p.admin_password = m[-1] if m else None
            break
        time.sleep(0.1)
    return p


def stop_platform(p, timeout=60):
    """Stops `wrenn up` cleanly and asserts that nothing is left behind: no VMM process, no
    capsule directory, no network namespace in its slot range."""
    p.proc.send_signal(signal.SIGTERM)
    try:
        p.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.proc.kill()
        raise
    p.log.close()
    assert p.proc.returncode == 0, (p.data_dir / "wrenn-up.log").read_text()[-4000:]
    assert vmm_processes(str(p.data_dir)) == [], "VMM processes left running"
    assert not any((p.data_dir / "capsules").iterdir()), "capsule directories left behind"
    assert slot_namespaces(p.slot_base, p.max_slots) == [], "network namespaces left behind"
    assert vm_cgroups(p.slot_base) == [], "VM cgroups left behind"


def vm_cgroups(slot_base):
    """The VM cgroups of the agent using `slot_base` (its scope `wrenn-<slot base>`), in the v1
    memory hierarchy under this process's own group (where a child's are) or in v2."""
    scope = "wrenn-" + slot_base.replace(".", "_")
    roots = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, names, path = line.strip().split(":", 2)
            if "memory" in names.split(","):
                roots.append("/sys/fs/cgroup/memory" + path.rstrip("/"))
    found = []
    for root in roots:
        d = os.path.join(root, scope)
        if os.path.isdir(d):
            found += [os.path.join(d, e) for e in os.listdir(d) if os.path.isdir(os.path.join(d, e))]
    return found


# The benchmarks' platforms: a range of their own, the platform's default slot count.
BENCH_SLOT_BASE = "10.201.150.0"


def start_bench_platform(data_dir, env_extra=None):
    """A platform as the benchmarks run it: the newest build (`wrenn_bin(newest=True)`), only
    warnings logged (less work beside what is measured), the platform's default slot count."""
    return start_platform(data_dir, slot_base=BENCH_SLOT_BASE, max_slots=None, env_extra=env_extra,
                          wrenn=wrenn_bin(newest=True), rust_log="warn")
