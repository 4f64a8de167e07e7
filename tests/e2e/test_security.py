"""A hostile guest: what it does from inside its capsule stays inside it, and costs the
platform and its neighbours only what the platform allows."""

import json
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

from tests.support.envd import ENVD_PORT, auth_frame, capsule_token, frame, read_frame
from tests.support.platform import images_dir, start_platform, stop_platform
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status

MIB = 1 << 20


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"{field} not in /proc/{pid}/status")


def test_an_exec_flood_costs_the_control_plane_a_bounded_amount(api, platform, running_capsule):
    """Three foreground execs printing 128 MiB of control bytes each (each becomes a six-byte
    JSON escape): every answer keeps the first 1 MiB and says what it dropped, and the control
    plane's peak RSS grows by less than 64 MiB."""
    cid = running_capsule["id"]
    flood = f"head -c {128 * MIB} /dev/zero | tr '\\000' '\\001'; echo done >&2"
    # One small exec first, so what every exec allocates once is there before measuring.
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo hi"})
    assert r.status_code == 200 and r.json()["truncated"] is False, r.text
    assert r.json()["stdout_dropped_bytes"] == 0

    pid = platform.proc.pid
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = status_kib(pid, "VmHWM")

    def run(_):
        return api.post(f"/v1/capsules/{cid}/exec", json={"cmd": flood, "timeout_sec": 600},
                        timeout=700)

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(run, range(3)))
    peak = status_kib(pid, "VmHWM")

    for r in answers:
        assert r.status_code == 200, r.text[:300]
        body = r.json()
        assert body["exit_code"] == 0, body["stderr"][-500:]
        assert body["encoding"] == "utf-8"
        assert body["truncated"] is True
        assert body["stdout"] == "\x01" * MIB
        assert body["stdout_dropped_bytes"] == 127 * MIB
        assert body["stderr_dropped_bytes"] == 0
        assert body["stderr"].startswith("done\n")
        assert "output truncated" in body["stderr"]
    grew = (peak - before) * 1024
    assert grew < 64 * MIB, f"control plane peak RSS grew by {grew / MIB:.0f} MiB"

    # The capsule still answers.
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "echo still"})
    assert r.status_code == 200 and r.json()["stdout"] == "still\n", r.text


def exec_ok(api, cid, cmd, timeout=120):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": timeout},
                 timeout=timeout + 30)
    assert r.status_code == 200, r.text
    return r.json()


def slot_netns(host_ip):
    """The network namespace of the slot whose host-side address is `host_ip`."""
    for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines():
        ns = line.split()[0]
        if not ns.startswith("wrenn-s"):
            continue
        addrs = subprocess.run(["ip", "-n", ns, "-4", "-o", "addr", "show", "veth0"],
                               capture_output=True, text=True).stdout
        if f" {host_ip}/" in addrs:
            return ns
    raise AssertionError(f"no slot namespace holds {host_ip}")


def vmm_pid(capsule_id):
    pids = vmm_processes(capsule_id)
    assert len(pids) == 1, pids
    return pids[0]


def cgroup_dir(pid, controller):
    """The directory of `pid`'s cgroup holding `controller` (v1), or its v2 group."""
    with open(f"/proc/{pid}/cgroup") as f:
        lines = [line.strip().split(":", 2) for line in f]
    for _, names, path in lines:
        if controller in names.split(","):
            for mount in (f"/sys/fs/cgroup/{controller}", f"/sys/fs/cgroup/{names}"):
                if os.path.isdir(mount):
                    return mount + path
    for _, names, path in lines:
        if names == "":
            for root in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
                d = root + path
                if os.path.exists(os.path.join(d, "memory.max")):
                    return d
    raise AssertionError(f"no {controller} cgroup for {pid}")


def read(path):
    with open(path) as f:
        return f.read().strip()


