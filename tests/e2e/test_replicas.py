"""Two control-plane replicas (`wrenn server` on one PostgreSQL and one Redis) and one host agent:
only the replica holding the reaper lease auto-pauses, yet a terminal open on the other replica
keeps its capsule running past the inactivity timeout (60 s) (busy is shared through the database);
once it closes, the capsule is paused. Either replica serves capsules of a host registered
through the other."""

import json
import os
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import httpx_ws
import wsproto.events

from conftest import Browser
from test_events import shared_database  # noqa: F401 (a fixture)
from test_multihost import Agent, env_base, wrenn
from tests.support.platform import free_port, slot_namespaces, wait_serving
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status

SLOT_BASE = "10.201.200.0"


def reaping(log):
    """Whether the replica writing `log` holds the reaper lease now (its last word on it)."""
    said = re.findall(r"capsule reaper lease changed.*reaping\S*=\S*(true|false)", log.read_text())
    return bool(said) and said[-1] == "true"


def test_a_terminal_on_one_replica_keeps_its_capsule_from_the_others_reaper(shared_database):  # noqa: F811
    procs, urls, logs, agent = [], [], [], None
    try:
        for i in range(2):
            data_dir = Path(tempfile.mkdtemp(prefix=f"wrenn-replica{i}-"))
            port = free_port()
            env = env_base(data_dir)
            env.update(
                WRENN_LISTEN=f"127.0.0.1:{port}",
                DATABASE_URL=shared_database,
                REDIS_URL=os.environ.get("WRENN_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
                WRENN_ADMIN_PASSWORD="replica-admin-pass",
                WRENN_ENCRYPTION_KEY="7a" * 32,
            )
            log = data_dir / "server.log"
            procs.append(subprocess.Popen([wrenn(), "server"], env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT))
            urls.append(f"http://127.0.0.1:{port}")
            logs.append(log)
            wait_serving(urls[-1], procs[-1], log, timeout=60, what="wrenn server")
        admin = Browser(urls[0])
        assert admin.post("/v1/auth/login", json={"email": "admin@localhost", "password": "replica-admin-pass"}).status_code == 200
        token = admin.post("/v1/hosts", json={"type": "regular"}).json()["registration_token"]
        agent = Agent("replica", urls[0], token=token, slot_base=SLOT_BASE)
        key = admin.post("/v1/api-keys", json={"name": "replicas"}).json()["key"]
        deadline = time.time() + 30
        while sum(reaping(log) for log in logs) != 1:
            assert time.time() < deadline, "no replica took the reaper lease"
            time.sleep(0.5)
        reaper = [reaping(log) for log in logs].index(True)
        other = 1 - reaper
        # Created through the other replica, which never saw the host register.
        with httpx.Client(base_url=urls[other], headers={"X-API-Key": key}, timeout=120) as api:
            # The shortest inactivity timeout (shorter ones are raised to it).
            r = api.post("/v1/capsules", json={"timeout_sec": 60})
            assert r.status_code == 202, r.text
            cid = r.json()["id"]
            wait_status(api, cid, "running", timeout=180)
            with httpx_ws.connect_ws(f"/v1/capsules/{cid}/pty", api) as ws:
                ws.send_text(json.dumps({"type": "start", "cmd": "/bin/sh", "cols": 80, "rows": 24}))
                deadline = time.time() + 30
                while True:
                    msg = ws.receive(timeout=30)
                    if isinstance(msg, wsproto.events.TextMessage) and json.loads(msg.data)["type"] == "started":
                        break
                    assert time.time() < deadline
                # Past the timeout, with the reaper on the other replica.
                opened = time.time()
                while time.time() - opened < 72:
                    time.sleep(2)
                    assert api.get(f"/v1/capsules/{cid}").json()["status"] == "running"
            # Closed: the timer runs again (from the close) and the reaper pauses it.
            closed = time.time()
            wait_status(api, cid, "paused", timeout=100)
            assert time.time() - closed > 50, "paused before its timeout ran out after the close"
            assert api.delete(f"/v1/capsules/{cid}").status_code in (202, 204)
            wait_status(api, cid, "stopped", timeout=60)
    finally:
        if agent:
            agent.stop()
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=60)
    if agent:
        assert vmm_processes(str(agent.data_dir)) == [], "VMs left running"
    assert slot_namespaces(SLOT_BASE, 16) == [], "network namespaces left behind"
