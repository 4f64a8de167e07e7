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
