"""The capsule lifecycle through the public API, on real VMs."""

import base64
import os
import signal
import time
from datetime import datetime
from pathlib import Path

from tests.support.platform import slot_namespaces
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status

CAPSULE_FIELDS = {
    "id", "status", "template", "vcpus", "memory_mb", "timeout_sec", "guest_ip", "host_ip",
    "created_at", "started_at", "last_active_at", "last_updated", "metadata", "disk_size_mb",
}


def parse_time(s):
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    assert t.tzinfo is not None, f"timestamp without zone: {s}"
    return t


def test_create_exec_destroy(api, platform):
    r = api.post("/v1/capsules", json={"template": "minimal", "vcpus": 1, "memory_mb": 512})
    assert r.status_code == 202, r.text
    c = r.json()
    assert c["status"] == "starting"
    assert CAPSULE_FIELDS <= set(c)
    assert c["id"].startswith("cl-") and len(c["id"]) == 28
    parse_time(c["created_at"])

    started = time.time()
    c = wait_status(api, c["id"], {"running", "error"})
    assert c["status"] == "running", c
    assert time.time() - started < 30
    assert CAPSULE_FIELDS <= set(c)
    for f in ("created_at", "started_at", "last_active_at", "last_updated"):
        parse_time(c[f])
    assert c["guest_ip"] == "10.200.0.2"
    assert c["host_ip"].startswith("10.201.100.")
    for k in ("kernel_version", "vmm_version", "agent_version", "envd_version"):
        assert c["metadata"][k], k
    assert c["metadata"]["kernel_version"].endswith("cloud-amd64")
    assert c["vcpus"] == 1 and c["memory_mb"] == 512 and c["template"] == "minimal"

    listed = api.get("/v1/capsules").json()
    assert [x["id"] for x in listed].count(c["id"]) == 1
    assert CAPSULE_FIELDS <= set(listed[0])

    r = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "echo hello; echo oops >&2; exit 7"})
    assert r.status_code == 200, r.text
    e = r.json()
    assert (e["stdout"], e["stderr"], e["exit_code"], e["encoding"]) == ("hello\n", "oops\n", 7, "utf-8")
    assert isinstance(e["duration_ms"], int)
    assert e["sandbox_id"] == c["id"]

    # The guest really is a VM with its own kernel and the capsule's resources.
    e = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "nproc; uname -r; hostname"}).json()
    nproc, kernel, host = e["stdout"].split()
    assert nproc == "1" and kernel == c["metadata"]["kernel_version"] and host == "capsule"

    # cmd + args run without a shell; envs and cwd are honoured.
    e = api.post(
        f"/v1/capsules/{c['id']}/exec",
        json={"cmd": "/bin/sh", "args": ["-c", 'echo "$GREETING" from $(pwd)'], "envs": {"GREETING": "hi there"}, "cwd": "/tmp"},
    ).json()
    assert e["stdout"] == "hi there from /tmp\n"
    e = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "/bin/echo", "args": ["a  b", "$HOME"]}).json()
    assert e["stdout"] == "a  b $HOME\n"

    # Output that is not UTF-8 comes back base64-encoded.
    e = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "head -c 4 /dev/zero; printf '\\377'"}).json()
    assert e["encoding"] == "base64"
    assert base64.b64decode(e["stdout"]) == b"\0\0\0\0\xff"

    # A command past its timeout is killed, and the answer says so.
    t = time.time()
    e = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "echo begun; sleep 60", "timeout_sec": 1}).json()
    assert time.time() - t < 10
    assert e["stdout"] == "begun\n"
    assert e["exit_code"] == 124 and e["timed_out"] is True
    assert "timed out" in e["stderr"]
    e = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "pgrep -x sleep || echo none"}).json()
    assert e["stdout"] == "none\n", "timed-out process still running"

    # Missing program and bad cwd.
    e = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "/no/such", "args": ["x"]}).json()
    assert e["exit_code"] == 127
    r = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "true", "cwd": "/does/not/exist"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"

    namespaces = slot_namespaces()
    assert len(namespaces) == 1
    r = api.delete(f"/v1/capsules/{c['id']}")
    assert r.status_code == 202
    c2 = wait_status(api, c["id"], {"stopped"}, timeout=10)
    assert c2["status"] == "stopped"
    assert c["id"] not in [x["id"] for x in api.get("/v1/capsules").json()]
    assert api.delete(f"/v1/capsules/{c['id']}").status_code == 202, "repeated DELETE is harmless"
    assert slot_namespaces() == []
    assert vmm_processes(str(platform.data_dir)) == []
    assert not (platform.data_dir / "capsules" / c["id"]).exists()
    r = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "true"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "invalid_state"


def assert_error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"]["code"] == code and body["error"]["message"], body


def test_auth_errors(platform):
    with platform.client(key="") as anon:
        assert_error(anon.get("/v1/capsules"), 401, "unauthorized")
        assert_error(anon.post("/v1/capsules", json={}), 401, "unauthorized")
    with platform.client(key="wrn_" + "0" * 32) as wrong:
        assert_error(wrong.get("/v1/capsules"), 401, "unauthorized")
    with platform.client(key="not-a-key") as wrong:
        assert_error(wrong.get("/v1/capsules/cl-x"), 401, "unauthorized")


