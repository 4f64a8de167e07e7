"""Benchmark: the capsule lifecycle against raw QEMU doing the same step, in one run.

    sudo python3 -m bench.lifecycle [--runs N]     (from the repository root)

For each run, on the platform (its own `wrenn up`, temporary data dir, shared image cache):
create → first exec answered; pause → `paused`; resume → first exec answered; the idle
VMM's RSS/PSS; and create from a user snapshot (`POST /v1/snapshots` of a running capsule)
→ first exec answered, compared with create from the template. The baseline replays the very QEMU command line the platform used (read from
/proc) in a network namespace set up the same way, with QMP by hand: restore the template
snapshot (RAM file mapped copy-on-write, `migrate-incoming`, `cont`) until envd answers; save
(`stop`, `migrate` to a file); restore that file until envd answers; RSS/PSS when idle.
Medians and ratios platform/raw are printed. Compare ratios, not seconds: the machine is shared.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.envd import EnvdProbe
from tests.support.platform import images_dir, start_bench_platform, stop_platform
from tests.support.qemu import (
    RAW_NICE, RAW_NS, backing_file, drive_file, qemu_cmdline, rewrite, setup_raw_netns, sh,
    teardown_raw_netns, vmm_processes,
)
from tests.support.qmp import Qmp
from tests.support.waits import wait_status


def spawn(args):
    for f in ("raw.qmp", "raw.life"):
        try:
            os.unlink(Path(args[args.index("-qmp") + 1].split(",")[0][5:]).parent / f)
        except (FileNotFoundError, ValueError):
            pass
    return subprocess.Popen(["ip", "netns", "exec", RAW_NS] + RAW_NICE + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def memory_kib(pid):
    out = {}
    for line in open(f"/proc/{pid}/smaps_rollup"):
        k, _, v = line.partition(":")
        if k in ("Rss", "Pss"):
            out[k] = int(v.split()[0])
    return out


def raw_cycle(cmdline, snap_dir, work):
    """Raw QEMU: restore the template snapshot, save, restore the save. Returns timings and
    the idle memory of the first VM."""
    disk = work / "raw.qcow2"
    if disk.exists():
        disk.unlink()
    size = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(snap_dir / "disk.qcow2")],
                                     capture_output=True, text=True, check=True).stdout)["virtual-size"]
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(snap_dir / "disk.qcow2"), "-F", "qcow2", str(disk), str(size))
    mem_mb = cmdline[cmdline.index("-m") + 1].rstrip("M")
    out = {}
    # 1. restore from the template snapshot
    args = rewrite(cmdline, work, disk, f"memory-backend-file,id=mem,size={mem_mb}M,mem-path={snap_dir / 'ram'},share=off")
    probe = EnvdProbe(RAW_NS)
    t0 = time.perf_counter()
    proc = spawn(args)
    q = Qmp(work / "raw.qmp")
    q.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])
    with open(snap_dir / "state", "rb") as f:
        q.pass_fd("raw-state", f.fileno())
    q.cmd("migrate-incoming", uri="fd:raw-state")
    q.wait_migration()
    q.cmd("cont")
    probe.go()  # as the platform does: ask envd once the guest runs
    probe.wait()
    out["create"] = time.perf_counter() - t0
    time.sleep(2)
    out["mem"] = memory_kib(proc.pid)
    # 2. save
    state = work / "raw.state"
    t0 = time.perf_counter()
    q.cmd("stop")
    q.cmd("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": False}])
    q.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
    # As the platform saves: QEMU writes into a descriptor, which is then synced and named.
    partial = work / "raw.partial"
    with open(partial, "wb") as f:
        q.pass_fd("raw-state", f.fileno())
        q.cmd("migrate", uri="fd:raw-state")
        q.wait_migration()
        os.fsync(f.fileno())
    os.rename(partial, state)
    dir_fd = os.open(work, os.O_RDONLY)
    os.fsync(dir_fd)
    os.close(dir_fd)
    q.cmd("quit")
    proc.wait()
    out["pause"] = time.perf_counter() - t0
    q.close()
    # 3. restore the save
    args = rewrite(cmdline, work, disk, f"memory-backend-ram,id=mem,size={mem_mb}M")
    probe = EnvdProbe(RAW_NS)
    t0 = time.perf_counter()
    proc = spawn(args)
    q = Qmp(work / "raw.qmp")
    with open(state, "rb") as f:
        q.pass_fd("raw-state", f.fileno())
    q.cmd("migrate-incoming", uri="fd:raw-state")
    q.wait_migration()
    q.cmd("cont")
    probe.go()  # as the platform does: ask envd once the guest runs
    probe.wait()
    out["resume"] = time.perf_counter() - t0
    q.close()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return out


def first_exec(api, cid):
    while api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "true"}).status_code != 200:
        time.sleep(0.01)


def platform_cycle(api, snapshot):
    out = {}
    # Create from the user snapshot template (goal: about the same as from the platform template).
    t0 = time.perf_counter()
    cid = api.post("/v1/capsules", json={"template": snapshot}).json()["id"]
    first_exec(api, cid)
    out["from_snapshot"] = time.perf_counter() - t0
    api.delete(f"/v1/capsules/{cid}")
    t0 = time.perf_counter()
    cid = api.post("/v1/capsules", json={}).json()["id"]
    first_exec(api, cid)
    out["create"] = time.perf_counter() - t0
    cmdline = qemu_cmdline(cid)
    # The platform hands QEMU the template's RAM as a descriptor; the template snapshot is the
    # directory of the disk the capsule's overlay sits on.
    out["snap_dir"] = Path(backing_file(drive_file(cmdline))).parent
    time.sleep(2)
    pid = vmm_processes(cid)[0]
    out["mem"] = memory_kib(pid)
    t0 = time.perf_counter()
    assert api.post(f"/v1/capsules/{cid}/pause").status_code == 202
    wait_status(api, cid, "paused", timeout=None, interval=0.01, fail_on={"error"})
    out["pause"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert api.post(f"/v1/capsules/{cid}/resume").status_code == 202
    first_exec(api, cid)
    out["resume"] = time.perf_counter() - t0
    api.delete(f"/v1/capsules/{cid}")
    return out, cmdline


def main():
    ap = argparse.ArgumentParser(prog="python3 -m bench.lifecycle")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="wrenn-bench-")
    work = Path(data_dir)
    wrenn_up = start_bench_platform(data_dir)
    try:
        api = wrenn_up.client(timeout=120)
        # The first create makes the template snapshot; it is not what is measured.
        warm = api.post("/v1/capsules", json={}).json()["id"]
        first_exec(api, warm)
        # A user snapshot of a running capsule, restored in every run like a template.
        r = api.post("/v1/snapshots", json={"sandbox_id": warm, "name": "bench-snapshot"}, params={"overwrite": "true"})
        assert r.status_code == 201, r.text
        api.delete(f"/v1/capsules/{warm}")
        # Its first restore maps the files for the first time; not what is measured either.
        cid = api.post("/v1/capsules", json={"template": "bench-snapshot"}).json()["id"]
        first_exec(api, cid)
        api.delete(f"/v1/capsules/{cid}")
        images = images_dir()
        setup_raw_netns()
        plat, raw = [], []
        for _ in range(args.runs):  # interleaved, so load drift hits both alike
            p, cmdline = platform_cycle(api, "bench-snapshot")
            snap_dir = p["snap_dir"]
            assert snap_dir.parent == images / "snapshots", snap_dir
            plat.append(p)
            raw.append(raw_cycle(cmdline, snap_dir, work))
        print(f"runs: {args.runs}")
        for step, goal in (("create", 1.3), ("pause", 1.5), ("resume", 1.3)):
            pm = statistics.median(x[step] for x in plat)
            rm = statistics.median(x[step] for x in raw)
            print(f"{step:7} platform {pm*1000:6.0f} ms  raw {rm*1000:6.0f} ms  ratio {pm/rm:.3f}  (goal <= {goal})")
        sm = statistics.median(x["from_snapshot"] for x in plat)
        cm = statistics.median(x["create"] for x in plat)
        print(f"create from a user snapshot {sm*1000:6.0f} ms  vs from the template {cm*1000:6.0f} ms  ratio {sm/cm:.3f}  (goal ~1)")
        for k in ("Rss", "Pss"):
            pm = statistics.median(x["mem"][k] for x in plat)
            rm = statistics.median(x["mem"][k] for x in raw)
            print(f"idle {k}  platform {pm/1024:6.1f} MiB raw {rm/1024:6.1f} MiB ratio {pm/rm:.3f}  (goal <= 1.2)")
    finally:
        teardown_raw_netns()
        try:
            stop_platform(wrenn_up, timeout=60)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
