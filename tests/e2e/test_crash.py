"""kill -9 of the whole platform (control plane and host agent in one process) in the middle of
create, pause, resume and snapshot: after a restart every capsule is in a truthful state, no
user data is lost, and once everything is destroyed nothing is left behind."""

import signal
import time

import httpx

from tests.support.platform import slot_namespaces, start_platform, stop_platform
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status

CRASH_SLOT_BASE = "10.201.110.0"


def wait_for(c, cid, targets, timeout=90):
    """The status of capsule `cid` once it is one of `targets`."""
    return wait_status(c, cid, targets, timeout=timeout, interval=0.1)["status"]


def exec_ok(c, cid, cmd):
    r = c.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 30}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["stdout"]


def check_truthful(c, cid, marker=None):
    """Running: it executes (and has its data). Paused: it resumes and has its data. Error: it
    holds no VM. Anything else is a lie."""
    s = wait_for(c, cid, {"running", "paused", "error", "stopped"})
    if s == "paused":
        assert c.post(f"/v1/capsules/{cid}/resume").status_code == 202
        s = wait_for(c, cid, {"running", "error", "paused"})
    if s == "running":
        if marker:
            assert exec_ok(c, cid, "cat /root/marker") == marker + "\n"
        else:
            assert exec_ok(c, cid, "echo ok") == "ok\n"
    else:
        assert vmm_processes(cid) == [], f"{cid} is {s} but its VM runs"
    return s


def test_kill_9_during_create_pause_resume_and_snapshot():
    p = start_platform(slot_base=CRASH_SLOT_BASE, destroy_on_exit=False)
    data_dir = p.data_dir
    try:
        c = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=60)
        ids = {}
        for name in ("pause", "resume", "snapshot"):
            cid = c.post("/v1/capsules", json={}).json()["id"]
            assert wait_for(c, cid, {"running", "error"}) == "running"
            exec_ok(c, cid, f"echo {name}-data > /root/marker; sync")
            ids[name] = cid
        assert c.post(f"/v1/capsules/{ids['resume']}/pause").status_code == 202
        assert wait_for(c, ids["resume"], {"paused"}) == "paused"

        # Start all four operations, then kill -9 the platform while they run.
        ids["create"] = c.post("/v1/capsules", json={}).json()["id"]
        assert c.post(f"/v1/capsules/{ids['pause']}/pause").status_code == 202
        assert c.post(f"/v1/capsules/{ids['resume']}/resume").status_code == 202
        try:
            c.post("/v1/snapshots", json={"sandbox_id": ids["snapshot"], "name": "crash-snap"}, timeout=0.3)
        except httpx.TimeoutException:
            pass
        time.sleep(0.15)
        p.proc.send_signal(signal.SIGKILL)
        p.proc.wait()
        p.log.close()
        c.close()

        p = start_platform(data_dir=data_dir, slot_base=CRASH_SLOT_BASE, destroy_on_exit=True)
        c = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=60)
        outcome = {}
        for name, cid in ids.items():
            marker = None if name == "create" else f"{name}-data"
            outcome[name] = check_truthful(c, cid, marker)
        print("states after the crash:", outcome)
        # Nothing the user wrote was lost: every pre-existing capsule came back.
        for name in ("pause", "resume", "snapshot"):
            assert outcome[name] == "running", outcome
        # A snapshot either exists whole (and restores) or not at all.
        names = [t["name"] for t in c.get("/v1/snapshots").json()]
        if "crash-snap" in names:
            n = c.post("/v1/capsules", json={"template": "crash-snap"}).json()["id"]
            assert wait_for(c, n, {"running", "error"}) == "running"
            assert exec_ok(c, n, "cat /root/marker") == "snapshot-data\n"
            ids["from-snap"] = n
        snap_dir = data_dir / "snapshots"
        leftovers = [x.name for x in snap_dir.iterdir()] if snap_dir.exists() else []
        assert all(not x.endswith(".tmp") for x in leftovers), leftovers
        for cid in ids.values():
            c.delete(f"/v1/capsules/{cid}")
        for cid in ids.values():
            wait_for(c, cid, {"stopped", "error"})
        c.close()
    finally:
        stop_platform(p)
    assert slot_namespaces(CRASH_SLOT_BASE) == [], "network namespaces left behind"


