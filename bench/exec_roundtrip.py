#!/usr/bin/env python3
"""Benchmark: exec round trip of `true` through the REST API vs calling envd directly.

    sudo python3 bench/exec_roundtrip.py [--runs N]

Starts its own `wrenn up`, creates one capsule, then alternates N foreground execs of `true`
through POST /v1/capsules/{id}/exec with N direct envd exec requests (same frame protocol the
host agent speaks, to the capsule's host_ip). Reports p50/p99 of both and the API's overhead
(goal: <= 2 ms at p50). Then 10 capsules x concurrent execs for exec/s. Under TCG most of a
round trip is the guest forking `true`, which both sides pay alike.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import httpx  # noqa: E402
from create_to_exec import start_platform  # noqa: E402


def frame(obj):
    body = json.dumps(obj).encode()
    return struct.pack(">BI", 1, len(body)) + body


def read_frame(sock):
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    kind, n = struct.unpack(">BI", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return kind, body


def envd_exec(host_ip):
    s = socket.create_connection((host_ip, 49983))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(frame({"op": "exec", "cmd": "true", "timeout_ms": 30000}))
    while True:
        kind, body = read_frame(s)
        if kind == 1 and json.loads(body).get("type") == "exit":
            break
    s.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def wait_running(api, cid):
    deadline = time.time() + 60
    while True:
        c = api.get(f"/v1/capsules/{cid}").json()
        if c["status"] == "running":
            return c
        if c["status"] == "error" or time.time() > deadline:
            raise SystemExit(f"capsule {cid} did not start: {c['status']}")
        time.sleep(0.1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--capsules", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="wrenn-bench-")
    proc, base_url, key = start_platform(data_dir)
    try:
        api = httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=60)
        cap = wait_running(api, api.post("/v1/capsules", json={}).json()["id"])
        for _ in range(10):  # warm both paths
            api.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "true", "args": []})
            envd_exec(cap["host_ip"])
        via_api, direct = [], []
        for _ in range(args.runs):
            t = time.perf_counter()
            r = api.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "true"})
            via_api.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
            t = time.perf_counter()
            envd_exec(cap["host_ip"])
            direct.append(time.perf_counter() - t)
        ms = lambda x: x * 1000  # noqa: E731
        print(f"exec `true`, {args.runs} runs each, interleaved")
        print(f"  REST API   p50 {ms(pct(via_api, 50)):6.2f} ms   p99 {ms(pct(via_api, 99)):6.2f} ms")
        print(f"  envd direct p50 {ms(pct(direct, 50)):6.2f} ms   p99 {ms(pct(direct, 99)):6.2f} ms")
        print(f"  API overhead at p50: {ms(pct(via_api, 50) - pct(direct, 50)):.2f} ms (goal <= 2 ms); "
              f"ratio {statistics.median(via_api) / statistics.median(direct):.2f}")

        ids = [cap["id"]] + [api.post("/v1/capsules", json={}).json()["id"] for _ in range(args.capsules - 1)]
        for cid in ids:
            wait_running(api, cid)
        count = [0]
        lock = threading.Lock()
        stop = time.time() + args.seconds

        def worker(cid):
            with httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=60) as c:
                while time.time() < stop:
                    c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
                    with lock:
                        count[0] += 1

        threads = [threading.Thread(target=worker, args=(cid,)) for cid in ids]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"{len(ids)} capsules x 1 concurrent exec each: {count[0] / args.seconds:.0f} exec/s")
        for cid in ids:
            api.delete(f"/v1/capsules/{cid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
