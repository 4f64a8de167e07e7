"""Template builds on real VMs: recipes with every instruction, archives, health checks, the
live log, cancel, failures, bad input, and the templates that come out of them."""

import io
import json
import tarfile
import threading
import time
import zipfile

import httpx
import pytest

from tests.support.platform import images_dir, start_platform, stop_platform
from tests.support.qemu import vmm_processes
from tests.support.waits import wait_status
from conftest import admin_browser, new_user, platform_env
from test_capsules import assert_error

# test_an_interrupted_build_fails_and_leaves_nothing's platform (see tests/support/platform.py).
RESTART_SLOT_BASE = "10.201.210.0"


def unique(prefix):
    return f"{prefix}-{int(time.time() * 1000) % 10**9}"


def tar_gz(files):
    """A tar.gz of {path: bytes} (directories are made implicitly)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mode = 0o644
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def submit(admin, config, archive=None, filename="ctx.tar.gz"):
    if archive is None:
        return admin.post("/v1/admin/builds", json=config)
    files = {"config": (None, json.dumps(config), "application/json"),
             "archive": (filename, archive, "application/octet-stream")}
    return admin.post("/v1/admin/builds", files=files)


def wait_build(admin, build_id, statuses=("success", "failed", "cancelled"), timeout=600):
    deadline = time.time() + timeout
    while True:
        r = admin.get(f"/v1/admin/builds/{build_id}")
        assert r.status_code == 200, r.text
        b = r.json()
        if b["status"] in statuses:
            return b
        assert time.time() < deadline, f"build {build_id} stuck: {b['status']} step {b['current_step']}"
        time.sleep(0.5)


def sse_events(base_url, cookies, build_id, until_status=True, timeout=600, on_event=None):
    """Reads the build's SSE stream to its end: a list of (event, data)."""
    headers = {"Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items())}
    out = []
    with httpx.stream("GET", f"{base_url}/v1/admin/builds/{build_id}/stream", headers=headers,
                      timeout=httpx.Timeout(timeout, connect=10)) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data = json.loads(line[5:].strip())
                out.append((event, data))
                if on_event:
                    on_event(event, data)
    return out


def run(api, cid, cmd, timeout=60):
    r = api.post(f"/v1/capsules/{cid}/exec", json={"cmd": cmd, "timeout_sec": timeout})
    assert r.status_code == 200, r.text
    return r.json()


def create_from(api, template, **shape):
    r = api.post("/v1/capsules", json={"template": template, **shape})
    assert r.status_code == 202, r.text
    c = wait_status(api, r.json()["id"], {"running", "error"}, timeout=120)
    assert c["status"] == "running", c
    return c


@pytest.fixture(scope="module")
def admin(platform):
    return admin_browser(platform)


def test_recipe_with_healthcheck_makes_a_template_with_everything_running(platform, admin, api):
    name = unique("e2e-web")
    archive = tar_gz({"app/main.sh": b"echo served\n", "app/conf/settings.txt": b"level=3\n",
                      "README": b"top\n"})
    config = {
        "name": name,
        "skip_pre_post": True,
        "recipe": [
            "# comments and blank lines are skipped",
            "",
            "ENV GREETING=hello",
            "ENV PATH=/opt/tools/bin:$PATH",
            "USER app",
            "WORKDIR /srv/app",
            "COPY app README /srv/app/",
            "RUN echo \"$GREETING from $(whoami) in $(pwd)\" > note.txt; echo to-stdout; echo to-stderr >&2",
            "START sh -c 'while true; do date +%s%N >> /tmp/ticks; sleep 0.2; done'",
            "RUN --timeout=30s test -f /srv/app/main.sh",
        ],
        "healthcheck": "--interval=1s --retries=20 test -s /tmp/ticks",
    }
    r = submit(admin, config, archive)
    assert r.status_code == 202, r.text
    b = r.json()
    assert b["id"].startswith("bld-") and b["name"] == name and b["status"] in ("pending", "running")
    assert b["base_template"] == "minimal" and b["total_steps"] == 8 and b["vcpus"] == 1
    assert b["memory_mb"] == 512 and b["template_type"] == "snapshot" and b["builtin"] is False

    # Follow the live log from the start to its end.
    events = sse_events(platform.base_url, admin.cookies, b["id"])
    kinds = [e for e, _ in events]
    assert kinds[-1] == "status" and events[-1][1]["status"] == "success", events[-3:]
    outputs = "".join(d["data"] for e, d in events if e == "output")
    assert "to-stdout" in outputs and "to-stderr" in outputs
    logged = [(d["phase"], d["step"]) for e, d in events if e == "log"]
    assert len(logged) == len(set(logged)), "a step was reported twice"
    assert ("recipe", 8) in logged and ("healthcheck", 1) in logged

    b = wait_build(admin, b["id"])
    assert b["status"] == "success" and b["error"] is None, b
    assert b["started_at"] and b["completed_at"] and b["current_step"] == 8
    assert b["default_user"] == "app"
    assert b["default_env"] == {"GREETING": "hello", "PATH": "/opt/tools/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    run_log = next(l for l in b["logs"] if l["phase"] == "recipe" and l["step"] == 6)
    assert run_log["ok"] and run_log["exit"] == 0 and "to-stderr" in run_log["stderr"]
    assert all(l["ok"] for l in b["logs"])
    # The build's capsule is gone.
    sandbox = b["sandbox_id"]
    assert sandbox and admin.get(f"/v1/admin/capsules/{sandbox}").json()["status"] == "stopped"

    # Every team sees the template; admins see its defaults.
    t = next(t for t in admin.get("/v1/admin/templates").json() if t["name"] == name)
    assert t["type"] == "snapshot" and t["platform"] is True and t["protected"] is False
    assert t["default_user"] == "app" and t["size_bytes"] > 0
    listed = api.get("/v1/snapshots").json()
    assert any(x["name"] == name and x["platform"] for x in listed)
    # A team cannot delete it, nor take its name for a snapshot of its own.
    assert_error(api.delete(f"/v1/snapshots/{name}"), 403, "forbidden")

    c = create_from(api, name)
    try:
        out = run(api, c["id"], "whoami; pwd; echo $GREETING; echo $PATH; cat note.txt; ls /srv/app | sort; "
                                "cat conf/settings.txt; stat -c %U main.sh; ls /tmp/.wrenn-build 2>&1 | head -1")
        lines = out["stdout"].splitlines()
        assert lines[:5] == ["app", "/srv/app", "hello", b["default_env"]["PATH"],
                             "hello from app in /srv/app"], out
        assert lines[5:9] == ["README", "conf", "main.sh", "note.txt"], out
        assert lines[9] == "level=3" and lines[10] == "app", out
        assert "No such file" in lines[11], out
        # The START'ed process was running in the snapshot and runs on in the capsule.
        first = int(run(api, c["id"], "wc -l < /tmp/ticks")["stdout"])
        time.sleep(1.5)
        assert int(run(api, c["id"], "wc -l < /tmp/ticks")["stdout"]) > first
        procs = api.get(f"/v1/capsules/{c['id']}/processes").json()["processes"]
        assert any(p.get("tag") == "build-start-7" for p in procs), procs
        # A request's own user wins over the template's.
        r = api.post(f"/v1/capsules/{c['id']}/exec", json={"cmd": "whoami", "envs": {"GREETING": "mine"}})
        assert r.json()["stdout"].strip() == "app"
    finally:
        api.delete(f"/v1/capsules/{c['id']}")

    # Deleting it: capsules made from it keep running; new ones cannot be made.
    c2 = create_from(api, name)
    r = admin.delete(f"/v1/admin/templates/{name}")
    assert r.status_code == 204, r.text
    assert run(api, c2["id"], "whoami")["stdout"].strip() == "app"
    api.delete(f"/v1/capsules/{c2['id']}")
    assert_error(api.post("/v1/capsules", json={"template": name}), 400, "invalid_request")
    assert_error(admin.delete(f"/v1/admin/templates/{name}"), 404, "not_found")


def derived_snapshots(platform):
    """Per-shape template snapshots (shared image cache) made from this platform's disks."""
    root = images_dir() / "snapshots"
    return [d for d in root.iterdir()
            if (d / "source").exists() and (d / "source").read_text().startswith(str(platform.data_dir))]


def test_base_template_boots_its_disk_in_any_shape(platform, admin, api):
    name = unique("e2e-base")
    r = submit(admin, {"name": name, "skip_pre_post": True, "recipe": [
        "RUN echo baked > /etc/baked.txt",
        "START sleep 1000",
        "ENV MODE=base",
    ]})
    assert r.status_code == 202, r.text
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "success", b
    assert b["template_type"] == "base"
    t = next(t for t in api.get("/v1/snapshots").json() if t["name"] == name)
    assert t["type"] == "base" and t["platform"]
    c = create_from(api, name, vcpus=2, memory_mb=768)
    try:
        assert (c["vcpus"], c["memory_mb"]) == (2, 768)
        out = run(api, c["id"], "cat /etc/baked.txt; echo $MODE; whoami; nproc; pgrep -x sleep || echo none")
        assert out["stdout"].split() == ["baked", "base", "root", "2", "none"], out
    finally:
        api.delete(f"/v1/capsules/{c['id']}")
        wait_status(api, c["id"], {"stopped"}, timeout=30)
    # Other tests of the session's platform expect no snapshot files but their own.
    assert admin.delete(f"/v1/admin/templates/{name}").status_code == 204
    # The per-shape template snapshots booted from its disk went with it.
    assert derived_snapshots(platform) == []


def test_cancel_mid_step_leaves_nothing(platform, admin):
    name = unique("e2e-cancel")
    r = submit(admin, {"name": name, "skip_pre_post": True,
                       "recipe": ["RUN echo started; sleep 600", "RUN echo never"]})
    assert r.status_code == 202, r.text
    bid = r.json()["id"]
    seen = threading.Event()

    def follow():
        def on(event, data):
            if event == "output" and "started" in data.get("data", ""):
                seen.set()
        follow.events = sse_events(platform.base_url, admin.cookies, bid, on_event=on)

    t = threading.Thread(target=follow)
    t.start()
    assert seen.wait(180), "the step never started"
    r = admin.post(f"/v1/admin/builds/{bid}/cancel")
    assert r.status_code == 204, r.text
    t.join(60)
    assert follow.events[-1] == ("status", {"type": "status", "status": "cancelled", "error": None})
    b = wait_build(admin, bid)
    assert b["status"] == "cancelled" and b["completed_at"]
    assert not any(l["phase"] == "recipe" and l["step"] == 2 for l in b["logs"])
    # Its capsule is destroyed: no VM for it on the host.
    deadline = time.time() + 30
    while time.time() < deadline:
        c = admin.get(f"/v1/admin/capsules/{b['sandbox_id']}").json()
        if c["status"] == "stopped":
            break
        time.sleep(0.5)
    assert c["status"] == "stopped", c
    assert vmm_processes(b["sandbox_id"]) == []
    assert_error(admin.post(f"/v1/admin/builds/{bid}/cancel"), 409, "invalid_state")
    assert not any(t["name"] == name for t in admin.get("/v1/admin/templates").json())
    # The stream of a finished build replays it and ends.
    events = sse_events(platform.base_url, admin.cookies, bid)
    assert events[-1][1]["status"] == "cancelled"


def test_failing_and_hanging_steps_fail_the_build(admin):
    r = submit(admin, {"name": unique("e2e-fail"), "skip_pre_post": True,
                       "recipe": ["RUN true", "RUN echo oops >&2; exit 3", "RUN echo never"]})
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "failed", b
    assert b["error"] == "recipe step 2 failed: exit code 3: oops", b
    assert [(l["step"], l["ok"], l["exit"]) for l in b["logs"] if l["phase"] == "recipe"] == [(1, True, 0), (2, False, 3)]

    r = submit(admin, {"name": unique("e2e-hang"), "skip_pre_post": True,
                       "recipe": ["RUN --timeout=2s sleep 60"]})
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "failed" and "timed out after 2s" in b["error"], b

    r = submit(admin, {"name": unique("e2e-unhealthy"), "skip_pre_post": True, "recipe": ["RUN true"],
                       "healthcheck": "--interval=200ms --retries=2 false"})
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "failed" and b["error"].startswith("healthcheck failed 3 times"), b
    assert not any(t["name"].startswith("e2e-unhealthy") for t in admin.get("/v1/admin/templates").json())


def test_bad_requests(platform, admin, api, mail_sink):
    ok = {"name": unique("e2e-bad"), "recipe": ["RUN true"]}
    # Admins only: a session of a non-admin is 403; an API key is not a session.
    user = new_user(platform, mail_sink)
    for method, path in [("GET", "/v1/admin/builds"), ("POST", "/v1/admin/builds"),
                         ("GET", "/v1/admin/templates"), ("DELETE", "/v1/admin/templates/minimal"),
                         ("GET", "/v1/admin/builds/bld-x"), ("POST", "/v1/admin/builds/bld-x/cancel"),
                         ("GET", "/v1/admin/builds/bld-x/stream")]:
        r = user.request(method, path, json=ok if method == "POST" else None)
        assert r.status_code == 403, (path, r.text)
        assert api.request(method, path).status_code in (401, 403), path

    cases = [
        ({"recipe": ["RUN true"]}, 400, "name is required"),
        ({**ok, "name": "-bad"}, 400, "template name"),
        ({**ok, "name": "x" * 65}, 400, "template name"),
        ({**ok, "name": "minimal"}, 409, "exists"),
        ({**ok, "name": "python"}, 409, "built-in"),
        ({**ok, "base_template": "nope"}, 400, "unknown base_template"),
        ({**ok, "recipe": []}, 400, "at least one"),
        ({**ok, "recipe": ["RUN true", "FLY away"]}, 400, "recipe line 2"),
        ({**ok, "recipe": ["RUN --timeout=forever x"]}, 400, "recipe line 1"),
        ({**ok, "recipe": ["COPY a /b"]}, 400, "no archive"),
        ({**ok, "healthcheck": "--interval=5s"}, 400, "healthcheck"),
        ({**ok, "vcpus": 99}, 400, "vcpus"),
        ({**ok, "memory_mb": 64}, 400, "memory_mb"),
    ]
    for config, status, needle in cases:
        r = submit(admin, config)
        assert r.status_code == status, (config, r.text)
        assert needle in r.json()["error"]["message"], (config, r.text)
    r = admin.post("/v1/admin/builds", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 400, "invalid_request")
    # Archives: not an archive, hostile paths, too large; zip works.
    copy = {**ok, "recipe": ["COPY f /f"]}
    assert "not a tar" in submit(admin, copy, b"plain text, not an archive").json()["error"]["message"]
    evil = io.BytesIO()
    with tarfile.open(fileobj=evil, mode="w") as t:
        info = tarfile.TarInfo("../escape")
        info.size = 1
        t.addfile(info, io.BytesIO(b"x"))
    r = submit(admin, copy, evil.getvalue(), "evil.tar")
    assert r.status_code == 400 and "'..'" in r.json()["error"]["message"], r.text
    r = submit(admin, copy, b"\0" * (100 * 1024 * 1024 + 1), "big.tar")
    assert_error(r, 413, "too_large")
    z = io.BytesIO()
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("f", "zipped\n")
    name = unique("e2e-zip")
    r = submit(admin, {"name": name, "skip_pre_post": True, "recipe": ["COPY f /f", "RUN grep -q zipped /f"]},
               z.getvalue(), "ctx.zip")
    assert r.status_code == 202, r.text
    # The same name again while it is queued or running.
    assert_error(submit(admin, {"name": name, "recipe": ["RUN true"]}), 409, "already_exists")
    b = wait_build(admin, r.json()["id"])
    assert b["status"] == "success", b
    assert_error(submit(admin, {"name": name, "recipe": ["RUN true"]}), 409, "already_exists")
    assert admin.delete(f"/v1/admin/templates/{name}").status_code == 204
    # Unknown things.
    assert_error(admin.get("/v1/admin/builds/bld-nope"), 404, "not_found")
    assert_error(admin.post("/v1/admin/builds/bld-nope/cancel"), 404, "not_found")
    assert_error(admin.get("/v1/admin/builds/bld-nope/stream"), 404, "not_found")
    assert_error(admin.delete("/v1/admin/templates/minimal"), 403, "forbidden")
    assert_error(admin.delete("/v1/admin/templates/no-such"), 404, "not_found")
    # Builds are listed newest first.
    listed = admin.get("/v1/admin/builds").json()
    assert listed[0]["id"] == b["id"]


def test_an_interrupted_build_fails_and_leaves_nothing(mail_sink, github, receiver):
    env = {**platform_env(mail_sink, github, receiver), "WRENN_ADMIN_PASSWORD": "restart-password-1"}
    # A slot range of its own: the session platform (10.201.100.0) may be running beside it,
    # and an agent's recovery clears what it finds in its range.
    p = start_platform(env_extra=env, destroy_on_exit=False, slot_base=RESTART_SLOT_BASE)
    p.admin_password = "restart-password-1"
    try:
        admin = admin_browser(p)
        r = submit(admin, {"name": "interrupted", "skip_pre_post": True, "recipe": ["RUN sleep 600"]})
        bid = r.json()["id"]
        deadline = time.time() + 180
        while admin.get(f"/v1/admin/builds/{bid}").json()["current_step"] != 1:
            assert time.time() < deadline
            time.sleep(0.5)
        capsule = admin.get(f"/v1/admin/builds/{bid}").json()["sandbox_id"]
        # A build on the one running waits for it.
        queued = submit(admin, {"name": "queued-after", "skip_pre_post": True, "base_template": "interrupted",
                                "recipe": ["RUN true"]})
        assert queued.status_code == 400, queued.text  # its base does not exist yet
        p.proc.kill()
        p.proc.wait()
        p.log.close()
        p = start_platform(data_dir=p.data_dir, env_extra=env, slot_base=RESTART_SLOT_BASE)
        p.admin_password = "restart-password-1"
        admin = admin_browser(p)
        b = admin.get(f"/v1/admin/builds/{bid}").json()
        assert b["status"] == "failed" and "control plane stopped" in b["error"], b
        deadline = time.time() + 60
        while admin.get(f"/v1/admin/capsules/{capsule}").json()["status"] != "stopped":
            assert time.time() < deadline, "the interrupted build's capsule was not destroyed"
            time.sleep(0.5)
    finally:
        stop_platform(p)
