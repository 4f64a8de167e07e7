"""A minimal QMP client (QEMU's JSON control protocol on a unix socket): one command at a time,
asynchronous events skipped."""

import json
import socket
import time


class Qmp:
    def __init__(self, path, timeout=30):
        deadline = time.time() + timeout
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(str(path))
                break
            except OSError:
                if time.time() > deadline:
                    raise
                time.sleep(0.005)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")

    def cmd(self, execute, **arguments):
        msg = {"execute": execute}
        if arguments:
            msg["arguments"] = arguments
        self.f.write(json.dumps(msg) + "\n")
        self.f.flush()
        while True:
            m = json.loads(self.f.readline())
            if "return" in m:
                return m["return"]
            if "error" in m:
                raise RuntimeError(f"{execute}: {m['error']}")

    def pass_fd(self, name, fd):
        """Hands QEMU a copy of descriptor `fd` under `name` (`getfd` with SCM_RIGHTS), for
        `fd:<name>` migrations, as the agent does."""
        self.f.flush()
        msg = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}) + "\n"
        socket.send_fds(self.s, [msg.encode()], [fd])
        while True:
            m = json.loads(self.f.readline())
            if "return" in m:
                return
            if "error" in m:
                raise RuntimeError(f"getfd: {m['error']}")

    def wait_migration(self):
        while True:
            st = self.cmd("query-migrate").get("status")
            if st == "completed":
                return
            if st in ("failed", "cancelled"):
                raise RuntimeError("migration " + st)
            time.sleep(0.005)

    def close(self):
        self.s.close()