def test_input_errors(api):
    assert_error(api.post("/v1/capsules", json={"template": "nope"}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules", json={"vcpus": 0}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules", json={"vcpus": 1000}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules", json={"memory_mb": 1}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules", json={"vcpus": "two"}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules", json={"timeout_sec": -5}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules", content=b"{not json"), 400, "invalid_request")
    assert_error(api.get("/v1/capsules/cl-doesnotexist"), 404, "not_found")
    assert_error(api.delete("/v1/capsules/cl-doesnotexist"), 404, "not_found")
    assert_error(api.post("/v1/capsules/cl-doesnotexist/exec", json={"cmd": "true"}), 404, "not_found")
    assert_error(api.get("/v1/nothing-here"), 404, "not_found")
    assert api.get("/v1/capsules").status_code == 200


def test_every_path_of_the_spec_is_served(platform, api):
    """No path of docs/openapi.yaml falls through to the unknown-endpoint answer."""
    import re
    import yaml
    from tests.support.platform import ROOT
    spec = yaml.safe_load((ROOT / "docs/openapi.yaml").read_text())
    unserved = []
    for path, ops in spec["paths"].items():
        concrete = re.sub(r"\{[^}]+\}", "x1", path)
        for method in ops:
            if method not in ("get", "post", "put", "patch", "delete"):
                continue
            # Unauthenticated: every served path answers 401/403/400/404-with-a-reason, never
            # the fallback's "no such endpoint".
            r = api.request(method.upper(), concrete, headers={"X-API-Key": ""})
            if r.status_code in (404, 405) and "no such endpoint" in r.text or r.status_code == 405:
                unserved.append(f"{method.upper()} {path}")
    assert unserved == [], unserved


def test_exec_input_errors(api, running_capsule):
    cid = running_capsule["id"]
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": ""}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true", "timeout_sec": -1}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true", "cwd": "relative"}), 400, "invalid_request")
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true", "envs": {"A=B": "x"}}), 400, "invalid_request")


def test_background_exec(api, running_capsule):
    cid = running_capsule["id"]
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "sleep 300", "background": True, "tag": "sleeper"})
    assert r.status_code == 202, r.text
    b = r.json()
    assert b["tag"] == "sleeper" and b["pid"] > 1 and b["sandbox_id"] == cid and b["cmd"] == "sleep 300"
    assert_error(
        api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true", "background": True, "tag": "sleeper"}), 409, "conflict"
    )
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo $A > /tmp/bg", "background": True, "envs": {"A": "x"}})
    assert r.status_code == 202
    tag = r.json()["tag"]
    assert tag.startswith("proc-") and len(tag) == 13 and all(c in "0123456789abcdef" for c in tag[5:])
    time.sleep(0.5)
    e = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": f"cat /tmp/bg; kill -0 {b['pid']} && echo alive"}).json()
    assert e["stdout"] == "x\nalive\n"
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true", "background": True, "tag": ""}), 400, "invalid_request")