def test_each_vm_runs_in_its_own_cgroup_with_limits(api, platform, running_capsule):
    c = running_capsule
    pid = vmm_pid(c["id"])
    # QEMU's seccomp filter is on (`-sandbox on`): a filter mode, not none.
    assert status_kib(pid, "Seccomp") == 2
    mem = cgroup_dir(pid, "memory")
    assert mem.endswith("/" + c["id"]), mem
    want_mem = (c["memory_mb"] + 448) << 20
    if os.path.exists(os.path.join(mem, "memory.max")):  # v2
        assert int(read(os.path.join(mem, "memory.max"))) == want_mem
        quota, period = read(os.path.join(mem, "cpu.max")).split()
        assert int(quota) == c["vcpus"] * int(period)
        assert read(os.path.join(mem, "pids.max")) == "256"
    else:  # v1
        assert int(read(os.path.join(mem, "memory.limit_in_bytes"))) == want_mem
        cpu = cgroup_dir(pid, "cpu")
        assert int(read(os.path.join(cpu, "cpu.cfs_quota_us"))) == c["vcpus"] * int(
            read(os.path.join(cpu, "cpu.cfs_period_us")))
        assert read(os.path.join(cgroup_dir(pid, "pids"), "pids.max")) == "256"
        # Every thread of QEMU is inside.
        tasks = set(read(os.path.join(mem, "tasks")).split())
        assert set(os.listdir(f"/proc/{pid}/task")) <= tasks
    # The platform logged which layout it uses.
    log = (platform.data_dir / "wrenn-up.log").read_text()
    assert "VMs run in cgroup v1 groups" in log or "VMs run in cgroup v2 groups" in log

    # A memory bomb in the guest is the guest's problem: its kernel kills it, QEMU stays.
    e = exec_ok(api, c["id"], "head -c 2000m /dev/zero | tail > /dev/null; echo survived")
    assert e["stdout"] == "survived\n" or e["exit_code"] != 0
    assert vmm_pid(c["id"]) == pid, "QEMU was killed"
    assert exec_ok(api, c["id"], "echo alive")["stdout"] == "alive\n"
    # Its metrics are its group's: what the limit holds it to.
    time.sleep(1)
    pts = api.get(f"/v1/capsules/{c['id']}/metrics").json()["points"]
    assert pts and all(0 < p["mem_bytes"] <= want_mem for p in pts), pts[-3:]

    # The group goes with its VM.
    api.delete(f"/v1/capsules/{c['id']}")
    wait_status(api, c["id"], {"stopped"}, timeout=30)
    assert not os.path.exists(mem)

    # Capsules created at once each get their group (one VM's start never removes another's
    # group before its QEMU joined it).
    ids = [api.post("/v1/capsules", json={}).json()["id"] for _ in range(4)]
    try:
        for i in ids:
            wait_status(api, i, {"running"}, timeout=120, fail_on={"error"})
            assert cgroup_dir(vmm_pid(i), "memory").endswith("/" + i)
    finally:
        for i in ids:
            api.delete(f"/v1/capsules/{i}")


