"""Benchmark: a cold boot — API create -> first exec answered with template snapshots off
(`WRENN_TEMPLATE_SNAPSHOTS=false`, what the first create of a template does before it is
snapshotted), against raw QEMU booting the same kernel/initramfs/rootfs to envd-ready, in one
run on the same machine. `lifecycle.py` measures the restore path.

    sudo python3 -m bench.create_to_exec [--runs N]     (from the repository root)

The platform side starts its own `wrenn up` (temporary data dir, shared image cache) and times
POST /v1/capsules until POST /v1/capsules/{id}/exec answers. The baseline replays the very QEMU
command line the platform used (read from /proc), in a network namespace set up the same way,
and times process start until envd has answered a health request and run `true` (a helper
started in the netns before the clock starts polls it, 50 ms connect timeout). Reports medians and their ratio
(platform / raw; goal <= 1.15). Machines here are shared and noisy: compare ratios, not seconds.
"""

import argparse
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.envd import EnvdProbe, token_in_cmdline
from tests.support.platform import images_dir, start_bench_platform, stop_platform
from tests.support.qemu import RAW_NICE, RAW_NS, qemu_cmdline, rewrite, setup_raw_netns, sh, teardown_raw_netns


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


def raw_run(template, work):
    disk = work / "raw.qcow2"
    if disk.exists():
        disk.unlink()
    # The capsule's own overlay is gone with it; make the same one on the same template.
    backing = sorted((images_dir() / "rootfs").glob("minimal-*.ext4"))[-1]
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(backing), "-F", "raw", str(disk), "5120M")
    args = rewrite(template, work, disk)
    # The same command line: the same token on its kernel command line, presented alike.
    probe = EnvdProbe(RAW_NS, token_in_cmdline(args))
    t0 = time.perf_counter()
    proc = subprocess.Popen(["ip", "netns", "exec", RAW_NS] + RAW_NICE + args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    probe.go()  # polls envd until it answers, then runs `true` through it, as the platform's create ends
    probe.wait()
    elapsed = time.perf_counter() - t0
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return elapsed


def main():
    ap = argparse.ArgumentParser(prog="python3 -m bench.create_to_exec")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    data_dir = tempfile.mkdtemp(prefix="wrenn-bench-")
    work = Path(data_dir)
    wrenn_up = start_bench_platform(data_dir, env_extra={"WRENN_TEMPLATE_SNAPSHOTS": "false"})
    try:
        api = wrenn_up.client(timeout=60)
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
        try:
            stop_platform(wrenn_up, timeout=60)
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
