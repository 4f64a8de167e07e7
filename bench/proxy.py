"""Benchmark: the port proxy, the code runner and file transfers, each against a baseline
measured in the same run (see bench/README.md).

    sudo python3 -m bench.proxy [--runs N] [--mib M] [--skip-code-runner]     (from the repository root)

In one `python` capsule, servers bound to every address of the guest, so the host can also
reach them straight at the capsule's `host_ip` (the slot's address, forwarded to the guest):

1. **Small GET**: N interleaved `GET /` of a 2-byte answer, through the proxy (the API's
   address with the `{port}-{capsule}.localhost` Host header) and straight to the guest, both
   over one kept-alive raw socket each. p50/p99 of both and the p50 overhead (goal <= 1 ms).
2. **Download and upload of M MiB** (default 256) through the proxy vs straight to the guest,
   best of 3 each (goal: proxy >= 0.8x direct).
3. **WebSocket echo**: N round trips of a 32-byte text message, proxy vs direct (p50).
4. **Files**: `files/stream/write` upload and `files/stream/read` download of M MiB vs the same
   bytes over raw TCP into a guest process writing the same file system (and reading it out),
   best of 3 each (goal: >= 0.5x raw).
5. **Code runner**: `code-runner-beta` create -> first `run_code("1+1")` answered, with the
   official SDK, vs `minimal` create -> first `commands.run("true")`, medians of N/10 runs
   (goal: <= +300 ms). The platform builds the built-in templates first unless the shared
   image cache holds them.

Machines here are shared and noisy: compare the ratios, not the seconds.
"""

import argparse
import json
import socket
import statistics
import tempfile
import time

from tests.support.platform import start_bench_platform, stop_platform
from tests.support.waits import wait_status

# In the guest: a keep-alive HTTP/1.1 server (small answer, download, upload), a WebSocket
# echo server and a raw TCP sink/source for the file baseline. Standard library only.
SERVERS = r'''
import base64, hashlib, http.server, socket, socketserver, struct, sys, threading

CHUNK = b"\0" * (1 << 20)

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a): pass
    def setup(self):
        # A well-behaved server: headers and body leave at once on both paths alike.
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    def do_GET(self):
        if self.path.startswith("/big/"):
            n = int(self.path.split("/")[2])
            self.send_response(200); self.send_header("content-length", str(n)); self.end_headers()
            while n:
                k = min(n, len(CHUNK)); self.wfile.write(CHUNK[:k]); n -= k
            return
        self.send_response(200); self.send_header("content-length", "2"); self.end_headers()
        self.wfile.write(b"ok")
    def do_POST(self):
        n = int(self.headers["content-length"]); got = 0
        while got < n:
            b = self.rfile.read(min(1 << 20, n - got))
            if not b: break
            got += len(b)
        out = str(got).encode()
        self.send_response(200); self.send_header("content-length", str(len(out))); self.end_headers()
        self.wfile.write(out)

def ws(c):
    req = b""
    while b"\r\n\r\n" not in req:
        b = c.recv(4096)
        if not b: return
        req += b
    key = [l.split(b":", 1)[1].strip() for l in req.split(b"\r\n") if l.lower().startswith(b"sec-websocket-key")][0]
    acc = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    c.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + acc + b"\r\n\r\n")
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = c.makefile("rb")
    while True:
        h = f.read(2)
        if len(h) < 2: return
        n = h[1] & 127
        if n == 126: n = struct.unpack(">H", f.read(2))[0]
        mask = f.read(4)
        data = bytes(x ^ mask[i % 4] for i, x in enumerate(f.read(n)))
        if h[0] & 15 == 8: return
        c.sendall(bytes([0x81, len(data)]) + data)

def listen(port, handle):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", port)); s.listen()
    while True:
        c, _ = s.accept(); threading.Thread(target=handle, args=(c,), daemon=True).start()

def sink(c):
    # The raw baseline of a file upload: the bytes into a file, then "done".
    with open("/root/raw.bin", "wb") as f:
        while b := c.recv(1 << 20):
            f.write(b)
    c.close()

def source(c):
    # The raw baseline of a file download: the file's bytes onto the socket.
    with open("/root/raw.bin", "rb") as f:
        c.sendfile(f)
    c.close()

for port, h in ((9001, ws), (9003, sink), (9004, source)):
    threading.Thread(target=listen, args=(port, h), daemon=True).start()
socketserver.TCPServer.allow_reuse_address = True
http.server.ThreadingHTTPServer(("0.0.0.0", 9000), H).serve_forever()
'''


