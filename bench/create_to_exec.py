#!/usr/bin/env python3
"""Benchmark: a cold boot — API create -> first exec answered with template snapshots off
(`WRENN_TEMPLATE_SNAPSHOTS=false`, what the first create of a template does before it is
snapshotted), against raw QEMU booting the same kernel/initramfs/rootfs to envd-ready, in one
run on the same machine. `lifecycle.py` measures the restore path.

    sudo python3 bench/create_to_exec.py [--runs N]

The platform side starts its own `wrenn up` (temporary data dir, shared image cache) and times
POST /v1/capsules until POST /v1/capsules/{id}/exec answers. The baseline replays the very QEMU
command line the platform used (read from /proc), in a network namespace set up the same way,
and times process start until envd has answered a health request and run `true` (a helper
started in the netns before the clock starts polls it, 50 ms connect timeout). Reports medians and their ratio
(platform / raw; goal <= 1.15). Machines here are shared and noisy: compare ratios, not seconds.
"""

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests/e2e"))
import httpx  # noqa: E402

SLOT_BASE = "10.201.150.0"
RAW_NS = "wrenn-bench-raw"
# The agent runs every QEMU at nice 5 (`VM_NICE`); the raw baseline does the same.
RAW_NICE = ["nice", "-n", "5"]


def start_platform(data_dir):
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    p = port.getsockname()[1]
    port.close()
    env = dict(os.environ, WRENN_DATA_DIR=data_dir, WRENN_LISTEN=f"127.0.0.1:{p}",
               WRENN_IMAGES_DIR=os.environ.get("WRENN_IMAGES_DIR", str(ROOT / "target/wrenn-images")),
               WRENN_SLOT_BASE=SLOT_BASE, WRENN_DESTROY_ON_EXIT="true", RUST_LOG="warn",
               WRENN_TEMPLATE_SNAPSHOTS=os.environ.get("WRENN_TEMPLATE_SNAPSHOTS", "true"))
    # The newest build (envd beside it is always the current one, so an older wrenn would speak
    # an older protocol).
    builds = [p for p in (ROOT / "target/release/wrenn", ROOT / "target/debug/wrenn") if p.exists()]
    newest = max(builds, key=lambda p: p.stat().st_mtime) if builds else ROOT / "target/release/wrenn"
    binary = os.environ.get("WRENN_BIN", str(newest))
    proc = subprocess.Popen([binary, "up"], env=env, stdout=subprocess.DEVNULL, stderr=open(Path(data_dir) / "log", "w"))
    bootstrap = Path(data_dir) / "bootstrap.json"
    deadline = time.time() + 900
    while not bootstrap.exists() or _port_closed(p):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("wrenn up failed: " + (Path(data_dir) / "log").read_text()[-2000:])
        time.sleep(0.1)
    return proc, f"http://127.0.0.1:{p}", json.loads(bootstrap.read_text())["api_key"]


