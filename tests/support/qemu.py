"""QEMU processes and command lines, and the network namespace the raw-QEMU baselines of the
benchmarks boot in."""

import subprocess
from pathlib import Path

# The raw baseline's network namespace, set up as the platform sets up a slot's: a TAP device
# with the host side's address and MAC, so the guest (the same image, same command line) finds
# its network as in a capsule.
RAW_NS = "wrenn-bench-raw"
# The agent runs every QEMU at nice 5 (`VM_NICE`); the raw baseline does the same.
RAW_NICE = ["nice", "-n", "5"]


def _cmdlines():
    """(pid, argv as bytes) of every process whose command line can be read."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
        except OSError:
            continue
        yield int(p.name), cmd


def vmm_processes(marker):
    """PIDs of QEMU processes whose command line mentions `marker` (a data dir, a capsule id)."""
    return [pid for pid, cmd in _cmdlines() if b"qemu-system" in cmd and marker.encode() in cmd]


def qemu_cmdline(capsule_id):
    """The command line of the QEMU process running `capsule_id`."""
    for _, cmd in _cmdlines():
        args = cmd.split(b"\0")[:-1]
        if args and b"qemu-system" in args[0] and capsule_id.encode() in args:
            return [a.decode() for a in args]
    raise RuntimeError("no QEMU process for " + capsule_id)


def backing_file(image):
    """The file a qcow2 image sits on (from its header), or None."""
    with open(image, "rb") as f:
        head = f.read(20)
        if head[:4] != b"QFI\xfb":
            return None
        offset = int.from_bytes(head[8:16], "big")
        size = int.from_bytes(head[16:20], "big")
        if not offset:
            return None
        f.seek(offset)
        name = f.read(size).decode()
    return str(Path(image).parent / name) if not name.startswith("/") else name


def drive_file(cmdline):
    """The disk file on a QEMU command line (its `-drive file=`)."""
    spec = cmdline[cmdline.index("-drive") + 1]
    return next(p[len("file="):] for p in spec.split(",") if p.startswith("file="))


def rewrite(cmdline, work, disk, memory=None):
    """The platform's QEMU command line, with the raw run's own disk, sockets, console and
    (when given) memory backend (the platform's RAM file is a descriptor only it has)."""
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
            elif spec.startswith("socket,id=qmp"):
                # The platform hands QEMU sockets it bound; the raw run lets QEMU bind its own.
                spec = f"socket,id=qmp,path={work}/raw.qmp,server=on,wait=off"
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