class Raw:
    """One kept-alive HTTP/1.1 connection on a raw socket: requests in one write, answers read
    by Content-Length. As little client work on both sides of a comparison."""

    def __init__(self, addr, host, headers=""):
        self.s = socket.create_connection(addr)
        self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.f = self.s.makefile("rb")
        self.host, self.headers = host, headers

    def request(self, method, path, body_len=0, sink=False):
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n{self.headers}"
                f"Content-Length: {body_len}\r\n\r\n").encode()
        self.s.sendall(head)
        if body_len:
            chunk = b"\0" * (1 << 20)
            left = body_len
            while left:
                k = min(left, len(chunk))
                self.s.sendall(chunk[:k] if k < len(chunk) else chunk)
                left -= k
        status = int(self.f.readline().split()[1])
        n = 0
        while (line := self.f.readline()) != b"\r\n":
            if line.lower().startswith(b"content-length:"):
                n = int(line.split(b":")[1])
        if sink:
            left = n
            while left:
                b = self.f.read(min(left, 1 << 20))
                assert b, "short body"
                left -= len(b)
            return status, n
        return status, self.f.read(n)

    def close(self):
        self.s.close()


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def ms(x):
    return f"{x * 1000:.2f} ms"


def run(api, cid, cmd, background=False):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": 600, "background": background})
    if r.status_code not in (200, 201, 202):
        raise SystemExit(f"{cmd!r}: {r.text}")
    return r.json()


def small_gets(proxy, direct, runs):
    p, d = [], []
    for _ in range(runs):
        for conn, out in ((proxy, p), (direct, d)):
            t0 = time.perf_counter()
            status, body = conn.request("GET", "/")
            out.append(time.perf_counter() - t0)
            assert status == 200 and body == b"ok", (status, body)
    print(f"small GET x{runs}: proxy p50 {ms(pct(p, 50))} p99 {ms(pct(p, 99))}; "
          f"direct p50 {ms(pct(d, 50))} p99 {ms(pct(d, 99))}; "
          f"overhead at p50 {ms(pct(p, 50) - pct(d, 50))} (goal <= 1 ms); "
          f"paired median {ms(statistics.median(a - b for a, b in zip(p, d)))}")
    return pct(p, 50) - pct(d, 50)


def best_of(n, f):
    return min(f() for _ in range(n))


def transfers(proxy, direct, mib):
    size = mib << 20

    def down(conn):
        t0 = time.perf_counter()
        status, n = conn.request("GET", f"/big/{size}", sink=True)
        assert status == 200 and n == size
        return time.perf_counter() - t0

    def up(conn):
        t0 = time.perf_counter()
        status, body = conn.request("POST", "/upload", body_len=size)
        assert status == 200 and int(body) == size, body
        return time.perf_counter() - t0

    out = {}
    for name, f in (("download", down), ("upload", up)):
        tp, td = best_of(3, lambda: f(proxy)), best_of(3, lambda: f(direct))
        ratio = td / tp
        out[name] = ratio
        print(f"{mib} MiB {name}: proxy {mib / tp:.1f} MiB/s, direct {mib / td:.1f} MiB/s: "
              f"ratio {ratio:.2f} (goal >= 0.8)")
    return out


def websocket_echo(proxy_addr, proxy_host, direct_addr, key, runs):
    import base64
    import os

    def connect(addr, host, headers):
        s = socket.create_connection(addr)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        k = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {k}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n").encode())
        f = s.makefile("rb")
        status = f.readline()
        assert b" 101 " in status, status
        while f.readline() != b"\r\n":
            pass
        return s, f

    msg = b"x" * 32
    frame = bytes([0x81, 0x80 | len(msg)]) + b"\0\0\0\0" + msg  # masked with a zero key

    def echo(conn):
        s, f = conn
        t0 = time.perf_counter()
        s.sendall(frame)
        h = f.read(2)
        body = f.read(h[1] & 127)
        assert body == msg, body
        return time.perf_counter() - t0

    p = connect(proxy_addr, proxy_host, f"X-API-Key: {key}\r\n")
    d = connect(direct_addr, f"{direct_addr[0]}:{direct_addr[1]}", "")
    tp, td = [], []
    for _ in range(runs):
        tp.append(echo(p))
        td.append(echo(d))
    print(f"WebSocket echo x{runs}: proxy p50 {ms(pct(tp, 50))} p99 {ms(pct(tp, 99))}; "
          f"direct p50 {ms(pct(td, 50))} p99 {ms(pct(td, 99))}; overhead at p50 {ms(pct(tp, 50) - pct(td, 50))}")


