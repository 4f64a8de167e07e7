"""Snapshot templates on real VMs: live snapshots, capsules restored from them, names, deletion."""

import time

from wrenn import Capsule

from tests.support.waits import wait_status
from test_capsules import assert_error


def run(api, cid, cmd):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 60})
    assert r.status_code == 200, r.text
    return r.json()


def create_from(api, template):
    r = api.post("/v1/capsules", json={"template": template})
    assert r.status_code == 202, r.text
    c = wait_status(api, r.json()["id"], {"running", "error"}, timeout=60)
    assert c["status"] == "running", c
    return c


def test_live_snapshot_and_capsules_restored_from_it(platform, api, running_capsule):
    src = running_capsule["id"]
    r = api.post(f"/v1/capsules/{src}/exec", json={
        "cmd": "i=0; while true; do i=$((i+1)); echo $i > /root/count; sleep 0.1; done",
        "background": True, "tag": "counter"})
    counter = r.json()["pid"]
    run(api, src, "echo from-source > /root/src.txt; head -c 2000000 /dev/urandom > /tmp/ram.bin; "
                  "sha256sum /tmp/ram.bin > /root/ram.sum")
    name = f"e2e-snap-{int(time.time() * 1000) % 10**8}"
    r = api.post("/v1/snapshots", json={"sandbox_id": src, "name": name})
    assert r.status_code == 201, r.text
    t = r.json()
    assert t["name"] == name and t["type"] == "snapshot" and t["platform"] is False
    assert t["vcpus"] == 1 and t["memory_mb"] == 512 and t["size_bytes"] > 0
    # The source ran on: same process, still counting, writes after the snapshot are its own.
    assert api.get(f"/v1/capsules/{src}").json()["status"] == "running"
    c1 = int(run(api, src, "cat /root/count")["stdout"])
    time.sleep(0.6)
    assert int(run(api, src, "cat /root/count")["stdout"]) > c1
    run(api, src, "echo later > /root/after.txt")

    listed = api.get("/v1/snapshots").json()
    assert any(x["name"] == name and x["type"] == "snapshot" for x in listed)
    assert any(x["name"] == "minimal" and x["platform"] is True for x in listed)
    assert all(x["type"] == "base" for x in api.get("/v1/snapshots", params={"type": "base"}).json())
    assert [x["name"] for x in api.get("/v1/snapshots", params={"type": "snapshot"}).json()].count(name) == 1
    assert_error(api.get("/v1/snapshots", params={"type": "weird"}), 400, "invalid_request")

    # Two capsules from the snapshot: files, memory and processes as they were, nothing later.
    clones = [create_from(api, name) for _ in range(2)]
    try:
        for c in clones:
            assert c["template"] == name
            out = run(api, c["id"], "cat /root/src.txt; test -e /root/after.txt && echo LEAK; sha256sum -c /root/ram.sum")
            assert out["stdout"].startswith("from-source\n") and "LEAK" not in out["stdout"], out
            assert "OK" in out["stdout"]
            procs = api.get(f"/v1/capsules/{c['id']}/processes").json()["processes"]
            assert any(p["pid"] == counter and p.get("tag") == "counter" for p in procs), procs
            guest_now = int(run(api, c["id"], "date +%s")["stdout"])
            assert abs(guest_now - time.time()) < 3
        # A clone's memory is the snapshot's RAM file mapped copy-on-write (split off on the first
        # restore): pausing and resuming it keeps what it holds.
        assert any((d / "memory" / "ram").exists() for d in (platform.data_dir / "snapshots").iterdir())
        cid = clones[0]["id"]
        run(api, cid, "echo before-pause > /tmp/mem.txt")
        assert api.post(f"/v1/capsules/{cid}/pause").status_code == 202
        wait_status(api, cid, {"paused"}, timeout=60)
        assert api.post(f"/v1/capsules/{cid}/resume").status_code in (200, 202)
        wait_status(api, cid, {"running"}, timeout=60)
        out = run(api, cid, "cat /tmp/mem.txt; sha256sum -c /root/ram.sum")
        assert out["stdout"].startswith("before-pause\n") and "OK" in out["stdout"], out
        # Clones are independent of each other.
        run(api, clones[0]["id"], "echo mine > /root/own.txt")
        assert run(api, clones[1]["id"], "cat /root/own.txt")["exit_code"] != 0
        # Deleting the name while capsules use it: the name goes at once, the files stay for them.
        assert api.delete(f"/v1/snapshots/{name}").status_code == 204
        assert_error(api.delete(f"/v1/snapshots/{name}"), 404, "not_found")
        assert_error(api.post("/v1/capsules", json={"template": name}), 400, "invalid_request")
        assert run(api, clones[0]["id"], "cat /root/src.txt")["stdout"] == "from-source\n"
        snaps = platform.data_dir / "snapshots"
        assert len(list(snaps.iterdir())) >= 1
    finally:
        for c in clones:
            api.delete(f"/v1/capsules/{c['id']}")
    for c in clones:
        wait_status(api, c["id"], {"stopped"}, timeout=30)
    assert list((platform.data_dir / "snapshots").iterdir()) == [], "a deleted snapshot's files outlived its capsules"


def test_snapshot_names_and_errors(platform, api, running_capsule):
    cid = running_capsule["id"]
    for bad in ["", "-x", "a/b", "a b", "x" * 65]:
        assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": bad}), 400, "invalid_request")
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": "minimal"}), 409, "already_exists")
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": "cl-nope"}), 404, "not_found")
    assert_error(api.post("/v1/snapshots", json={"name": "x"}), 400, "invalid_request")
    assert_error(api.post("/v1/snapshots?overwrite=maybe", json={"sandbox_id": cid}), 400, "invalid_request")
    assert_error(api.delete("/v1/snapshots/minimal"), 403, "forbidden")
    assert_error(api.delete("/v1/snapshots/no-such-template"), 404, "not_found")
    # A default name, then the same name again: 409; with overwrite (as the SDK does): replaced.
    r = api.post("/v1/snapshots", json={"sandbox_id": cid})
    assert r.status_code == 201, r.text
    name = r.json()["name"]
    assert name.startswith("template-") and len(name) == len("template-") + 8
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": name}), 409, "already_exists")
    cap = Capsule.connect(cid, api_key=platform.api_key, base_url=platform.base_url)
    cap.commands.run("echo v2 > /root/version")
    t = cap.create_snapshot(name=name, overwrite=True)
    assert t.name == name
    clone = create_from(api, name)
    try:
        assert run(api, clone["id"], "cat /root/version")["stdout"] == "v2\n"
    finally:
        api.delete(f"/v1/capsules/{clone['id']}")
    # Another team neither sees nor uses it.
    other = platform.add_team_with_key()
    with platform.client(other) as o:
        assert name not in [x["name"] for x in o.get("/v1/snapshots").json()]
        assert_error(o.post("/v1/capsules", json={"template": name}), 400, "invalid_request")
        assert_error(o.delete(f"/v1/snapshots/{name}"), 404, "not_found")
        assert_error(o.post("/v1/snapshots", json={"sandbox_id": cid}), 404, "not_found")
    # Only a running capsule can be snapshotted.
    assert api.post(f"/v1/capsules/{cid}/pause").status_code == 202
    wait_status(api, cid, {"paused"}, timeout=60)
    assert_error(api.post("/v1/snapshots", json={"sandbox_id": cid}), 409, "invalid_state")
    assert api.delete(f"/v1/snapshots/{name}").status_code == 204