def test_each_vm_runs_jailed(api, platform, running_capsule):
    """QEMU runs as the slot's own uid with no capability, seccomp-filtered, in a mount
    namespace that holds only its own files: not the data directory, not other capsules."""
    c = running_capsule
    pid = vmm_pid(c["id"])
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            fields[k] = v.split()
    uid = int(fields["Uid"][0])
    assert uid >= 0x4000_0000 and set(fields["Uid"]) == {str(uid)}, fields["Uid"]
    assert set(fields["Gid"]) == {str(uid)}, fields["Gid"]
    assert fields["Groups"] == []
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(fields[cap][0], 16) == 0, (cap, fields[cap])
    assert fields["NoNewPrivs"] == ["1"] and fields["Seccomp"] == ["2"]
    assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")

    # What its root holds: the system read-only, its devices, its own files, and of the shared
    # images only those its disk and boot read.
    root = f"/proc/{pid}/root"
    data = str(platform.data_dir).lstrip("/")
    images = str(images_dir()).lstrip("/")
    assert os.listdir(f"{root}/etc") == ["ld.so.cache"]
    assert set(os.listdir(f"{root}/dev")) - {"kvm"} == {"net", "null", "random", "urandom", "zero"}
    files = set()
    for top in set(os.listdir(root)) - {"usr", "bin", "sbin", "lib", "lib64", "etc", "dev", "proc"}:
        for d, _, names in os.walk(f"{root}/{top}"):
            files |= {os.path.join(d, n)[len(root) + 1:] for n in names}
    capsule = f"{data}/capsules/{c['id']}"
    assert {f"{capsule}/disk.qcow2", f"{capsule}/console.log"} <= files, files
    # No record, no token, no saved state, no database, no key, no other capsule's files.
    strays = {f for f in files if not f.startswith(images + "/")} - {
        f"{capsule}/disk.qcow2", f"{capsule}/console.log"}
    assert not strays, strays
    shared = {os.path.basename(f) for f in files if f.startswith(images + "/")}
    assert shared <= {"vmlinux", "initramfs.cpio", "disk.qcow2"} | {
        n for n in shared if n.endswith((".ext4", ".img", ".cpio"))}, shared
    host_own = platform.data_dir / "capsules" / c["id"]
    assert os.stat(host_own / "disk.qcow2").st_uid == uid
    assert os.stat(host_own / "state.json").st_uid == 0
    assert os.stat(host_own).st_uid == 0, "the capsule's directory stays root's"

    # Mounts: the root and everything but its disk and console read-only.
    with open(f"/proc/{pid}/mountinfo") as f:
        mounts = [line.split() for line in f]
    by_point = {m[4]: m[5].split(",") for m in mounts}
    assert "ro" in by_point["/"] and "ro" in by_point["/usr"], by_point
    rw = {p for p, opts in by_point.items() if "rw" in opts}
    assert rw <= {f"/{data}/capsules/{c['id']}/disk.qcow2", f"/{data}/capsules/{c['id']}/console.log",
                  "/proc"}, rw
    assert "hidepid=invisible" in open(f"/proc/{pid}/mountinfo").read() or \
        "hidepid=2" in open(f"/proc/{pid}/mountinfo").read()

    # It still works as a VM: exec, and a pause and resume (states through descriptors).
    assert exec_ok(api, c["id"], "echo jailed")["stdout"] == "jailed\n"
    api.post(f"/v1/capsules/{c['id']}/pause")
    wait_status(api, c["id"], {"paused"}, timeout=60)
    api.post(f"/v1/capsules/{c['id']}/resume")
    wait_status(api, c["id"], {"running"}, timeout=60, fail_on={"error"})
    assert exec_ok(api, c["id"], "echo again")["stdout"] == "again\n"
    assert vmm_pid(c["id"]) != pid


def test_a_fork_bomb_stays_in_its_capsule(api, platform):
    """A fork bomb fills its own guest; its neighbour, the API and the host serve on, and the
    capsule is destroyed cleanly."""
    ids = [api.post("/v1/capsules", json={}).json()["id"] for _ in range(2)]
    try:
        bomb, neighbour = (wait_status(api, i, {"running"}, timeout=60, fail_on={"error"}) for i in ids)
        pid = vmm_pid(bomb["id"])
        r = api.post(f"/v1/capsules/{bomb['id']}/exec",
                     json={"cmd": "sh -c 'b(){ b | b & }; b' >/dev/null 2>&1 &", "background": True})
        assert r.status_code in (200, 202), r.text
        deadline = time.time() + 15
        while time.time() < deadline:
            t0 = time.time()
            assert exec_ok(api, neighbour["id"], "echo fine")["stdout"] == "fine\n"
            assert time.time() - t0 < 5, "the neighbour slowed to a crawl"
            assert api.get("/v1/capsules").status_code == 200
            time.sleep(1)
        # The bomb's QEMU is still one process within its task limit.
        assert vmm_pid(bomb["id"]) == pid
        assert len(os.listdir(f"/proc/{pid}/task")) <= 256
        r = api.delete(f"/v1/capsules/{bomb['id']}")
        assert r.status_code in (202, 204), r.text
        wait_status(api, bomb["id"], {"stopped"}, timeout=60)
        assert not vmm_processes(bomb["id"])
    finally:
        for i in ids:
            api.delete(f"/v1/capsules/{i}")


def test_a_console_flood_stays_small_on_disk(api, platform, running_capsule):
    cid = running_capsule["id"]
    log = platform.data_dir / "capsules" / cid / "console.log"
    exec_ok(api, cid, "timeout 20 sh -c 'while :; do echo AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA; done > /dev/ttyS0'; true",
            timeout=60)
    time.sleep(1.5)  # one sampling round
    st = os.stat(log)
    assert st.st_blocks * 512 <= 4 * MIB, f"console log takes {st.st_blocks * 512} bytes"
    assert exec_ok(api, cid, "echo alive")["stdout"] == "alive\n"


