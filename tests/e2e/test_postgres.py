"""The whole platform on PostgreSQL (`DATABASE_URL`): the real server of this machine, a fresh
database per run. Capsules, exec, files, pause/resume, snapshot templates and team stats work
as on SQLite, and everything the control plane knows survives a restart."""

import os
import signal
import subprocess
import time
import uuid

import pytest

from test_crash import exec_ok, wait_for
from tests.support.platform import slot_namespaces, start_platform, stop_platform

PG_SLOT_BASE = "10.201.120.0"
ADMIN_URL = os.environ.get("WRENN_TEST_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")


def psql(sql):
    r = subprocess.run(["psql", ADMIN_URL, "-v", "ON_ERROR_STOP=1", "-tAc", sql], capture_output=True, text=True)
    assert r.returncode == 0, f"PostgreSQL at {ADMIN_URL} is needed: {r.stderr}"
    return r.stdout.strip()


@pytest.fixture
def database():
    name = "wrenn_e2e_" + uuid.uuid4().hex[:12]
    psql(f"CREATE DATABASE {name}")
    yield name, ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def db_query(name, sql):
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    r = subprocess.run(["psql", url, "-tAc", sql], capture_output=True, text=True, check=True)
    return r.stdout.strip()


def test_platform_on_postgres(database):
    name, url = database
    env = {"DATABASE_URL": url}
    p = start_platform(slot_base=PG_SLOT_BASE, destroy_on_exit=False, env_extra=env)
    try:
        # The schema and the bootstrap admin live in PostgreSQL, not in a file.
        assert not (p.data_dir / "wrenn.db").exists()
        assert db_query(name, "SELECT count(*) FROM users") == "1"
        with p.client() as c:
            r = c.post("/v1/capsules", json={"vcpus": 1, "memory_mb": 512, "timeout_sec": 0})
            assert r.status_code == 202, r.text
            cid = r.json()["id"]
            assert wait_for(c, cid, {"running", "error"}, timeout=180) == "running"
            assert exec_ok(c, cid, "echo hi > /root/f; cat /root/f") == "hi\n"
            r = c.post(f"/v1/capsules/{cid}/files/write", data={"path": "/root/up.txt"}, files={"file": ("up.txt", b"pg")})
            assert r.status_code in (200, 201, 204), r.text
            assert c.post(f"/v1/capsules/{cid}/files/read", json={"path": "/root/up.txt"}).content == b"pg"

            assert c.post(f"/v1/capsules/{cid}/pause").status_code == 202
            assert wait_for(c, cid, {"paused", "error"}, timeout=120) == "paused"
            assert db_query(name, f"SELECT status || ',' || pause_reason FROM capsules WHERE id = '{cid}'") == "paused,user"
            assert c.post(f"/v1/capsules/{cid}/resume").status_code == 202
            assert wait_for(c, cid, {"running", "error"}, timeout=120) == "running"
            assert exec_ok(c, cid, "cat /root/f") == "hi\n"

            r = c.post("/v1/snapshots", json={"sandbox_id": cid, "name": "pg-snap"})
            assert r.status_code == 201, r.text
            assert any(t["name"] == "pg-snap" for t in c.get("/v1/snapshots").json())
            r = c.post("/v1/capsules", json={"template": "pg-snap"})
            assert r.status_code == 202, r.text
            child = r.json()["id"]
            assert wait_for(c, child, {"running", "error"}, timeout=180) == "running"
            assert exec_ok(c, child, "cat /root/f") == "hi\n"

            s = c.get("/v1/capsules/stats", params={"range": "5m"}).json()
            assert s["current"]["running_count"] == 2 and s["current"]["memory_mb_reserved"] == 1024, s
            deadline = time.time() + 30
            while float(db_query(name, "SELECT coalesce(sum(cpu_minutes), 0) FROM team_usage_daily")) == 0:
                assert time.time() < deadline, "the stats sampler wrote no usage"
                time.sleep(1)
            assert c.get("/v1/capsules/usage").status_code == 200
        # A clean stop that leaves the capsules running for the next start.
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=60) == 0
        p.log.close()

        # Restart on the same database: the control plane finds everything where it was.
        p = start_platform(data_dir=p.data_dir, slot_base=PG_SLOT_BASE, destroy_on_exit=True, env_extra=env)
        with p.client() as c:
            ids = {x["id"]: x["status"] for x in c.get("/v1/capsules").json()}
            assert ids == {cid: "running", child: "running"}, ids
            assert exec_ok(c, child, "cat /root/f") == "hi\n"
            assert c.delete("/v1/snapshots/pg-snap").status_code == 204
            for x in (cid, child):
                c.delete(f"/v1/capsules/{x}")
            for x in (cid, child):
                assert wait_for(c, x, {"stopped"}, timeout=60) == "stopped"
    finally:
        if p.proc.poll() is None:
            stop_platform(p)
    assert slot_namespaces(PG_SLOT_BASE) == []
