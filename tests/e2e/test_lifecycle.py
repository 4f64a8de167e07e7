"""Pause and resume on real VMs: processes, memory, files, addresses and clock survive; a paused
capsule holds no VM and no network slot; open streams end instead of hanging."""

import json
import threading
import time

import httpx_ws
from wrenn import Capsule

from tests.support.platform import slot_namespaces
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status
from test_capsules import assert_error
from test_pty import read_until


def run(api, cid, cmd):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 60})
    assert r.status_code == 200, r.text
    return r.json()


def pause(api, cid):
    r = api.post(f"/v1/capsules/{cid}/pause")
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("pausing", "paused")
    c = wait_status(api, cid, {"paused", "error", "running"}, timeout=120)
    assert c["status"] == "paused", c
    return c


def resume(api, cid):
    r = api.post(f"/v1/capsules/{cid}/resume")
    assert r.status_code == 202, r.text
    assert r.json()["status"] in ("resuming", "running")
    c = wait_status(api, cid, {"running", "error", "paused"}, timeout=120)
    assert c["status"] == "running", c
    return c


def test_pause_and_resume_keep_everything(platform, api, running_capsule):
    cid = running_capsule["id"]
    before = running_capsule
    r = api.post(f"/v1/capsules/{cid}/exec", json={
        "cmd": "i=0; while true; do i=$((i+1)); echo $i > /root/count; sleep 0.1; done",
        "background": True, "tag": "counter"})
    assert r.status_code == 202, r.text
    counter_pid = r.json()["pid"]
    run(api, cid, "head -c 3000000 /dev/urandom > /tmp/in-ram.bin; sha256sum /tmp/in-ram.bin > /root/sum")
    time.sleep(1)
    count_before = int(run(api, cid, "cat /root/count")["stdout"])

    paused = pause(api, cid)
    assert paused["host_ip"] == before["host_ip"]
    # A paused capsule costs no VM and no network slot.
    assert vmm_processes(cid) == []
    assert len(slot_namespaces()) == len([c for c in api.get("/v1/capsules").json() if c["status"] == "running"])
    assert_error(api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/pause"), 409, "invalid_state")
    assert_error(api.get(f"/v1/capsules/{cid}/processes"), 409, "invalid_state")
    assert_error(api.post(f"/v1/capsules/{cid}/files/list", json={"path": "/root"}), 409, "invalid_state")
    time.sleep(4)  # long enough that a guest clock left alone would be visibly behind

    resumed = resume(api, cid)
    assert resumed["host_ip"] == before["host_ip"] and resumed["guest_ip"] == before["guest_ip"]
    assert_error(api.post(f"/v1/capsules/{cid}/resume"), 409, "invalid_state")
    # The same process, still counting from where it was (memory kept), writing to the same disk.
    procs = api.get(f"/v1/capsules/{cid}/processes").json()["processes"]
    assert any(p["pid"] == counter_pid and p.get("tag") == "counter" for p in procs), procs
    c1 = int(run(api, cid, "cat /root/count")["stdout"])
    time.sleep(1)
    c2 = int(run(api, cid, "cat /root/count")["stdout"])
    assert count_before <= c1 < c2, (count_before, c1, c2)
    assert c1 < count_before + 60, "the counter restarted or ran while paused"
    assert run(api, cid, "sha256sum -c /root/sum")["exit_code"] == 0  # tmpfs = guest RAM
    guest_now = int(run(api, cid, "date +%s")["stdout"])
    assert abs(guest_now - time.time()) < 3, "the guest clock was not set after the resume"


def test_pause_ends_open_streams_and_pty_reattaches_after_resume(platform, api, running_capsule):
    cid = running_capsule["id"]
    cap = Capsule.connect(cid, api_key=platform.api_key, base_url=platform.base_url)
    with cap.pty() as term:
        it = iter(term)
        term.write(b"export KEEP=kept; echo READY-$((1+1))\n")
        read_until(it, b"READY-2")
        tag = term.tag
    outcome = {}

    def watch_stream():
        with platform.client() as c, httpx_ws.connect_ws(f"/v1/capsules/{cid}/exec/stream", c) as s:
            s.send_text(json.dumps({"type": "start", "cmd": "while true; do echo tick; sleep 0.5; done"}))
            started = time.time()
            try:
                while True:
                    e = s.receive_json(timeout=60)
                    if e["type"] in ("exit", "error"):
                        outcome["event"] = e
                        break
            except Exception as exc:  # a closed socket is an acceptable end too
                outcome["event"] = {"type": "closed", "why": repr(exc)}
            outcome["after"] = time.time() - started

    t = threading.Thread(target=watch_stream)
    t.start()
    time.sleep(2)
    pause(api, cid)
    t.join(timeout=30)
    assert not t.is_alive(), "an exec stream hung across the pause"
    assert outcome["event"]["type"] in ("error", "closed", "exit"), outcome
    resume(api, cid)
    # The terminal session was saved with the VM: re-attach by tag.
    with cap.pty_connect(tag) as term:
        it = iter(term)
        term.write(b"echo $KEEP-$((2+3))\n")
        read_until(it, b"kept-5")


def test_sdk_pause_resume_and_connect(platform, running_capsule):
    cid = running_capsule["id"]
    cap = Capsule.connect(cid, api_key=platform.api_key, base_url=platform.base_url)
    cap.files.write("/root/note.txt", "before pause\n")
    info = cap.pause(wait=True)
    assert info.status.value == "paused"
    # Connecting to a paused capsule resumes it.
    again = Capsule.connect(cid, api_key=platform.api_key, base_url=platform.base_url)
    assert again.files.read("/root/note.txt") == "before pause\n"
    assert again.commands.run("echo up").stdout == "up\n"
    again.pause(wait=True)
    again.resume(wait=True)
    assert again.commands.run("cat /root/note.txt").stdout == "before pause\n"
    again.ping()
    from wrenn.client import WrennClient
    with WrennClient(api_key=platform.api_key, base_url=platform.base_url) as client:
        time.sleep(1.2)
        m = client.capsules.metrics(cid, range="10m")
        assert m.points and m.points[-1].mem_bytes > 0
        client.capsules.ping(cid)


def test_pause_resume_errors(api):
    assert_error(api.post("/v1/capsules/cl-nope/pause"), 404, "not_found")
    assert_error(api.post("/v1/capsules/cl-nope/resume"), 404, "not_found")


def test_twenty_pause_resume_cycles_lose_nothing(platform, api, running_capsule):
    """A process appends to a file the whole time; files are written through the API between
    cycles. After 20 cycles: every line in order, every file intact, the process alive."""
    cid = running_capsule["id"]
    r = api.post(f"/v1/capsules/{cid}/exec", json={
        "cmd": "i=0; while true; do i=$((i+1)); echo $i >> /root/log; sleep 0.05; done",
        "background": True, "tag": "appender"})
    pid = r.json()["pid"]
    expected = {}
    for n in range(20):
        body = f"cycle {n}\n".encode() * (n + 1)
        r = api.post(f"/v1/capsules/{cid}/files/write", files={"file": ("f", body)}, data={"path": f"/root/files/{n}.txt"})
        assert r.status_code == 204, r.text
        expected[n] = body
        pause(api, cid)
        resume(api, cid)
        if n == 0:
            first = int(run(api, cid, "wc -l < /root/log")["stdout"])
    time.sleep(1)
    lines = run(api, cid, "cat /root/log")["stdout"].split()
    assert lines == [str(i) for i in range(1, len(lines) + 1)], "a line was lost or repeated"
    assert len(lines) > first, "the process stopped appending"
    for n, body in expected.items():
        r = api.post(f"/v1/capsules/{cid}/files/read", json={"path": f"/root/files/{n}.txt"})
        assert r.status_code == 200 and r.content == body, n
    procs = api.get(f"/v1/capsules/{cid}/processes").json()["processes"]
    assert any(p["pid"] == pid for p in procs), "the appending process died"


def test_ping(api, running_capsule):
    cid = running_capsule["id"]
    before = api.get(f"/v1/capsules/{cid}").json()["last_active_at"]
    time.sleep(1.1)
    r = api.post(f"/v1/capsules/{cid}/ping")
    assert r.status_code == 204, r.text
    assert api.get(f"/v1/capsules/{cid}").json()["last_active_at"] > before
    assert_error(api.post("/v1/capsules/cl-nope/ping"), 404, "not_found")
    pause(api, cid)
    assert_error(api.post(f"/v1/capsules/{cid}/ping"), 409, "invalid_state")


def test_inactivity_timeout_pauses_idle_capsules_only(platform, api):
    """Three capsules with the shortest timeout (1-59 s is raised to 60): one left idle, one
    with a terminal attached the whole time, one pinged. Only the idle one is auto-paused."""
    ids = []
    for _ in range(3):
        r = api.post("/v1/capsules", json={"timeout_sec": 5})
        assert r.status_code == 202, r.text
        assert r.json()["timeout_sec"] == 60
        ids.append(r.json()["id"])
    idle, attached, pinged = ids
    try:
        for cid in ids:
            assert wait_status(api, cid, {"running", "error"}, timeout=60)["status"] == "running"
        cap = Capsule.connect(attached, api_key=platform.api_key, base_url=platform.base_url)
        started = time.time()
        with cap.pty() as term:
            it = iter(term)
            term.write(b"echo ATTACHED-$((1+1))\n")
            read_until(it, b"ATTACHED-2")
            while time.time() - started < 75:
                assert api.post(f"/v1/capsules/{pinged}/ping").status_code == 204
                time.sleep(10)
                if api.get(f"/v1/capsules/{idle}").json()["status"] == "paused" and time.time() - started > 66:
                    break
            assert api.get(f"/v1/capsules/{attached}").json()["status"] == "running"
        assert api.get(f"/v1/capsules/{pinged}").json()["status"] == "running"
        c = wait_status(api, idle, {"paused", "error"}, timeout=30)
        assert c["status"] == "paused", c
        import sqlite3
        db = sqlite3.connect(platform.data_dir / "wrenn.db")
        (reason,) = db.execute("SELECT pause_reason FROM capsules WHERE id = ?", (idle,)).fetchone()
        db.close()
        assert reason == "ttl_expired"
        # The audit log names the system as the actor.
        from conftest import admin_browser

        log = admin_browser(platform).get("/v1/admin/audit-logs", params={"resource_type": "capsule", "action": "pause"}).json()
        (entry,) = [e for e in log["entries"] if e["resource_id"] == idle]
        assert (entry["actor_type"], entry["actor_name"], entry["status"]) == ("system", "ttl-reaper", "success")
        assert entry["metadata"]["reason"] == "ttl_expired"
        # Auto-paused capsules resume like any other.
        resume(api, idle)
    finally:
        for cid in ids:
            api.delete(f"/v1/capsules/{cid}")


def test_metrics_running_paused_and_stopped(platform, api, running_capsule):
    cid = running_capsule["id"]
    # Busy the vCPU for a while, then read the 10-minute tier.
    run(api, cid, "timeout 3 sh -c 'while :; do :; done'; true")
    time.sleep(1)
    r = api.get(f"/v1/capsules/{cid}/metrics")
    assert r.status_code == 200, r.text
    m = r.json()
    assert m["sandbox_id"] == cid and m["range"] == "10m"
    pts = m["points"]
    assert len(pts) >= 4, pts
    assert set(pts[0]) == {"timestamp_unix", "cpu_pct", "mem_bytes", "disk_bytes"}
    assert all(0 <= p["cpu_pct"] <= 100 for p in pts)
    assert max(p["cpu_pct"] for p in pts) > 50, "a spinning vCPU did not show"
    assert all(p["mem_bytes"] > 10 * 2**20 for p in pts)
    assert all(p["disk_bytes"] > 0 for p in pts)
    ts = [p["timestamp_unix"] for p in pts]
    assert ts == sorted(ts) and abs(ts[-1] - time.time()) < 5
    for rng in ("5m", "1h", "2h", "6h", "12h", "24h"):
        r = api.get(f"/v1/capsules/{cid}/metrics", params={"range": rng})
        assert r.status_code == 200 and r.json()["range"] == rng
    assert_error(api.get(f"/v1/capsules/{cid}/metrics", params={"range": "3d"}), 400, "invalid_request")
    assert_error(api.get("/v1/capsules/cl-nope/metrics"), 404, "not_found")
    # Paused: the points kept at pause, no new ones.
    pause(api, cid)
    kept = api.get(f"/v1/capsules/{cid}/metrics").json()["points"]
    assert len(kept) >= len(pts)
    time.sleep(1.5)
    assert api.get(f"/v1/capsules/{cid}/metrics").json()["points"] == kept
    resume(api, cid)
    time.sleep(1.5)
    assert len(api.get(f"/v1/capsules/{cid}/metrics").json()["points"]) > len(kept)
    # Stopped: none.
    api.delete(f"/v1/capsules/{cid}")
    wait_status(api, cid, {"stopped"}, timeout=30)
    assert_error(api.get(f"/v1/capsules/{cid}/metrics"), 404, "not_found")