def test_the_network_admits_no_spoofing_and_no_strangers(api, platform):
    ids = []
    try:
        for _ in range(2):
            r = api.post("/v1/capsules", json={})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        a, b = (wait_status(api, i, {"running"}, timeout=60, fail_on={"error"}) for i in ids)
        ns = slot_netns(a["host_ip"])

        # Spoofed-source UDP from the guest never leaves its TAP; its own address does.
        listener = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-c",
             "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
             "s.bind(('0.0.0.0', 9999)); s.settimeout(15)\n"
             "try:\n    while True: print(s.recvfrom(100)[0].decode(), flush=True)\n"
             "except socket.timeout: pass"],
            stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        e = exec_ok(api, a["id"], "bash -c '"
                    "for i in 1 2 3; do echo honest > /dev/udp/10.200.0.1/9999; done; "
                    "ip addr add 10.200.0.77/24 dev eth0 && "
                    "ip route add 10.200.0.1/32 dev eth0 src 10.200.0.77 && "
                    "for i in 1 2 3; do echo spoofed > /dev/udp/10.200.0.1/9999; done; "
                    "ip route del 10.200.0.1/32; ip addr del 10.200.0.77/24 dev eth0'")
        assert e["exit_code"] == 0, e
        out, _ = listener.communicate(timeout=30)
        assert "honest" in out, out
        assert "spoofed" not in out, out

        # A scan of the host from the guest finds nothing open: not the slot's host side, not
        # the host's own addresses, not the API.
        srv = socket.socket()
        srv.bind(("0.0.0.0", 0))
        srv.listen()
        port = srv.getsockname()[1]
        api_port = platform.base_url.rsplit(":", 1)[1]
        host_side = ".".join(a["host_ip"].split(".")[:3] + [str(int(a["host_ip"].split(".")[3]) - 1)])
        targets = [f"{host_side}:{port}", f"{host_side}:{api_port}", f"{host_side}:22",
                   f"{b['host_ip']}:49983", f"{b['host_ip']}:{port}", f"10.200.0.1:{port}",
                   f"169.254.169.254:80"]
        script = " ".join(
            f"(timeout 3 bash -c 'echo > /dev/tcp/{t.split(':')[0]}/{t.split(':')[1]}' 2>/dev/null && echo OPEN {t});"
            for t in targets)
        e = exec_ok(api, a["id"], script + " true")
        assert "OPEN" not in e["stdout"], e["stdout"]
        srv.close()

        # A neighbour that routes the slot range through this host reaches no envd (from a
        # public address: answers to private ones are dropped anyway).
        nbr = "wrtest-nbr"
        subprocess.run(["ip", "netns", "del", nbr], capture_output=True)
        subprocess.run(["ip", "link", "del", "wrtnbr0"], capture_output=True)
        run = lambda *c: subprocess.run(c, check=True, capture_output=True)  # noqa: E731
        try:
            run("ip", "netns", "add", nbr)
            run("ip", "link", "add", "wrtnbr0", "type", "veth", "peer", "name", "wrtnbr1", "netns", nbr)
            run("ip", "addr", "add", "198.51.100.1/30", "dev", "wrtnbr0")
            run("ip", "link", "set", "wrtnbr0", "up")
            run("ip", "-n", nbr, "addr", "add", "198.51.100.2/30", "dev", "wrtnbr1")
            run("ip", "-n", nbr, "link", "set", "wrtnbr1", "up")
            run("ip", "-n", nbr, "link", "set", "lo", "up")
            run("ip", "-n", nbr, "route", "add", "10.201.0.0/16", "via", "198.51.100.1")
            probe = subprocess.run(
                ["ip", "netns", "exec", nbr, "timeout", "4", "bash", "-c",
                 f"echo > /dev/tcp/{a['host_ip']}/49983 && echo OPEN"],
                capture_output=True, text=True)
            assert "OPEN" not in probe.stdout, "a neighbour reached envd"
        finally:
            subprocess.run(["ip", "netns", "del", nbr], capture_output=True)
            subprocess.run(["ip", "link", "del", "wrtnbr0"], capture_output=True)

        # The host and both capsules still serve.
        for c in (a, b):
            assert exec_ok(api, c["id"], "echo alive")["stdout"] == "alive\n"
    finally:
        for i in ids:
            api.delete(f"/v1/capsules/{i}")


