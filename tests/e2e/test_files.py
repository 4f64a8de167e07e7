"""The files API on real VMs, through the official SDK and raw HTTP."""

import hashlib
import os
import time
from pathlib import Path

from wrenn import Capsule

from test_capsules import assert_error


def sdk(platform, capsule):
    return Capsule.connect(capsule["id"], api_key=platform.api_key, base_url=platform.base_url)


def rss_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_files_through_the_sdk(platform, running_capsule):
    cap = sdk(platform, running_capsule)
    cap.files.write("/tmp/dir/hello.txt", "hello wörld\n")
    assert cap.files.read("/tmp/dir/hello.txt") == "hello wörld\n"
    blob = bytes(range(256)) * 3
    cap.files.write("/tmp/dir/blob.bin", blob)
    assert cap.files.read_bytes("/tmp/dir/blob.bin") == blob
    entry = cap.files.make_dir("/tmp/dir/sub/deeper")
    assert entry.type == "directory" and entry.path == "/tmp/dir/sub/deeper"
    names = sorted(e.name for e in cap.files.list("/tmp/dir"))
    assert names == ["blob.bin", "hello.txt", "sub"]
    assert cap.files.exists("/tmp/dir/hello.txt") and not cap.files.exists("/tmp/dir/nope")
    cap.files.remove("/tmp/dir/sub")
    assert not cap.files.exists("/tmp/dir/sub")


def test_files_api_fields_and_errors(api, running_capsule):
    cid = running_capsule["id"]
    f = f"/v1/capsules/{cid}/files"
    api.post(f"/v1/capsules/{cid}/exec", json={"cmd": "mkdir -p /srv/a/b && echo x > /srv/a/b/c && chmod 4755 /srv/a/b/c && ln -s /srv/a/b/c /srv/a/link && chown user:user /srv/a"})
    e = api.post(f + "/list", json={"path": "/srv/a", "depth": 0}).json()["entries"]
    assert len(e) == 1 and e[0]["type"] == "directory" and e[0]["owner"] == "user" and e[0]["group"] == "user"
    entries = {x["path"]: x for x in api.post(f + "/list", json={"path": "/srv/a", "depth": 5}).json()["entries"]}
    assert set(entries) == {"/srv/a/b", "/srv/a/b/c", "/srv/a/link"}
    c = entries["/srv/a/b/c"]
    assert (c["type"], c["size"], c["permissions"], c["mode"], c["owner"], c["symlink_target"]) == ("file", 2, "-rwsr-xr-x", 0o4755, "root", None)
    assert isinstance(c["modified_at"], int) and c["name"] == "c"
    assert entries["/srv/a/link"]["type"] == "symlink" and entries["/srv/a/link"]["symlink_target"] == "/srv/a/b/c"
    one = api.post(f + "/list", json={"path": "/srv/a"}).json()["entries"]
    assert {x["name"] for x in one} == {"b", "link"}

    r = api.post(f + "/mkdir", json={"path": "/srv/new/dir"})
    assert r.status_code == 200 and r.json()["entry"]["permissions"].startswith("d")
    assert_error(api.post(f + "/mkdir", json={"path": "/srv/new/dir"}), 409, "already_exists")
    assert_error(api.post(f + "/read", json={"path": "/srv/missing"}), 404, "not_found")
    assert_error(api.post(f + "/read", json={"path": "/srv/a"}), 400, "invalid_request")
    assert_error(api.post(f + "/list", json={"path": "/srv/missing"}), 404, "not_found")
    assert_error(api.post(f + "/remove", json={"path": "/srv/missing"}), 404, "not_found")
    assert_error(api.post(f + "/list", json={"path": "relative"}), 400, "invalid_request")
    assert_error(api.post(f + "/read", json={"path": ""}), 400, "invalid_request")
    assert_error(api.post(f + "/list", json={"path": "/", "depth": -1}), 400, "invalid_request")
    assert_error(api.post(f + "/remove", json={"path": "/"}), 400, "invalid_request")
    assert api.post(f + "/remove", json={"path": "/srv/a"}).status_code == 204
    assert_error(api.post(f + "/list", json={"path": "/srv/a"}), 404, "not_found")
    # Multipart: the path must come first, and both parts are needed.
    r = api.post(f + "/write", files=[("file", ("x", b"data")), ("path", (None, "/tmp/x"))])
    assert_error(r, 400, "invalid_request")
    assert_error(api.post(f + "/write", files={"file": ("x", b"data")}), 400, "invalid_request")
    assert_error(api.post(f + "/write", data={"path": "rel"}, files={"file": ("x", b"d")}), 400, "invalid_request")
    assert_error(api.post("/v1/capsules/cl-nope/files/list", json={"path": "/"}), 404, "not_found")


