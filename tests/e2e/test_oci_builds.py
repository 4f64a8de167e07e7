"""Builds from OCI images, against real local registries (Debian's docker-registry: one
anonymous, one behind htpasswd) holding an image this test makes itself: busybox in a gzip layer,
and a plain tar layer whose whiteouts remove a file and empty a directory of the first."""

import gzip
import hashlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.support.platform import free_port
from conftest import admin_browser
from test_builds import create_from, run, submit, unique, wait_build
from test_capsules import assert_error

APPLETS = ["sh", "cat", "ls", "echo", "pwd", "whoami", "test", "[", "sleep", "mkdir", "id", "grep", "env",
           "chown", "cp", "rm", "sync", "tar", "dirname", "basename", "true", "false", "head", "wc"]


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


def tar_bytes(entries):
    """(path, kind, data or link target, uid) → tar bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as t:
        for path, kind, data, uid in entries:
            info = tarfile.TarInfo(path)
            info.uid = info.gid = uid
            if kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                t.addfile(info)
            elif kind == "link":
                info.type, info.linkname = tarfile.SYMTYPE, data
                t.addfile(info)
            else:
                info.mode = 0o755 if kind == "exe" else 0o644
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_image():
    """(config, [(media type, blob, uncompressed)]) of a tiny busybox image."""
    busybox = Path("/bin/busybox").read_bytes()
    l1 = tar_bytes(
        [("bin", "dir", None, 0), ("bin/busybox", "exe", busybox, 0)]
        + [(f"bin/{a}", "link", "busybox", 0) for a in APPLETS]
        + [("etc", "dir", None, 0),
           ("etc/passwd", "file", b"root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n", 0),
           ("etc/group", "file", b"root:x:0:\napp:x:1000:\n", 0),
           ("etc/doomed", "file", b"to be whited out\n", 0),
           ("opt", "dir", None, 0), ("opt/old", "file", b"old\n", 0),
           ("home", "dir", None, 0), ("home/app", "dir", None, 1000)])
    l2 = tar_bytes([("etc/.wh.doomed", "file", b"", 0), ("opt/.wh..wh..opq", "file", b"", 0),
                    ("opt/new", "file", b"new\n", 0), ("hello.txt", "file", b"hello from layer two\n", 0)])
    l1_gz = gzip.compress(l1)
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Env": ["PATH=/bin", "GREETING=from-image"], "User": "1000", "WorkingDir": "/home/app"},
        "rootfs": {"type": "layers", "diff_ids": [sha(l1), sha(l2)]},
    }).encode()
    layers = [("application/vnd.oci.image.layer.v1.tar+gzip", l1_gz),
              ("application/vnd.oci.image.layer.v1.tar", l2)]
    return config, layers


def push(base, repo, tag, config, layers, auth=None):
    with httpx.Client(base_url=base, auth=auth, timeout=60) as c:
        for blob in [config] + [b for _, b in layers]:
            r = c.post(f"/v2/{repo}/blobs/uploads/")
            assert r.status_code == 202, r.text
            loc = r.headers["location"]
            sep = "&" if "?" in loc else "?"
            r = c.put(f"{loc}{sep}digest={sha(blob)}", content=blob,
                      headers={"content-type": "application/octet-stream"})
            assert r.status_code == 201, r.text
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(config),
                       "size": len(config)},
            "layers": [{"mediaType": m, "digest": sha(b), "size": len(b)} for m, b in layers],
        }).encode()
        r = c.put(f"/v2/{repo}/manifests/{tag}", content=manifest,
                  headers={"content-type": "application/vnd.oci.image.manifest.v1+json"})
        assert r.status_code == 201, r.text


class Registry:
    def __init__(self, users=None):
        self.dir = Path(tempfile.mkdtemp(prefix="wrenn-registry-"))
        self.port = free_port()
        cfg = {"version": 0.1, "log": {"level": "warn"},
               "storage": {"filesystem": {"rootdirectory": str(self.dir / "data")}},
               "http": {"addr": f"127.0.0.1:{self.port}"}}
        if users:
            path = self.dir / "htpasswd"
            for i, (u, p) in enumerate(users.items()):
                subprocess.run(["htpasswd", "-B", "-b"] + (["-c"] if i == 0 else []) + [str(path), u, p],
                               check=True, capture_output=True)
            cfg["auth"] = {"htpasswd": {"realm": "wrenn-test", "path": str(path)}}
        (self.dir / "config.yml").write_text(json.dumps(cfg))  # JSON is YAML
        self.log = open(self.dir / "registry.log", "w")
        self.proc = subprocess.Popen(["docker-registry", "serve", str(self.dir / "config.yml")],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        self.host = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.host}"
        deadline = time.time() + 20
        while True:
            try:
                httpx.get(self.url + "/v2/", timeout=1)
                break
            except httpx.TransportError:
                assert time.time() < deadline, (self.dir / "registry.log").read_text()
                time.sleep(0.1)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def registries():
    if not shutil.which("docker-registry"):
        pytest.fail("docker-registry is not installed (scripts/install-deps.sh --test installs it)")
    open_reg, locked = Registry(), Registry(users={"puller": "s3cret-pass"})
    config, layers = make_image()
    push(open_reg.url, "wrenn/tiny", "1", config, layers)
    push(locked.url, "wrenn/tiny", "1", config, layers, auth=("puller", "s3cret-pass"))
    yield open_reg, locked
    open_reg.stop()
    locked.stop()


@pytest.fixture(scope="module")
def admin(platform):
    return admin_browser(platform)


def test_build_from_an_oci_image(registries, admin, api):
    reg, _ = registries
    name = unique("e2e-oci")
    r = submit(admin, {"name": name, "base_image": f"{reg.host}/wrenn/tiny:1", "recipe": [
        "RUN test ! -e /etc/doomed && test ! -e /opt/old && cat /opt/new /hello.txt",
        "RUN echo built-by-$(whoami) > built.txt",
    ]})
    assert r.status_code == 202, r.text
    b = r.json()
    assert b["base_image"] == f"{reg.host}/wrenn/tiny:1" and b["base_template"] is None
    b = wait_build(admin, b["id"])
    assert b["status"] == "success", b
    pull = b["logs"][0]
    assert pull["phase"] == "pre-build" and pull["cmd"].startswith("pull ") and pull["ok"], pull
    assert "2 layers" in pull["stdout"]
    step1 = next(l for l in b["logs"] if l["phase"] == "recipe" and l["step"] == 1)
    assert step1["stdout"] == "new\nhello from layer two\n", step1
    assert b["default_user"] == "app" and b["default_env"]["GREETING"] == "from-image"

    c = create_from(api, name)
    try:
        out = run(api, c["id"], "whoami; pwd; echo $GREETING; cat built.txt /hello.txt; ls /opt")
        assert out["stdout"].splitlines() == ["app", "/home/app", "from-image", "built-by-app",
                                              "hello from layer two", "new"], out
    finally:
        api.delete(f"/v1/capsules/{c['id']}")
    assert admin.delete(f"/v1/admin/templates/{name}").status_code == 204


def test_registry_credentials_and_pull_failures(registries, admin, api):
    reg, locked = registries
    image = f"{locked.host}/wrenn/tiny:1"
    # Without credentials the locked registry refuses: the build fails and says so.
    r = submit(admin, {"name": unique("e2e-oci-401"), "base_image": image, "skip_pre_post": True,
                       "recipe": ["RUN true"]})
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "failed" and "pull" in b["error"], b
    assert any(w in b["error"].lower() for w in ("401", "unauthorized", "authentication", "not authorized")), b
    assert "s3cret" not in json.dumps(b)
    # With them it works (and they are never shown).
    name = unique("e2e-oci-auth")
    r = submit(admin, {"name": name, "base_image": image, "skip_pre_post": True, "recipe": ["RUN cat /hello.txt"],
                       "registry_auth": {"username": "puller", "password": "s3cret-pass"}})
    assert r.status_code == 202 and "s3cret" not in r.text, r.text
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "success", b
    assert "s3cret" not in admin.get(f"/v1/admin/builds/{b['id']}").text
    assert admin.delete(f"/v1/admin/templates/{name}").status_code == 204
    # Unknown tag, unreachable registry: failed builds with the reason.
    for ref in (f"{reg.host}/wrenn/tiny:nope", "127.0.0.1:1/wrenn/tiny:1"):
        r = submit(admin, {"name": unique("e2e-oci-bad"), "base_image": ref, "skip_pre_post": True,
                           "recipe": ["RUN true"]})
        b = wait_build(admin, r.json()["id"], timeout=120)
        assert b["status"] == "failed" and b["error"].startswith("pre-build step 1 failed: pulling"), b
    # Bad requests.
    ok = {"name": unique("e2e-oci-x"), "recipe": ["RUN true"]}
    assert_error(submit(admin, {**ok, "base_image": "has space:1"}), 400, "invalid_request")
    assert_error(submit(admin, {**ok, "base_image": image, "base_template": "minimal"}), 400, "invalid_request")
    assert_error(submit(admin, {**ok, "registry_auth": {"username": "a", "password": "b"}}), 400, "invalid_request")

def test_nothing_is_left_on_the_host(platform, registries):
    """After the builds above: no import work directory, no image disk, no template files."""
    from test_builds import derived_snapshots
    assert derived_snapshots(platform) == []
    imports = platform.data_dir / "imports"
    assert not imports.exists() or list(imports.iterdir()) == []
    deadline = time.time() + 30
    while list((platform.data_dir / "snapshots").iterdir()):
        assert time.time() < deadline, list((platform.data_dir / "snapshots").iterdir())
        time.sleep(0.5)
