"""The wire protocol between the host and envd (the guest agent), as the host agent speaks it.

One TCP connection carries one operation. A frame is 1 byte of kind, a 4-byte big-endian length,
then that many bytes. The client opens with a JSON request frame (`{"op": ...}`); envd answers
with frames ending with a JSON response (for an exec: output frames, then `{"type": "exit", ...}`).
An envd holding its capsule's token needs `{"op": "auth", "token": ...}` first on every
connection; the agent keeps the token in the capsule's `state.json` (`capsule_token`).
"""

import json
import re
import socket
import struct
import subprocess
import sys

# envd's TCP port inside the guest, and the address every guest has on its slot's network.
ENVD_PORT = 49983
GUEST_IP = "10.200.0.2"

# Frame kinds.
JSON = 1
STDOUT = 2
STDERR = 3
DATA = 4


def frame(obj, kind=JSON):
    """One frame holding `obj` as JSON."""
    body = json.dumps(obj).encode()
    return struct.pack(">BI", kind, len(body)) + body


def read_frame(sock):
    """The next frame on `sock` as (kind, body); EOFError when the peer closed first."""
    head = b""
    while len(head) < 5:
        chunk = sock.recv(5 - len(head))
        if not chunk:
            raise EOFError
        head += chunk
    kind, n = struct.unpack(">BI", head)
    body = b""
    while len(body) < n:
        body += sock.recv(n - len(body))
    return kind, body


def auth_frame(token):
    """The frame presenting `token` (nothing when there is none)."""
    return frame({"op": "auth", "token": token}) if token else b""


def capsule_token(data_dir, capsule_id):
    """The token capsule `capsule_id`'s envd requires (from the agent's record under
    `data_dir`), or None."""
    with open(f"{data_dir}/capsules/{capsule_id}/state.json") as f:
        return json.load(f).get("envd_token")


def token_in_cmdline(args):
    """The token a VM started with `args` (a QEMU command line) boots its envd with, if any."""
    append = args[args.index("-append") + 1] if "-append" in args else ""
    m = re.search(r"(?:^| )WRENN_ENVD_TOKEN=(\S+)", append)
    return m.group(1) if m else None


def envd_exec(host_ip, cmd="true", timeout_ms=30000, token=None):
    """Runs `cmd` through envd at `host_ip` (a capsule's `host_ip`) and waits for its exit."""
    s = socket.create_connection((host_ip, ENVD_PORT))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.sendall(auth_frame(token) + frame({"op": "exec", "cmd": cmd, "timeout_ms": timeout_ms}))
    while True:
        kind, body = read_frame(s)
        if kind == JSON and json.loads(body).get("type") == "exit":
            break
    s.close()


HEALTH_FRAME = frame({"op": "health"})
EXEC_TRUE_FRAME = frame({"op": "exec", "cmd": "true", "timeout_ms": 10000})


class EnvdProbe:
    """A helper inside network namespace `netns`, started (interpreter loaded) before the clock
    starts: on `go` (sent once the guest runs) it waits until envd answers, then runs `true`
    through it to its exit, as the platform's measurement ends with an exec answered."""

    CODE = (
        "import socket,sys,time\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"
        "while True:\n"
        "  try:\n"
        "    s=socket.create_connection((GUEST,PORT),timeout=0.05)\n"
        "    s.sendall(HEALTH)\n"
        "    if s.recv(5): break\n"
        "  except OSError: time.sleep(0.005)\n"
        "s=socket.create_connection((GUEST,PORT),timeout=10)\n"
        "s.sendall(EXEC)\n"
        "f=s.makefile('rb')\n"
        "while True:\n"
        "  h=f.read(5)\n"
        "  if len(h)<5: sys.exit(1)\n"
        "  body=f.read(int.from_bytes(h[1:],'big'))\n"
        "  if h[0]==1 and b'exit' in body: break\n"
        "print('done', flush=True)\n"
    )

    def __init__(self, netns, token=None):
        auth = auth_frame(token)
        code = (f"HEALTH={auth + HEALTH_FRAME!r}\nEXEC={auth + EXEC_TRUE_FRAME!r}\nGUEST={GUEST_IP!r}\n"
                f"PORT={ENVD_PORT}\n" + self.CODE)
        self.p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def go(self):
        self.p.stdin.write("go\n")
        self.p.stdin.flush()

    def wait(self):
        assert self.p.stdout.readline().strip() == "done", "envd never answered the raw VM's exec"
        self.p.wait(timeout=10)