def files(api, cid, host_ip, mib):
    size = mib << 20
    payload = b"\0" * size
    path = "/root/api.bin"

    def api_up():
        t0 = time.perf_counter()
        r = api.post(f"/v1/capsules/{cid}/files/stream/write",
                     files={"path": (None, path), "file": ("f", payload)}, timeout=600)
        assert r.status_code in (200, 204), r.text
        return time.perf_counter() - t0

    def api_down():
        t0 = time.perf_counter()
        n = 0
        with api.stream("POST", f"/v1/capsules/{cid}/files/stream/read", json={"path": path}, timeout=600) as r:
            for b in r.iter_raw(1 << 20):
                n += len(b)
        assert n == size, n
        return time.perf_counter() - t0

    def raw_up():
        t0 = time.perf_counter()
        s = socket.create_connection((host_ip, 9003))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # closed once the guest has written it all
        s.close()
        return time.perf_counter() - t0

    def raw_down():
        t0 = time.perf_counter()
        s = socket.create_connection((host_ip, 9004))
        n = 0
        buf = bytearray(1 << 20)
        while k := s.recv_into(buf):
            n += k
        s.close()
        assert n == size, n
        return time.perf_counter() - t0

    out = {}
    for name, a, r in (("upload", api_up, raw_up), ("download", api_down, raw_down)):
        ta, tr = best_of(3, a), best_of(3, r)
        out[name] = tr / ta
        print(f"files {mib} MiB {name}: API {mib / ta:.1f} MiB/s, raw guest TCP {mib / tr:.1f} MiB/s: "
              f"ratio {tr / ta:.2f} (goal >= 0.5)")
    return out


def code_runner(p, runs):
    from wrenn import Capsule
    from wrenn.code_runner import Capsule as CodeRunner

    kw = dict(wait=True, api_key=p.api_key, base_url=p.public_url)

    def minimal():
        t0 = time.perf_counter()
        c = Capsule(template="minimal", **kw)
        c.commands.run("true")
        t = time.perf_counter() - t0
        c.destroy()
        return t

    def runner():
        t0 = time.perf_counter()
        c = CodeRunner(**kw)
        assert c.run_code("1+1").text == "2"
        t = time.perf_counter() - t0
        c.destroy()
        return t

    m, r = [], []
    for _ in range(runs):
        m.append(minimal())
        r.append(runner())
    dm, dr = statistics.median(m), statistics.median(r)
    print(f"create -> first answer, medians of {runs}: minimal exec {ms(dm)}, code runner run_code "
          f"{ms(dr)}: difference {ms(dr - dm)} (goal <= +300 ms)")


def main():
    ap = argparse.ArgumentParser(prog="python3 -m bench.proxy")
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--skip-code-runner", action="store_true")
    args = ap.parse_args()
    data = tempfile.mkdtemp(prefix="wrenn-bench-")
    builtins = "python" if args.skip_code_runner else "python,code-runner-beta"
    p = start_bench_platform(data, env_extra={"WRENN_BUILTIN_TEMPLATES": builtins})
    try:
        with p.client(timeout=600) as api:
            print("waiting for the built-in templates (built once per image cache)...", flush=True)
            want = set(builtins.split(","))
            deadline = time.time() + 3600
            while not want <= {t["name"] for t in api.get("/v1/snapshots").json() if t.get("platform")}:
                if time.time() > deadline:
                    raise SystemExit("the built-in templates were not built")
                time.sleep(5)
            cid = api.post("/v1/capsules", json={"template": "python", "memory_mb": 1024}).json()["id"]
            wait_status(api, cid, "running", timeout=300, fail_on={"error"})
            cap = api.get(f"/v1/capsules/{cid}").json()
            host_ip = cap["host_ip"]
            run(api, cid, f"cat > /root/servers.py <<'EOF'\n{SERVERS}\nEOF")
            run(api, cid, "python3 /root/servers.py", background=True)
            api_host, api_port = p.base_url.removeprefix("http://").split(":")
            proxy_addr = (api_host, int(api_port))
            proxy_host = lambda port: f"{port}-{cid}.localhost:{api_port}"  # noqa: E731
            key = f"X-API-Key: {p.api_key}\r\n"
            deadline = time.time() + 60
            while True:
                try:
                    Raw((host_ip, 9000), host_ip).request("GET", "/")
                    break
                except OSError:
                    if time.time() > deadline:
                        raise
                    time.sleep(0.3)
            proxy = Raw(proxy_addr, proxy_host(9000), key)
            direct = Raw((host_ip, 9000), f"{host_ip}:9000")
            for _ in range(20):  # warm both paths
                proxy.request("GET", "/")
                direct.request("GET", "/")
            small_gets(proxy, direct, args.runs)
            transfers(proxy, direct, args.mib)
            websocket_echo(proxy_addr, proxy_host(9001), (host_ip, 9001), p.api_key, args.runs)
            files(api, cid, host_ip, args.mib)
            api.delete(f"/v1/capsules/{cid}")
            if not args.skip_code_runner:
                code_runner(p, max(3, args.runs // 40))
    finally:
        stop_platform(p)


if __name__ == "__main__":
    main()