def test_a_host_keeps_its_disk_reserve():
    """A host whose disk is down to its reserve takes no new capsule: 507 at once, nothing
    made."""
    p = start_platform(slot_base="10.201.190.0", max_slots=4,
                       env_extra={"WRENN_DISK_RESERVE_MB": str(1 << 40)})  # more than any disk
    try:
        with p.client() as api:
            r = api.post("/v1/capsules", json={})
            assert r.status_code == 507, r.text
            e = r.json()["error"]
            assert e["code"] == "insufficient_storage"
            assert "keeps" in e["message"]
            assert api.get("/v1/capsules").json() == []
    finally:
        stop_platform(p)


def envd_ask(host_ip, *frames):
    """Sends `frames` on a new connection to the envd at `host_ip`; its first answer."""
    s = socket.create_connection((host_ip, ENVD_PORT), timeout=10)
    try:
        s.sendall(b"".join(frames))
        kind, body = read_frame(s)
        return json.loads(body)
    finally:
        s.close()


def test_envd_answers_only_its_capsules_host(api, platform, running_capsule):
    """Reaching a capsule's envd is not enough: every connection must present the capsule's
    own token, which capsules restored from one snapshot do not share."""
    c = running_capsule
    token = capsule_token(platform.data_dir, c["id"])
    assert token and len(token) == 64
    state = platform.data_dir / "capsules" / c["id"] / "state.json"
    assert os.stat(state).st_mode & 0o077 == 0, "the record holding the token is root's only"

    health = frame({"op": "health"})
    for frames in ([health], [auth_frame("0" * 64), health], [auth_frame(token[:-1]), health]):
        answer = envd_ask(c["host_ip"], *frames)
        assert answer["type"] == "error" and answer["kind"] == "unauthorized", answer
    exec_true = frame({"op": "exec", "cmd": "id -u", "timeout_ms": 10000})
    assert envd_ask(c["host_ip"], exec_true)["kind"] == "unauthorized"
    assert envd_ask(c["host_ip"], auth_frame(token), health)["type"] == "health"

    # Another capsule from the same template snapshot has a token of its own.
    r = api.post("/v1/capsules", json={})
    other = wait_status(api, r.json()["id"], {"running"}, timeout=60, fail_on={"error"})
    try:
        other_token = capsule_token(platform.data_dir, other["id"])
        assert other_token and other_token != token
        assert envd_ask(other["host_ip"], auth_frame(token), health)["kind"] == "unauthorized"
        assert envd_ask(other["host_ip"], auth_frame(other_token), health)["type"] == "health"
        # ... which it keeps across a pause, and the API still reaches it.
        api.post(f"/v1/capsules/{other['id']}/pause")
        wait_status(api, other["id"], {"paused"}, timeout=60)
        api.post(f"/v1/capsules/{other['id']}/resume")
        wait_status(api, other["id"], {"running"}, timeout=60, fail_on={"error"})
        assert capsule_token(platform.data_dir, other["id"]) == other_token
        assert envd_ask(other["host_ip"], health)["kind"] == "unauthorized"
        assert exec_ok(api, other["id"], "echo alive")["stdout"] == "alive\n"
    finally:
        api.delete(f"/v1/capsules/{other['id']}")


def reach(api, cid, *addrs):
    """What the guest of `cid` gets from port 8080 of each address: `hi`, `refused` (at once,
    as a policy refuses) or `timeout`."""
    script = " ".join(
        f"(r=$(timeout 4 bash -c 'exec 3<>/dev/tcp/{a}/8080 && head -c 2 <&3' 2>/dev/null);"
        f" rc=$?; [ $rc = 124 ] && echo {a}=timeout || echo {a}=${{r:-refused}});"
        for a in addrs)
    out = exec_ok(api, cid, script)["stdout"]
    return dict(line.split("=", 1) for line in out.split())


