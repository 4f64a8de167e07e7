"""User code cannot cut the platform off from its capsule (ARCHITECTURE.md).

The host reaches envd over TCP on the guest network, which code in the guest can take down. So
the guest's platform interface is guarded by envd (put back within a second) and reachable over
a serial lifeline (a virtio-serial port) that does not depend on the guest network at all.
"""

import hashlib
import json
import socket
import time

from wrenn import Capsule

from test_pty import read_until

BREAKS = [
    "ip link set eth0 down",
    "ip addr flush dev eth0",
    "ip route flush table main",
    "ip neigh flush all; ip neigh del 10.200.0.1 dev eth0",
    "ip link set eth0 down; ip addr flush dev eth0; ip route flush table main",
]


def run(api, cid, cmd, timeout=60):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 30}, timeout=timeout)
    assert r.status_code == 200, r.text
    return r.json()


def test_breaking_the_guest_network_leaves_exec_files_and_pty_working(platform, api, running_capsule):
    cid = running_capsule["id"]
    cap = Capsule.connect(cid, api_key=platform.api_key, base_url=platform.base_url)
    with cap.pty(cols=80, rows=24) as term:
        it = iter(term)
        term.write(b"echo READY-$((2+2))\n")
        read_until(it, b"READY-4")
        for n, brk in enumerate(BREAKS):
            started = time.monotonic()
            # The command's own answer travels over the network it breaks.
            out = run(api, cid, brk)
            assert out["exit_code"] in (0, 1, 2), out
            assert run(api, cid, "echo alive")["stdout"] == "alive\n"
            took = time.monotonic() - started
            assert took < 30, f"{brk!r}: recovering took {took:.1f} s"
            # Files both ways.
            body = f"after break {n}\n".encode()
            cap.files.write(f"/tmp/after-{n}.txt", body)
            assert cap.files.read_bytes(f"/tmp/after-{n}.txt") == body
            # The terminal opened before the break still works.
            term.write(f"echo PTY-{n}-$((1+{n}))\n".encode())
            read_until(it, f"PTY-{n}-{1 + n}".encode())
    state = run(api, cid, "ip -4 -o addr show dev eth0; ip route; ip link show eth0")["stdout"]
    assert "10.200.0.2/24" in state and "default via 10.200.0.1" in state and "state UP" in state, state


def test_flushing_the_guest_firewall_is_harmless(api, running_capsule):
    """The platform keeps no rule inside the guest: its firewall lives in the slot's namespace."""
    cid = running_capsule["id"]
    out = run(api, cid, "command -v nft iptables || echo none")
    if out["stdout"].strip() != "none":
        run(api, cid, "nft flush ruleset 2>/dev/null; iptables -F 2>/dev/null; true")
    assert run(api, cid, "echo alive")["stdout"] == "alive\n"


def lifeline_call(path, request, timeout=10):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(4096)
            assert chunk, "lifeline closed"
            buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])


def test_serial_lifeline_answers_without_the_network(platform, api, running_capsule):
    cid = running_capsule["id"]
    run_dir = "/run/wrenn-" + hashlib.sha256(str(platform.data_dir).encode()).hexdigest()[:8]
    path = f"{run_dir}/{cid}.life"
    reply = lifeline_call(path, {"id": 7, "op": "health"})
    assert reply["id"] == 7 and reply["envd_version"], reply
    assert reply["network"] == {"repaired": [], "failed": []}, reply
    # A garbled line gets an error, and the port keeps serving.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.sendall(b"not json\n" + json.dumps({"id": 8, "op": "repair_network"}).encode() + b"\n")
        buf = b""
        while buf.count(b"\n") < 2:
            chunk = s.recv(4096)
            assert chunk, "lifeline closed"
            buf += chunk
        first, second = (json.loads(line) for line in buf.split(b"\n")[:2])
        assert "bad request" in first["error"]
        assert second["id"] == 8 and second["network"]["failed"] == []