def test_processes_list_and_kill(api, running_capsule):
    cid = running_capsule["id"]
    r = api.get(f"/v1/capsules/{cid}/processes")
    assert r.status_code == 200, r.text
    before = r.json()["processes"]
    assert isinstance(before, list)
    assert all(not p["cmd"].endswith("envd") for p in before), "envd must not be listed"
    assert all(p["pid"] != 1 for p in before)

    a = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "/bin/sleep", "args": ["301"], "background": True, "tag": "a"}).json()
    b = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "trap 'exit 0' TERM; sleep 302 & wait", "background": True}).json()
    deadline = time.time() + 5
    while True:  # the shell needs a moment to start its child
        procs = {p["pid"]: p for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"]}
        if any(p["args"] == ["302"] for p in procs.values()) or time.time() > deadline:
            break
        time.sleep(0.05)
    assert procs[a["pid"]] == {"pid": a["pid"], "tag": "a", "cmd": "/bin/sleep", "args": ["301"]}
    assert procs[b["pid"]]["tag"] == b["tag"]
    assert any(p["args"] == ["302"] and "tag" not in p for p in procs.values()), "child of a shell: listed, untagged"

    assert_error(api.delete(f"/v1/capsules/{cid}/processes/a", params={"signal": "SIGHUP"}), 400, "invalid_request")
    assert api.delete(f"/v1/capsules/{cid}/processes/a").status_code == 204
    assert api.delete(f"/v1/capsules/{cid}/processes/{b['tag']}", params={"signal": "SIGTERM"}).status_code == 204
    deadline = time.time() + 5
    while time.time() < deadline:
        left = [p for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"] if p["args"] in (["301"], ["302"])]
        if not left:
            break
        time.sleep(0.1)
    assert not left, f"killed processes still running: {left}"
    assert_error(api.delete(f"/v1/capsules/{cid}/processes/a"), 404, "not_found")
    assert_error(api.delete(f"/v1/capsules/{cid}/processes/999999"), 404, "not_found")
    assert_error(api.delete(f"/v1/capsules/{cid}/processes/1"), 404, "not_found")
    # A process we did not start, by pid.
    # (setsid: a foreground exec takes its own process group down with it, by design.)
    api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "setsid -f sleep 303 >/dev/null 2>&1"})
    pid = None
    deadline = time.time() + 5
    while pid is None and time.time() < deadline:
        procs = api.get(f"/v1/capsules/{cid}/processes").json()["processes"]
        pid = next((p["pid"] for p in procs if p["args"] == ["303"]), None)
        time.sleep(0.05)
    assert pid, "setsid'd sleep never appeared"
    assert api.delete(f"/v1/capsules/{cid}/processes/{pid}").status_code == 204
    # What a foreground command backgrounds keeps running, and does not hold up the answer even
    # though it keeps the output pipe open.
    t = time.time()
    e = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "sleep 304 & echo started"}).json()
    assert e["stdout"] == "started\n" and time.time() - t < 3
    assert any(p["args"] == ["304"] for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"])
    assert_error(api.get("/v1/capsules/cl-nope/processes"), 404, "not_found")
    assert_error(api.delete("/v1/capsules/cl-nope/processes/a"), 404, "not_found")


def test_other_team_cannot_see_capsule(platform, api, running_capsule):
    cid = running_capsule["id"]
    with platform.client(key=platform.add_team_with_key()) as other:
        assert_error(other.get(f"/v1/capsules/{cid}"), 404, "not_found")
        assert_error(other.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 404, "not_found")
        assert_error(other.delete(f"/v1/capsules/{cid}"), 404, "not_found")
        assert cid not in [c["id"] for c in other.get("/v1/capsules").json()]
    assert api.get(f"/v1/capsules/{cid}").json()["status"] == "running"


def test_vmm_death_during_create_ends_in_error_with_nothing_left(api, platform):
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 202
    cid = r.json()["id"]
    # Kill the VM as soon as it exists, before envd can answer.
    deadline = time.time() + 20
    killed = False
    while time.time() < deadline and not killed:
        for pid in vmm_processes(cid):
            os.kill(pid, signal.SIGKILL)
            killed = True
        time.sleep(0.01)
    assert killed, "VM process never appeared"
    c = wait_status(api, cid, {"error", "running"})
    assert c["status"] == "error"
    assert cid not in [x["id"] for x in api.get("/v1/capsules").json()]
    assert api.get(f"/v1/capsules/{cid}").json()["status"] == "error"
    assert slot_namespaces() == []
    assert not (platform.data_dir / "capsules" / cid).exists()
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")
    assert api.delete(f"/v1/capsules/{cid}").status_code == 202


def test_openapi_is_served(api):
    r = api.get("/openapi.yaml")
    assert r.status_code == 200
    assert r.text == (Path(__file__).resolve().parents[2] / "docs/openapi.yaml").read_text()


def test_limits_follow_the_host(api):
    cpus = os.cpu_count()
    if cpus < 8:
        r = api.post("/v1/capsules", json={"vcpus": cpus + 1})
        assert_error(r, 400, "invalid_request")
        assert "CPUs" in r.json()["error"]["message"]
    r = api.post("/v1/capsules", json={"vcpus": 9})
    assert_error(r, 400, "invalid_request")
    assert "between 1 and 8" in r.json()["error"]["message"]


def test_the_guest_gets_the_disk_it_asked_for_and_a_full_disk_is_only_enospc(api):
    r = api.post("/v1/capsules", json={"disk_size_mb": 2048})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    try:
        c = wait_status(api, cid, {"running", "error"}, timeout=90)
        assert c["status"] == "running", c
        assert c["disk_size_mb"] == 2048

        def run(cmd):
            r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 120})
            assert r.status_code == 200, r.text
            return r.json()

        size_mb = int(run("df -BM --output=size / | tail -1")["stdout"].strip().rstrip("M"))
        assert 1800 <= size_mb <= 2048, size_mb
        full = run("dd if=/dev/zero of=/root/fill bs=1M count=4000 2>&1; echo rc=$?")
        assert "No space left on device" in full["stdout"], full
        assert run("rm /root/fill && echo fine > /root/after && cat /root/after && sync")["stdout"] == "fine\n"
    finally:
        api.delete(f"/v1/capsules/{cid}")


def test_a_vm_that_dies_turns_its_capsule_error_with_a_reason(api, platform, running_capsule):
    cid = running_capsule["id"]
    pids = vmm_processes(cid)
    assert len(pids) == 1
    os.kill(pids[0], signal.SIGKILL)
    c = wait_status(api, cid, {"error"}, timeout=20)
    assert c["status"] == "error"
    import sqlite3
    db = sqlite3.connect(platform.data_dir / "wrenn.db")
    (reason,) = db.execute("SELECT error FROM capsules WHERE id = ?", (cid,)).fetchone()
    db.close()
    assert "exited unexpectedly" in reason, reason
    assert not (platform.data_dir / "capsules" / cid).exists()
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")
