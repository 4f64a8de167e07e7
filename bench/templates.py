"""Benchmark: templates and builds, each against a baseline measured in the same run.

    sudo python3 -m bench.templates [--runs N] [--skip-build]      (from the repository root)

1. **Build vs by hand**: the built-in `python` recipe submitted as an admin build (from submit
   to `success`: capsule, pre-build, recipe, post-build, snapshot, clean-up) against the same
   commands run by hand through the API in a fresh `minimal` capsule followed by a snapshot
   (`POST /v1/snapshots`). Goal: ratio <= 1.2. Minutes under TCG (`--skip-build` skips it).
2. **Create -> first exec** from `python` and from `code-runner-beta` against `minimal`, N runs
   each, medians. Goal: ratio <= 1.1 ("a template is a template"). The platform builds the
   built-in templates first unless the shared image cache holds them already.

Machines here are shared and noisy: compare ratios, not seconds.
"""

import argparse
import statistics
import tempfile
import time

from tests.support.platform import start_bench_platform, stop_platform

# The built-in `python` recipe (crates/wrenn-server/src/builds/builtin.rs), built under another
# name so the comparison runs whatever the cache holds.
PYTHON_RECIPE = [
    "RUN --timeout=30m apt-get install -y -q --no-install-recommends python3 python3-pip python3-venv "
    "python3-dev python-is-python3 git curl build-essential",
    "ENV PIP_BREAK_SYSTEM_PACKAGES=1",
    "RUN python3 --version && pip --version",
]


def login(p):
    import httpx
    c = httpx.Client(base_url=p.base_url, timeout=120)
    r = c.post("/v1/auth/login", json={"email": p.admin_email, "password": "bench-admin-pass"})
    r.raise_for_status()
    csrf = c.cookies.get("wrenn_csrf")
    sid = c.cookies.get("wrenn_sid")
    c.cookies.clear()
    c.headers.update({"Cookie": f"wrenn_sid={sid}; wrenn_csrf={csrf}", "X-CSRF-Token": csrf})
    return c


def wait_build(admin, bid, timeout=3600):
    deadline = time.time() + timeout
    while True:
        b = admin.get(f"/v1/admin/builds/{bid}").json()
        if b["status"] in ("success", "failed", "cancelled"):
            return b
        if time.time() > deadline:
            raise SystemExit(f"build {bid} did not finish")
        time.sleep(1)


def wait_running(api, cid, timeout=300):
    deadline = time.time() + timeout
    while True:
        s = api.get(f"/v1/capsules/{cid}").json()["status"]
        if s == "running":
            return
        if s == "error" or time.time() > deadline:
            raise SystemExit(f"capsule {cid}: {s}")
        time.sleep(0.1)


def create_to_exec(api, template):
    t0 = time.perf_counter()
    cid = api.post("/v1/capsules", json={"template": template}).json()["id"]
    while True:
        r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
        if r.status_code == 200:
            break
        if api.get(f"/v1/capsules/{cid}").json()["status"] == "error":
            raise SystemExit(f"capsule from {template} failed to start")
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    api.delete(f"/v1/capsules/{cid}")
    return elapsed


def build_vs_hand(p, admin, api, recipe):
    commands = ["apt-get update -q"] + [
        l.split(None, 1)[1].split(" ", 1)[1] if l.startswith("RUN --timeout") else l.split(None, 1)[1]
        for l in recipe if l.startswith("RUN")
    ] + ["apt-get clean; rm -rf /var/lib/apt/lists/*; sync"]
    env = {l.split(None, 1)[1].split("=", 1)[0]: l.split(None, 1)[1].split("=", 1)[1]
           for l in recipe if l.startswith("ENV")}

    t0 = time.perf_counter()
    b = admin.post("/v1/admin/builds", json={"name": "bench-python", "recipe": recipe, "memory_mb": 1024}).json()
    b = wait_build(admin, b["id"])
    pipeline = time.perf_counter() - t0
    if b["status"] != "success":
        raise SystemExit(f"pipeline build failed: {b['error']}")

    t0 = time.perf_counter()
    cid = api.post("/v1/capsules", json={"memory_mb": 1024}).json()["id"]
    wait_running(api, cid)
    for cmd in commands:
        r = api.post(f"/v1/capsules/{cid}/exec", json={
            "cmd": cmd, "timeout_sec": 3600, "envs": {**env, "DEBIAN_FRONTEND": "noninteractive"}})
        if r.status_code != 200 or r.json()["exit_code"] != 0:
            raise SystemExit(f"by hand: {cmd!r} failed: {r.text[:500]}")
    r = api.post("/v1/snapshots", json={"sandbox_id": cid, "name": "bench-python-by-hand"})
    if r.status_code != 201:
        raise SystemExit(f"by hand: snapshot failed: {r.text}")
    api.delete(f"/v1/capsules/{cid}")
    by_hand = time.perf_counter() - t0
    admin.delete("/v1/admin/templates/bench-python")
    api.delete("/v1/snapshots/bench-python-by-hand")
    return pipeline, by_hand


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="wrenn-bench-")
    p = start_bench_platform(data, env_extra={
        "WRENN_BUILTIN_TEMPLATES": "python,node,code-runner-beta",
        "WRENN_ADMIN_PASSWORD": "bench-admin-pass",
    })
    try:
        admin = login(p)
        with p.client(timeout=600) as api:
            print("waiting for the built-in templates (built once per image cache)...", flush=True)
            t0 = time.time()
            while True:
                names = {t["name"] for t in admin.get("/v1/admin/templates").json()}
                if {"python", "code-runner-beta"} <= names:
                    break
                failed = [b for b in admin.get("/v1/admin/builds").json() if b["status"] == "failed"]
                if failed:
                    raise SystemExit(f"built-in build failed: {failed[0]['name']}: {failed[0]['error']}")
                time.sleep(5)
            print(f"  ready after {time.time() - t0:.0f} s")

            results = {}
            for template in ["minimal", "python", "code-runner-beta"]:
                create_to_exec(api, template)  # warm-up: the first create of a shape snapshots it
                results[template] = [create_to_exec(api, template) for _ in range(args.runs)]
            base = statistics.median(results["minimal"])
            print("\ncreate -> first exec (median of %d)" % args.runs)
            for t, v in results.items():
                m = statistics.median(v)
                print(f"  {t:18s} {m * 1000:7.0f} ms   ratio vs minimal {m / base:.2f}   (goal <= 1.1)")

            if not args.skip_build:
                print("\nbuilding python through the pipeline, then by hand (minutes)...", flush=True)
                pipeline, by_hand = build_vs_hand(p, admin, api, PYTHON_RECIPE)
                print(f"  pipeline {pipeline:7.1f} s   by hand {by_hand:7.1f} s   "
                      f"ratio {pipeline / by_hand:.2f}   (goal <= 1.2)")
    finally:
        stop_platform(p)


if __name__ == "__main__":
    main()