def test_simple_upload_limit(api, running_capsule):
    cid = running_capsule["id"]
    big = b"\0" * (100 * 1024 * 1024 + 1)
    r = api.post(f"/v1/capsules/{cid}/files/write", data={"path": "/tmp/big"}, files={"file": ("big", big)})
    assert_error(r, 413, "too_large")
    assert "stream/write" in r.json()["error"]["message"]
    left = api.post(f"/v1/capsules/{cid}/files/list", json={"path": "/tmp"}).json()["entries"]
    assert not [e for e in left if "big" in e["name"]], f"half-written upload left behind: {left}"


def envd_memory_kib(cap):
    """VmRSS and VmHWM of the serving envd (PID 1's child; PID 1 is envd's reaper)."""
    out = cap.commands.run(
        "for p in $(pgrep -x envd); do [ $p != 1 ] && grep -E '^Vm(RSS|HWM):' /proc/$p/status; done"
    ).stdout
    fields = dict(line.split(":", 1) for line in out.strip().splitlines())
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def test_streamed_transfer_keeps_memory_flat(platform, running_capsule):
    """1 GiB up and down through upload_stream/download_stream. No process on the way may buffer
    it: the control plane + agent process and envd each report their peak RSS growth."""
    cap = sdk(platform, running_capsule)
    size, chunk = 1024 * 1024 * 1024, 1024 * 1024
    block = os.urandom(chunk)
    up = hashlib.sha256()

    def chunks():
        for i in range(size // chunk):
            b = bytes([i % 256]) + block[1:]
            up.update(b)
            yield b

    pid = platform.proc.pid
    # VmHWM is the peak of the process's whole life: reset it (Linux: 5 > clear_refs) so the
    # peak is this transfer's, not an earlier test's.
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    before = rss_kib(pid, "VmRSS")
    envd_before, _ = envd_memory_kib(cap)
    started = time.monotonic()
    cap.files.upload_stream("/root/big.bin", chunks())
    uploaded = time.monotonic()
    down = hashlib.sha256()
    total = 0
    for b in cap.files.download_stream("/root/big.bin"):
        down.update(b)
        total += len(b)
    downloaded = time.monotonic()
    peak = rss_kib(pid, "VmHWM")
    _, envd_peak = envd_memory_kib(cap)
    assert total == size
    assert down.hexdigest() == up.hexdigest()
    growth_mib = (peak - before) / 1024
    envd_growth_mib = (envd_peak - envd_before) / 1024
    print(
        f"\n1 GiB up in {uploaded - started:.1f} s, down in {downloaded - uploaded:.1f} s; "
        f"control plane + agent RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB "
        f"(+{growth_mib:.1f}); envd RSS before {envd_before / 1024:.1f} MiB, peak "
        f"{envd_peak / 1024:.1f} MiB (+{envd_growth_mib:.1f})"
    )
    assert growth_mib < 64, f"server memory grew by {growth_mib:.0f} MiB moving a {size >> 20} MiB file"
    assert envd_growth_mib < 32, f"envd memory grew by {envd_growth_mib:.0f} MiB moving a {size >> 20} MiB file"
    cap.files.remove("/root/big.bin")