def _port_closed(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return False
    except OSError:
        return True


def qemu_cmdline(capsule_id):
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                args = (p / "cmdline").read_bytes().split(b"\0")[:-1]
            except OSError:
                continue
            if args and b"qemu-system" in args[0] and capsule_id.encode() in args:
                return [a.decode() for a in args]
    raise RuntimeError("no QEMU process for " + capsule_id)


def platform_run(api, capture):
    t0 = time.perf_counter()
    cid = api.post("/v1/capsules", json={}).json()["id"]
    cmdline = None
    while True:
        if capture and cmdline is None:
            try:
                cmdline = qemu_cmdline(cid)
            except RuntimeError:
                pass
        r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"})
        if r.status_code == 200:
            break
        if api.get(f"/v1/capsules/{cid}").json()["status"] == "error":
            raise SystemExit("capsule failed to start")
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    api.delete(f"/v1/capsules/{cid}")
    return elapsed, cmdline


def sh(*args, input=None):
    subprocess.run(args, check=True, input=input, text=True, capture_output=True)


def setup_raw_netns():
    teardown_raw_netns()
    sh("ip", "netns", "add", RAW_NS)
    sh("ip", "-n", RAW_NS, "link", "set", "lo", "up")
    sh("ip", "-n", RAW_NS, "tuntap", "add", "tap0", "mode", "tap")
    sh("ip", "-n", RAW_NS, "link", "set", "tap0", "address", "02:77:72:00:00:01")
    sh("ip", "-n", RAW_NS, "addr", "add", "10.200.0.1/24", "dev", "tap0")
    sh("ip", "-n", RAW_NS, "link", "set", "tap0", "up")


def teardown_raw_netns():
    subprocess.run(["ip", "netns", "del", RAW_NS], capture_output=True)


HEALTH = json.dumps({"op": "health"}).encode()
HEALTH_FRAME = struct.pack(">BI", 1, len(HEALTH)) + HEALTH
EXEC = json.dumps({"op": "exec", "cmd": "true", "timeout_ms": 10000}).encode()
EXEC_FRAME = bytes([1]) + len(EXEC).to_bytes(4, "big") + EXEC


class EnvdProbe:
    """A helper inside the raw netns, started (interpreter loaded) before the clock starts: on
    `go` (sent once the guest runs) it waits until envd answers, then runs `true` through it to its exit, as the platform's
    measurement ends with an exec answered."""

    CODE = (
        "import socket,sys,time\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "while True:\n"
        "  try:\n"
        "    s=socket.create_connection(('10.200.0.2',49983),timeout=0.05)\n"
        "    s.sendall(HEALTH)\n"
        "    if s.recv(5): break\n"
        "  except OSError: time.sleep(0.005)\n"
        "s=socket.create_connection(('10.200.0.2',49983),timeout=10)\n"
        "s.sendall(EXEC)\n"
        "f=s.makefile('rb')\n"
        "while True:\n"
        "  h=f.read(5)\n"
        "  if len(h)<5: sys.exit(1)\n"
        "  body=f.read(int.from_bytes(h[1:],'big'))\n"
        "  if h[0]==1 and b'exit' in body: break\n"
        "print('done', flush=True)\n"
    )

    def __init__(self):
        code = f"HEALTH={HEALTH_FRAME!r}\nEXEC={EXEC_FRAME!r}\n" + self.CODE
        self.p = subprocess.Popen(["ip", "netns", "exec", RAW_NS, sys.executable, "-c", code],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def go(self):
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def wait(self):
        assert self.p.stdout.readline().strip() == "done", "envd never answered the raw VM's exec"
        self.p.wait(timeout=10)




def rewrite(cmdline, work, disk, memory=None):
    """The platform's QEMU command line, with the raw run's own disk, sockets, console and
    (when given) memory backend."""
    args, it = [], iter(cmdline)
    for a in it:
        args.append(a)
        if a == "-drive":
            spec = next(it)
            args.append(",".join(f"file={disk}" if p.startswith("file=") else p for p in spec.split(",")))
        elif a == "-qmp":
            next(it)
            args.append(f"unix:{work}/raw.qmp,server=on,wait=off")
        elif a == "-chardev":
            spec = next(it)
            if spec.startswith("socket,id=lifeline"):
                spec = f"socket,id=lifeline,path={work}/raw.life,server=on,wait=off"
            elif spec.startswith("file,id=console"):
                spec = f"file,id=console,path={work}/raw.console,append=on"
            args.append(spec)
        elif a == "-object":
            spec = next(it)
            if memory and spec.startswith("memory-backend"):
                spec = memory
            args.append(spec)
        elif a == "-name":
            next(it)
            args.append("wrenn-bench-raw")
    return args


def raw_run(template, work):
    disk = work / "raw.qcow2"
    if disk.exists():
        disk.unlink()
    # The capsule's own overlay is gone with it; make the same one on the same template.
    images = Path(os.environ.get("WRENN_IMAGES_DIR", str(ROOT / "target/wrenn-images")))
    backing = sorted((images / "rootfs").glob("minimal-*.ext4"))[-1]
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(disk), "5120M")
    args = rewrite(template, work, disk)
    probe = EnvdProbe()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["ip", "netns", "exec", RAW_NS] + RAW_NICE + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe.go()  # polls envd until it answers, then runs `true` through it, as the platform's create ends
    probe.wait()
    elapsed = time.perf_counter() - t0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="wrenn-bench-")
    work = Path(data_dir)
    os.environ["WRENN_TEMPLATE_SNAPSHOTS"] = "false"
    proc, base_url, key = start_platform(data_dir)
    try:
        api = httpx.Client(base_url=base_url, headers={"X-API-Key": key}, timeout=60)
        platform_times, raw_times, template = [], [], None
        setup_raw_netns()
        # Interleave the two so drift in machine load hits both alike.
        for i in range(args.runs):
            t, cmd = platform_run(api, capture=template is None)
            template = template or cmd
            platform_times.append(t)
            raw_times.append(raw_run(template, work))
        p, r = statistics.median(platform_times), statistics.median(raw_times)
        print(f"runs: {args.runs}")
        print(f"platform create->first exec  median {p*1000:7.0f} ms  ({', '.join(f'{x*1000:.0f}' for x in platform_times)})")
        print(f"raw qemu boot->envd ready    median {r*1000:7.0f} ms  ({', '.join(f'{x*1000:.0f}' for x in raw_times)})")
        print(f"ratio platform/raw: {p / r:.3f}  (goal <= 1.15)")
    finally:
        teardown_raw_netns()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
