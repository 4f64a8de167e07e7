"""Benchmark: event fan-out to many SSE clients.

    sudo python3 -m bench.sse_fanout [--clients N] [--cycles K]     (from the repository root)

Starts its own `wrenn up`, opens N concurrent `GET /v1/events/stream` connections (raw sockets,
one asyncio loop), creates one capsule and pauses/resumes it K times. Every client must receive
every event of that capsule; the fan-out latency of one delivery is the moment the client has
read the frame minus the event's own `timestamp` (set when the control plane publishes it; same
machine, same clock). Reports p50/p99/max over all deliveries, the baseline measured in the same
run with a single client, their ratio, and the control plane's memory per connected client
(VmRSS growth from before the clients connect to when all are connected, over N).
Goal: with 1,000 clients every event reaches every client within 1 s (p99 < 1 s).
The client side is one Python process on the same two cores: its own work is included.
"""

import argparse
import asyncio
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

from tests.support.platform import start_bench_platform, stop_platform
from tests.support.waits import wait_status


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def parse_ts(s):
    # RFC 3339 with up to nanoseconds: keep microseconds for datetime.
    head, _, frac = s.rstrip("Z").partition(".")
    frac = (frac + "000000")[:6]
    return datetime.fromisoformat(f"{head}.{frac}+00:00").timestamp()


class Client:
    def __init__(self, base_url, key, capsule_filter):
        self.host, self.port = base_url.removeprefix("http://").split(":")
        self.key = key
        self.latencies = []
        self.wanted = capsule_filter
        self.connected = asyncio.Event()
        self.seen = 0

    async def run(self):
        reader, writer = await asyncio.open_connection(self.host, int(self.port), limit=1 << 20)
        writer.write(
            f"GET /v1/events/stream HTTP/1.1\r\nHost: {self.host}\r\nX-API-Key: {self.key}\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        assert b" 200 " in head.split(b"\r\n")[0], head
        chunked = b"chunked" in head.lower()
        buf = b""
        try:
            while True:
                if chunked:
                    size_line = await reader.readline()
                    n = int(size_line.strip() or b"0", 16)
                    if n == 0:
                        return
                    data = await reader.readexactly(n + 2)
                    buf += data[:-2]
                else:
                    data = await reader.read(65536)
                    if not data:
                        return
                    buf += data
                now = time.time()
                while b"\n\n" in buf:
                    frame, buf = buf.split(b"\n\n", 1)
                    self.on_frame(frame.decode(), now)
        finally:
            writer.close()

    def on_frame(self, frame, now):
        name, data = None, None
        for line in frame.splitlines():
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data = line[5:].strip()
        if name == "connected":
            self.connected.set()
            return
        if data is None:
            return
        ev = json.loads(data)
        if self.wanted(ev):
            self.latencies.append(now - parse_ts(ev["timestamp"]))
            self.seen += 1


async def measure(base_url, key, n_clients, cycles, pid):
    api = httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=120)
    # Counted: the capsule's events published after `since` (the pause/resume cycles).
    current = {"id": None, "since": float("inf")}

    def wanted(ev):
        return ev.get("resource", {}).get("id") == current["id"] and parse_ts(ev["timestamp"]) >= current["since"]

    clients = [Client(base_url, key, wanted) for _ in range(n_clients)]
    rss_before = rss_kib(pid)
    tasks = []
    for i, c in enumerate(clients):
        tasks.append(asyncio.create_task(c.run()))
        if i % 50 == 49:
            await asyncio.sleep(0.05)  # do not flood the accept queue
    await asyncio.wait_for(asyncio.gather(*(c.connected.wait() for c in clients)), timeout=120)
    await asyncio.sleep(1)
    rss_connected = rss_kib(pid)

    loop = asyncio.get_running_loop()

    def drive():
        r = api.post("/v1/capsules", json={"timeout_sec": 600})
        r.raise_for_status()
        cid = r.json()["id"]
        wait_status(api, cid, "running", timeout=120, interval=0.05)
        time.sleep(0.5)
        current["id"], current["since"] = cid, time.time()
        for _ in range(cycles):
            api.post(f"/v1/capsules/{cid}/pause").raise_for_status()
            wait_status(api, cid, "paused", timeout=120, interval=0.05)
            api.post(f"/v1/capsules/{cid}/resume").raise_for_status()
            wait_status(api, cid, "running", timeout=120, interval=0.05)
        time.sleep(2)
        current["id"] = None
        api.delete(f"/v1/capsules/{cid}")
        return cid

    await loop.run_in_executor(None, drive)
    await asyncio.sleep(2)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    api.close()
    lat = sorted(x for c in clients for x in c.latencies)
    per_client = [c.seen for c in clients]
    return {
        "clients": n_clients,
        "events_per_client_min": min(per_client),
        "events_per_client_max": max(per_client),
        "deliveries": len(lat),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        "max_ms": 1000 * lat[-1],
        "rss_per_client_kib": (rss_connected - rss_before) / n_clients,
    }


def main():
    ap = argparse.ArgumentParser(prog="python3 -m bench.sse_fanout")
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--cycles", type=int, default=5)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max(soft, min(hard, 4 * args.clients + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))  # the platform inherits it
    data_dir = tempfile.mkdtemp(prefix="wrenn-bench-sse-")
    wrenn_up = start_bench_platform(data_dir)
    try:
        base = asyncio.run(measure(wrenn_up.base_url, wrenn_up.api_key, 1, args.cycles, wrenn_up.proc.pid))
        many = asyncio.run(measure(wrenn_up.base_url, wrenn_up.api_key, args.clients, args.cycles, wrenn_up.proc.pid))
    finally:
        try:
            stop_platform(wrenn_up, timeout=120)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)
    for name, r in (("1 client (baseline)", base), (f"{args.clients} clients", many)):
        print(f"{name}: {r['deliveries']} deliveries ({r['events_per_client_min']}-{r['events_per_client_max']} events per client), "
              f"fan-out p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, max {r['max_ms']:.1f} ms")
    print(f"p99 ratio {args.clients} clients / 1 client: {many['p99_ms'] / max(base['p99_ms'], 0.001):.2f}")
    print(f"control plane memory per connected client: {many['rss_per_client_kib']:.1f} KiB")
    ok = many["events_per_client_min"] == many["events_per_client_max"] and many["p99_ms"] < 1000
    print("goal (every client gets every event, p99 < 1 s):", "met" if ok else "NOT met")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