def test_an_egress_policy_opens_and_closes_destinations(api, platform):
    """`network` on create and PUT /network: allow_out, deny_out and internet false, enforced
    from the first instruction, changed on a running capsule at once and on a paused one at its
    resume; the platform's own way in (exec) keeps working whatever the policy."""
    ns = "wrtest-net"
    run = lambda *c: subprocess.run(c, check=True, capture_output=True)  # noqa: E731
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", "wrtnet0"], capture_output=True)
    server = None
    cid = None
    try:
        # Two "internet" addresses in a namespace of our own (TEST-NET-3), routed via the host.
        run("ip", "netns", "add", ns)
        run("ip", "link", "add", "wrtnet0", "type", "veth", "peer", "name", "wrtnet1", "netns", ns)
        run("ip", "addr", "add", "203.0.113.1/24", "dev", "wrtnet0")
        run("ip", "link", "set", "wrtnet0", "up")
        for a in ("203.0.113.2/24", "203.0.113.3/24"):
            run("ip", "-n", ns, "addr", "add", a, "dev", "wrtnet1")
        run("ip", "-n", ns, "link", "set", "wrtnet1", "up")
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, "python3", "-c",
             "import socket\ns = socket.create_server(('0.0.0.0', 8080))\n"
             "while True:\n    c, _ = s.accept(); c.sendall(b'hi'); c.close()"])
        time.sleep(0.5)
        a, b = "203.0.113.2", "203.0.113.3"

        for bad in ({"allow_out": ["2001:db8::1"]}, {"deny_out": ["*.example.com"]},
                    {"internet": "no"}, {"allow": []}):
            r = api.post("/v1/capsules", json={"network": bad})
            assert r.status_code == 400, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_request"

        r = api.post("/v1/capsules", json={"network": {"internet": False, "allow_out": [a]}})
        assert r.status_code == 202, r.text
        cid = r.json()["id"]
        want = {"internet": False, "allow_out": [f"{a}/32"], "deny_out": []}
        assert r.json()["network"] == want
        c = wait_status(api, cid, {"running"}, timeout=60, fail_on={"error"})
        assert c["network"] == want
        assert reach(api, cid, a, b) == {a: "hi", b: "refused"}

        # Changed while it runs: at once.
        r = api.put(f"/v1/capsules/{cid}/network", json={"deny_out": ["203.0.113.2/31"]})
        assert r.status_code == 200, r.text
        assert r.json() == {"internet": True, "allow_out": [], "deny_out": ["203.0.113.2/31"]}
        assert reach(api, cid, a, b) == {a: "refused", b: "refused"}
        r = api.put(f"/v1/capsules/{cid}/network",
                    json={"allow_out": [b], "deny_out": ["203.0.113.0/24"]})
        assert r.status_code == 200, r.text
        assert reach(api, cid, a, b) == {a: "refused", b: "hi"}
        r = api.put(f"/v1/capsules/{cid}/network", json={"deny_out": ["not a host"]})
        assert r.status_code == 400 and "deny_out" in r.json()["error"]["message"], r.text
        assert api.put("/v1/capsules/cap-nosuchcapsule/network", json={}).status_code == 404

        # A domain opens what the host resolves it to, and DNS with it.
        r = api.put(f"/v1/capsules/{cid}/network", json={"internet": False, "allow_out": ["LocalHost."]})
        assert r.status_code == 200 and r.json()["allow_out"] == ["localhost"], r.text
        rules = subprocess.run(["ip", "netns", "exec", slot_netns(c["host_ip"]), "nft", "list",
                                "table", "ip", "wrenn_egress"], capture_output=True, text=True).stdout
        assert "127.0.0.1" in rules and "dport 53" in rules, rules
        assert reach(api, cid, a, b) == {a: "refused", b: "refused"}

        # Changed while paused: from the resume on.
        api.post(f"/v1/capsules/{cid}/pause")
        wait_status(api, cid, {"paused"}, timeout=60)
        r = api.put(f"/v1/capsules/{cid}/network", json={"internet": True, "deny_out": [b]})
        assert r.status_code == 200, r.text
        api.post(f"/v1/capsules/{cid}/resume")
        c = wait_status(api, cid, {"running"}, timeout=60, fail_on={"error"})
        assert c["network"] == {"internet": True, "allow_out": [], "deny_out": [f"{b}/32"]}
        assert api.get(f"/v1/capsules/{cid}/network").json() == c["network"]
        assert reach(api, cid, a, b) == {a: "hi", b: "refused"}

        # Back to the default: no table left in the slot.
        assert api.put(f"/v1/capsules/{cid}/network", json={}).status_code == 200
        assert reach(api, cid, a, b) == {a: "hi", b: "hi"}
        listed = subprocess.run(["ip", "netns", "exec", slot_netns(c["host_ip"]), "nft", "list",
                                 "tables"], capture_output=True, text=True).stdout
        assert "wrenn_egress" not in listed, listed
    finally:
        if cid:
            api.delete(f"/v1/capsules/{cid}")
        if server:
            server.kill()
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", "wrtnet0"], capture_output=True)
