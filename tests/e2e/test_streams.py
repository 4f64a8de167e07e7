"""WebSocket streams on real VMs: exec/stream through the official SDK and a raw client."""

import json
import time

import httpx_ws



def ws(platform, cid, client):
    return httpx_ws.connect_ws(f"/v1/capsules/{cid}/exec/stream", client)


def test_exec_stream_in_order_with_exit(platform, running_capsule):
    cid = running_capsule["id"]
    with platform.client() as c, ws(platform, cid, c) as s:
        s.send_text(json.dumps({"type": "start", "cmd": "for i in 1 2 3; do echo out$i; echo err$i >&2; sleep 0.2; done; exit 5"}))
        events = []
        while True:
            e = s.receive_json()
            events.append(e)
            if e["type"] in ("exit", "error"):
                break
    assert events[0]["type"] == "start" and events[0]["pid"] > 1
    assert events[-1] == {"type": "exit", "exit_code": 5}
    out = "".join(e["data"] for e in events if e["type"] == "stdout")
    err = "".join(e["data"] for e in events if e["type"] == "stderr")
    assert (out, err) == ("out1\nout2\nout3\n", "err1\nerr2\nerr3\n")
    # Delivered as produced, not all at the end: the first line comes well before the exit.
    kinds = [e["type"] for e in events]
    assert kinds.index("stdout") < len(kinds) - 3


def test_exec_stream_stop_kills_the_process(platform, api, running_capsule):
    cid = running_capsule["id"]
    with platform.client() as c, ws(platform, cid, c) as s:
        s.send_text(json.dumps({"type": "start", "cmd": "/bin/sleep", "args": ["397"]}))
        assert s.receive_json()["type"] == "start"
        s.send_text(json.dumps({"type": "stop"}))
        e = s.receive_json()
        assert e["type"] == "exit" and e["exit_code"] == 137
    procs = api.get(f"/v1/capsules/{cid}/processes").json()["processes"]
    assert not any(p["args"] == ["397"] for p in procs)


def test_exec_stream_client_that_leaves_kills_the_process(platform, api, running_capsule):
    cid = running_capsule["id"]
    with platform.client() as c, ws(platform, cid, c) as s:
        s.send_text(json.dumps({"type": "start", "cmd": "yes streaming-forever"}))
        assert s.receive_json()["type"] == "start"
        assert s.receive_json()["type"] == "stdout"
        # leave mid-stream without a word
    deadline = time.time() + 5
    while time.time() < deadline:
        procs = api.get(f"/v1/capsules/{cid}/processes").json()["processes"]
        if not any(p["cmd"] == "yes" for p in procs):
            break
        time.sleep(0.1)
    assert not any(p["cmd"] == "yes" for p in procs), "process outlived its stream"


def test_exec_stream_errors(platform, api, running_capsule):
    cid = running_capsule["id"]
    with platform.client() as c:
        with ws(platform, cid, c) as s:
            s.send_text(json.dumps({"type": "bogus"}))
            e = s.receive_json()
            assert e["type"] == "error" and e["data"]
        with ws(platform, cid, c) as s:
            s.send_text(json.dumps({"type": "start", "cmd": "true", "cwd": "/nope"}))
            assert s.receive_json()["type"] == "error"
        # Unknown capsule and plain HTTP: clear HTTP errors, no upgrade.
        r = c.get("/v1/capsules/cl-nope/exec/stream")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = c.get(f"/v1/capsules/{cid}/exec/stream")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"


def test_sdk_commands_stream(platform, running_capsule):
    from wrenn import Capsule

    cap = Capsule.connect(running_capsule["id"], api_key=platform.api_key, base_url=platform.base_url)
    events = list(cap.commands.stream("echo a; echo b >&2; printf 'é'"))
    assert events[0].type == "start"
    assert events[-1].type == "exit" and events[-1].exit_code == 0
    assert "".join(e.data for e in events if e.type == "stdout") == "a\né"
    assert "".join(e.data for e in events if e.type == "stderr") == "b\n"


def attach(c, cid, selector):
    return httpx_ws.connect_ws(f"/v1/capsules/{cid}/processes/{selector}/stream", c)


def events_until_end(s):
    out = []
    while True:
        e = s.receive_json()
        out.append(e)
        if e["type"] in ("exit", "error"):
            return out


def test_process_stream_viewers_and_late_attach(platform, api, running_capsule):
    cid = running_capsule["id"]
    r = api.post(f"/v1/capsules/{cid}/exec", json={
        "cmd": "sleep 1; for i in 1 2 3 4; do echo line$i; echo warn$i >&2; sleep 0.3; done; exit 3",
        "background": True, "tag": "ticker"})
    pid = r.json()["pid"]
    with platform.client() as c1, platform.client() as c2, attach(c1, cid, "ticker") as a, attach(c2, cid, pid) as b:
        ea, eb = events_until_end(a), events_until_end(b)
    for ev in (ea, eb):
        assert ev[0] == {"type": "start", "pid": pid}
        assert ev[-1] == {"type": "exit", "exit_code": 3}
        assert "".join(e["data"] for e in ev if e["type"] == "stdout") == "line1\nline2\nline3\nline4\n"
        assert "".join(e["data"] for e in ev if e["type"] == "stderr") == "warn1\nwarn2\nwarn3\nwarn4\n"
    # Attaching after the end yields the exit at once.
    with platform.client() as c, attach(c, cid, "ticker") as s:
        assert events_until_end(s) == [{"type": "start", "pid": pid}, {"type": "exit", "exit_code": 3}]
    with platform.client() as c, attach(c, cid, "no-such-tag") as s:
        assert s.receive_json()["type"] == "error"


def test_process_stream_detach_leaves_the_process_running(platform, api, running_capsule):
    cid = running_capsule["id"]
    pid = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "while true; do echo tick; sleep 0.2; done", "background": True}).json()["pid"]
    with platform.client() as c, attach(c, cid, pid) as s:
        assert s.receive_json()["type"] == "start"
        assert s.receive_json() == {"type": "stdout", "data": "tick\n"}
    time.sleep(0.5)
    assert pid in [p["pid"] for p in api.get(f"/v1/capsules/{cid}/processes").json()["processes"]]
    # The SDK's connect() follows it too; killing the process ends the stream with its exit.
    from wrenn import Capsule

    cap = Capsule.connect(cid, api_key=platform.api_key, base_url=platform.base_url)
    seen = []
    for e in cap.commands.connect(pid):
        seen.append(e)
        if e.type == "stdout" and len(seen) == 3:
            cap.commands.kill(pid)
    assert seen[0].type == "start" and seen[-1].type == "exit" and seen[-1].exit_code == 137
