"""Benchmark: exec round trip of `true` through the REST API vs calling envd directly.

    sudo python3 -m bench.exec_roundtrip [--runs N] [--capsules C] [--seconds S]     (from the repository root)

Starts its own `wrenn up`, creates one capsule, then interleaves N foreground execs of `true`
through POST /v1/capsules/{id}/exec with N direct envd exec requests (same frame protocol the
host agent speaks, to the capsule's host_ip). Both sides use a minimal client on a raw socket
(HTTP/1.1 keep-alive for the API), so the difference is the platform's own overhead: reports
p50/p99 of both, the overhead at p50 (goal: <= 2 ms) and the median of the paired differences.
The same API calls through httpx are reported too: on these two cores the guest is still busy
when the answer comes, and httpx's own Python work after it adds 2-3 ms that is the client's,
not the platform's. Then 10 capsules x concurrent execs for exec/s. Under TCG most of a round
trip is the guest forking `true`, which all sides pay alike.
"""

import argparse
import json
import shutil
import socket
import statistics
import tempfile
import threading
import time

import httpx

from tests.support.envd import capsule_token, envd_exec
from tests.support.platform import start_bench_platform, stop_platform
from tests.support.waits import wait_status


class RawHttp:
    """A keep-alive HTTP/1.1 client on one socket: the request in one write, the answer read
    by Content-Length. As little client work as the direct envd client does."""

    def __init__(self, base_url, key, path, body):
        host, port = base_url.removeprefix("http://").split(":")
        self.s = socket.create_connection((host, int(port)))
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")
        body = json.dumps(body).encode()
        self.req = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body

    def post(self):
        self.s.sendall(self.req)
        status = int(self.f.readline().split()[1])
        n = 0
        while (line := self.f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        body = self.f.read(n)
        assert status == 200, body

    def close(self):
        self.s.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def wait_running(api, cid):
    return wait_status(api, cid, "running", timeout=60, interval=0.1, fail_on={"error"})


def main():
    ap = argparse.ArgumentParser(prog="python3 -m bench.exec_roundtrip")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--capsules", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="wrenn-bench-")
    wrenn_up = start_bench_platform(data_dir)
    base_url, key = wrenn_up.base_url, wrenn_up.api_key
    try:
        api = wrenn_up.client(timeout=60)
        cap = wait_running(api, api.post("/v1/capsules", json={}).json()["id"])
        # Straight to envd as the agent reaches it: with the capsule's token.
        token = capsule_token(data_dir, cap["id"])
        for _ in range(10):  # warm both paths
            api.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "true", "args": []})
            envd_exec(cap["host_ip"], token=token)
        raw = RawHttp(base_url, key, f"/v1/capsules/{cap['id']}/exec", {"cmd": "true"})
        via_api, direct, via_httpx = [], [], []
        settle = 0.03  # lets the guest finish the previous call's trailing work (closing the connection)
        for _ in range(args.runs):
            time.sleep(settle)
            t = time.perf_counter()
            raw.post()
            via_api.append(time.perf_counter() - t)
            time.sleep(settle)
            t = time.perf_counter()
            envd_exec(cap["host_ip"], token=token)
            direct.append(time.perf_counter() - t)
            time.sleep(settle)
            t = time.perf_counter()
            r = api.post(f"/v1/capsules/{cap['id']}/exec", json={"cmd": "true"})
            via_httpx.append(time.perf_counter() - t)
            assert r.status_code == 200, r.text
        raw.close()
        ms = lambda x: x * 1000  # noqa: E731
        paired = statistics.median(a - d for a, d in zip(via_api, direct))
        print(f"exec `true`, {args.runs} runs each, interleaved")
        print(f"  REST API    p50 {ms(pct(via_api, 50)):6.2f} ms   p99 {ms(pct(via_api, 99)):6.2f} ms")
        print(f"  envd direct p50 {ms(pct(direct, 50)):6.2f} ms   p99 {ms(pct(direct, 99)):6.2f} ms")
        print(f"  API overhead at p50: {ms(pct(via_api, 50) - pct(direct, 50)):.2f} ms (goal <= 2 ms); "
              f"median of paired differences {ms(paired):.2f} ms; ratio {statistics.median(via_api) / statistics.median(direct):.3f}")
        print(f"  REST API through httpx p50 {ms(pct(via_httpx, 50)):6.2f} ms   p99 {ms(pct(via_httpx, 99)):6.2f} ms "
              f"(client library included)")

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
        try:
            stop_platform(wrenn_up, timeout=120)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
