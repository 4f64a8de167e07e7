"""Terminals on real VMs: the official SDK's binary framing, the spec's JSON framing, reconnect."""

import base64
import json
import time

import httpx_ws
from wrenn import Capsule


def read_until(events, needle, timeout=20):
    """Collects output from a PTY event iterator until `needle` appears."""
    seen = b""
    deadline = time.time() + timeout
    for e in events:
        if e.type == "output" and e.data:
            seen += e.data
            if needle in seen:
                return seen
        assert time.time() < deadline, f"{needle!r} never appeared in {seen[-400:]!r}"
    raise AssertionError(f"session ended before {needle!r}: {seen[-400:]!r}")


def test_sdk_pty_and_reconnect(platform, running_capsule):
    cap = Capsule.connect(running_capsule["id"], api_key=platform.api_key, base_url=platform.base_url)
    with cap.pty(cols=100, rows=30) as term:
        it = iter(term)
        term.write(b"stty size; echo MARK-$((40+2))\n")
        out = read_until(it, b"MARK-42")
        assert b"30 100" in out
        term.resize(120, 40)
        term.write(b"stty size; echo SIZE-$((1+1))-DONE\n")
        assert b"40 120" in read_until(it, b"SIZE-2-DONE")
        term.write(b"export KEEP=still-here\n")
        tag = term.tag
        assert tag.startswith("pty-")
    # The session outlived the WebSocket: reconnect, see the recent screen, keep typing.
    with cap.pty_connect(tag) as term:
        it = iter(term)
        term.write(b"echo $KEEP-$((1+1))\n")
        assert b"still-here-2" in read_until(it, b"still-here-2")
        term.write(b"exit 7\n")
        for e in it:
            if e.type == "exit":
                assert e.exit_code == 7
                break


def test_json_framing_for_browsers(platform, running_capsule):
    cid = running_capsule["id"]
    with platform.client() as c:
        c.headers["Origin"] = "http://localhost:3000"
        with httpx_ws.connect_ws(f"/v1/capsules/{cid}/pty", c) as ws:
            ws.send_text(json.dumps({"type": "start", "cmd": "/bin/sh", "cwd": "/tmp"}))
            started = ws.receive_json()
            assert started["type"] == "started" and started["tag"].startswith("pty-") and started["pid"] > 1
            ws.send_text(json.dumps({"type": "input", "data": base64.b64encode(b"pwd; echo J-$((3*3))\n").decode()}))
            seen = b""
            while b"J-9" not in seen:
                m = ws.receive_json()
                assert m["type"] in ("output", "ping"), m
                if m["type"] == "output":
                    seen += base64.b64decode(m["data"])
            assert b"/tmp" in seen
            ws.send_text(json.dumps({"type": "kill"}))
            while True:
                m = ws.receive_json()
                if m["type"] == "exit":
                    assert m["exit_code"] == 137
                    break


def test_pty_errors(platform, running_capsule):
    cid = running_capsule["id"]
    with platform.client() as c:
        with httpx_ws.connect_ws(f"/v1/capsules/{cid}/pty", c) as ws:
            ws.send_text(json.dumps({"type": "connect", "tag": "pty-00000000"}))
            m = ws.receive_json()
            assert m["type"] == "error" and m["fatal"] is True
        with httpx_ws.connect_ws(f"/v1/capsules/{cid}/pty", c) as ws:
            ws.send_text(json.dumps({"type": "start", "user": "nobody-here"}))
            m = ws.receive_json()
            assert m["type"] == "error" and m["fatal"] is True
        r = c.get("/v1/capsules/cl-nope/pty")
        assert r.status_code == 404
