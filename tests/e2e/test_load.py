"""Load on this machine's 2 cores: concurrent creates, many SSE clients and exec traffic, all at
once, through one control plane. Nothing may answer 5xx; the latency of each (p50, p99) is
printed and written to target/reliability/load-<size>.json (RELIABILITY.md keeps the figures).

Size: `WRENN_LOAD=full` runs the documented full size (50 concurrent creates, 1,000 SSE clients,
1,000 execs); the default is a size CI affords. The platform is the test's own, with rate
limits off (the load comes from one API key on purpose: it measures the platform, not the
limiter) and quotas and stream caps raised to fit the size."""

import asyncio
import json
import os
import resource
import time
from pathlib import Path

import httpx

from tests.support.platform import ROOT, start_platform, stop_platform

SIZES = {
    "ci": dict(creates=8, sse=200, execs=200, exec_workers=8),
    "full": dict(creates=50, sse=1000, execs=1000, exec_workers=16),
}
SLOT_BASE = "10.201.220.0"


def pct(values, p):
    v = sorted(values)
    return round(v[min(len(v) - 1, int(len(v) * p / 100))], 1) if v else None


def summary(ms):
    return {"n": len(ms), "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99), "max_ms": round(max(ms), 1) if ms else None}


async def run_load(base_url, key, size):
    statuses = []
    headers = {"X-API-Key": key}
    limits = httpx.Limits(max_connections=size["sse"] + 200, max_keepalive_connections=100)
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=httpx.Timeout(120, read=None), limits=limits) as c:
        # Two capsules serve the exec traffic.
        workers = []
        for _ in range(2):
            r = await c.post("/v1/capsules", json={"vcpus": 1, "memory_mb": 256})
            assert r.status_code == 202, r.text
            workers.append(r.json()["id"])
        for cid in workers:
            await wait_running(c, cid)

        # SSE clients: each connects and waits for its `connected` event.
        connect_ms, events_seen, sse_tasks, stop = [], [0] * size["sse"], [], asyncio.Event()

        async def sse(i):
            t = time.monotonic()
            async with c.stream("GET", "/v1/events/stream") as r:
                statuses.append(r.status_code)
                if r.status_code != 200:
                    return
                async for line in r.aiter_lines():
                    if line.startswith("event: connected"):
                        connect_ms.append((time.monotonic() - t) * 1000)
                    elif line.startswith("event:"):
                        events_seen[i] += 1
                    if stop.is_set():
                        return

        for i in range(size["sse"]):
            sse_tasks.append(asyncio.create_task(sse(i)))
        deadline = time.monotonic() + 120
        while len(connect_ms) < size["sse"]:
            assert time.monotonic() < deadline, f"{len(connect_ms)} of {size['sse']} SSE clients connected"
            await asyncio.sleep(0.1)

        # Creates and execs at once, with every SSE client listening.
        accept_ms, running_ms, exec_ms, made = [], [], [], []

        async def create():
            t = time.monotonic()
            r = await c.post("/v1/capsules", json={"vcpus": 1, "memory_mb": 256})
            statuses.append(r.status_code)
            accept_ms.append((time.monotonic() - t) * 1000)
            if r.status_code == 202:
                made.append(r.json()["id"])
                await wait_running(c, r.json()["id"])
                running_ms.append((time.monotonic() - t) * 1000)

        todo = list(range(size["execs"]))

        async def exec_worker(w):
            cid = workers[w % len(workers)]
            while todo:
                todo.pop()
                t = time.monotonic()
                r = await c.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo load"})
                statuses.append(r.status_code)
                exec_ms.append((time.monotonic() - t) * 1000)
                if r.status_code == 200:
                    assert r.json()["stdout"] == "load\n", r.text

        t0 = time.monotonic()
        await asyncio.gather(*(create() for _ in range(size["creates"])),
                             *(exec_worker(w) for w in range(size["exec_workers"])))
        wall_s = time.monotonic() - t0
        # Every SSE client saw the creates (each publishes capsule.create).
        await asyncio.sleep(2)
        stop.set()
        for t in sse_tasks:
            t.cancel()
        await asyncio.gather(*sse_tasks, return_exceptions=True)
        for cid in workers + made:
            await c.delete(f"/v1/capsules/{cid}")
    return {
        "size": size,
        "wall_s": round(wall_s, 1),
        "create_accept": summary(accept_ms),
        "create_to_running": summary(running_ms),
        "exec": summary(exec_ms),
        "sse_connect": summary(connect_ms),
        "sse_clients_that_saw_every_create": sum(1 for n in events_seen if n >= size["creates"]),
        "status_codes": {str(s): statuses.count(s) for s in sorted(set(statuses))},
    }


async def wait_running(c, cid, timeout=600):
    deadline = time.monotonic() + timeout
    while True:
        s = (await c.get(f"/v1/capsules/{cid}")).json()["status"]
        if s == "running":
            return
        assert s not in ("error", "stopped"), f"{cid} is {s}"
        assert time.monotonic() < deadline, f"{cid} stuck in {s}"
        await asyncio.sleep(0.25)


def test_load_creates_sse_clients_and_execs_at_once():
    name = os.environ.get("WRENN_LOAD", "ci")
    size = SIZES[name]
    # A thousand streams need more descriptors than the default 1024, here and in the platform.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    p = start_platform(slot_base=SLOT_BASE, max_slots=size["creates"] + 8, env_extra={
        "WRENN_RATE_LIMIT_PER_SEC": "0",
        "WRENN_TEAM_MAX_STREAMS": str(size["sse"] + 100),
        "WRENN_TEAM_QUOTA": f"capsules={size['creates'] + 8},vcpus=1000,memory_mb=1000000,disk_mb=100000000",
        # 2 cores: placement must accept one vCPU per capsule past 16 per core.
        "WRENN_CPU_OVERCOMMIT": "64",
    })
    try:
        report = asyncio.run(run_load(p.base_url, p.api_key, size))
    finally:
        stop_platform(p)
    out = ROOT / "target/reliability" / f"load-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    assert not [s for s in report["status_codes"] if s.startswith("5")], report["status_codes"]
    assert report["create_to_running"]["n"] == size["creates"], report
    assert report["exec"]["n"] == size["execs"], report
    assert report["sse_clients_that_saw_every_create"] == size["sse"], report