def test_an_unreadable_record_is_kept_aside_not_deleted():
    """A capsule whose record the agent cannot read after a restart is moved, with its disk, to
    `quarantine/` for a human; the control plane says the capsule was lost."""
    p = start_platform(slot_base=CRASH_SLOT_BASE, destroy_on_exit=False)
    data_dir = p.data_dir
    try:
        c = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=60)
        cid = c.post("/v1/capsules", json={}).json()["id"]
        assert wait_for(c, cid, {"running", "error"}) == "running"
        exec_ok(c, cid, "echo precious > /root/marker; sync")
        assert c.post(f"/v1/capsules/{cid}/pause").status_code == 202
        assert wait_for(c, cid, {"paused"}) == "paused"
        c.close()
        p.proc.send_signal(signal.SIGTERM)
        assert p.proc.wait(timeout=60) == 0
        p.log.close()

        (data_dir / "capsules" / cid / "state.json").write_text('{"id": "half a rec')
        p = start_platform(data_dir=data_dir, slot_base=CRASH_SLOT_BASE, destroy_on_exit=True)
        c = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=60)
        assert wait_for(c, cid, {"error"}) == "error"
        assert not (data_dir / "capsules" / cid).exists()
        kept = [d for d in (data_dir / "quarantine").iterdir() if d.name.startswith(cid + "-")]
        assert len(kept) == 1, kept
        assert (kept[0] / "disk.qcow2").exists() and (kept[0] / "state.json").exists()
        assert "capsule directory quarantined" in (data_dir / "wrenn-up.log").read_text()
        c.close()
    finally:
        stop_platform(p)
    assert slot_namespaces(CRASH_SLOT_BASE) == [], "network namespaces left behind"


def test_a_crash_right_after_a_live_snapshot_moved_the_disk_loses_no_write():
    """The agent dies just after a live snapshot moved the VM onto its new overlay, before the
    state is saved (an injected crash point). After the restart the VM runs on, and what it
    writes then is still there after a pause and a resume: the record named the new overlay
    before the VM moved onto it."""
    p = start_platform(slot_base=CRASH_SLOT_BASE, destroy_on_exit=False,
                       env_extra={"WRENN_FAILPOINT": "snapshot-after-switch"})
    data_dir = p.data_dir
    try:
        c = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=60)
        cid = c.post("/v1/capsules", json={}).json()["id"]
        assert wait_for(c, cid, {"running", "error"}) == "running"
        exec_ok(c, cid, "echo before > /root/marker; sync")
        try:
            c.post("/v1/snapshots", json={"sandbox_id": cid, "name": "crash-switch"}, timeout=30)
        except httpx.TransportError:
            pass
        assert p.proc.wait(timeout=60) != 0, "the crash point was not reached"
        p.log.close()
        c.close()

        p = start_platform(data_dir=data_dir, slot_base=CRASH_SLOT_BASE, destroy_on_exit=True)
        c = httpx.Client(base_url=p.base_url, headers={"X-API-Key": p.api_key}, timeout=60)
        assert wait_for(c, cid, {"running", "error"}) == "running"
        exec_ok(c, cid, "echo after >> /root/marker; sync")
        assert c.post(f"/v1/capsules/{cid}/pause").status_code == 202
        assert wait_for(c, cid, {"paused", "error"}) == "paused"
        assert c.post(f"/v1/capsules/{cid}/resume").status_code == 202
        assert wait_for(c, cid, {"running", "error"}) == "running"
        assert exec_ok(c, cid, "cat /root/marker") == "before\nafter\n"
        c.delete(f"/v1/capsules/{cid}")
        wait_for(c, cid, {"stopped"})
        c.close()
    finally:
        stop_platform(p)
    assert slot_namespaces(CRASH_SLOT_BASE) == [], "network namespaces left behind"
