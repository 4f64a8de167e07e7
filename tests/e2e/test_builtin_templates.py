"""The built-in templates (`python`, `node`, `code-runner-beta`), built by the platform's own
build pipeline after `wrenn up` serves, used through the official SDK; then adopted from the
host's template cache by a second platform with a fresh database.

The first run on a machine builds them (minutes under TCG); later runs find them in the
template cache of the shared images directory and take seconds. The module runs on platforms
of its own."""

import time

import pytest

from tests.support.platform import start_platform, stop_platform
from conftest import admin_browser, platform_env
from test_capsules import assert_error

wrenn = pytest.importorskip("wrenn")

SLOT_BASE = "10.201.170.0"
BUILTINS = ["python", "node", "code-runner-beta"]
# Building all three from nothing under TCG; a warm cache takes seconds.
BUILD_TIMEOUT = 60 * 60


def start(mail_sink, github, receiver):
    env = {**platform_env(mail_sink, github, receiver),
           "WRENN_BUILTIN_TEMPLATES": ",".join(BUILTINS)}
    return start_platform(slot_base=SLOT_BASE, max_slots=16, env_extra=env)


def wait_templates(admin, names, timeout):
    deadline = time.time() + timeout
    while True:
        have = {t["name"]: t for t in admin.get("/v1/admin/templates").json()}
        if all(n in have for n in names):
            return have
        failed = [b for b in admin.get("/v1/admin/builds").json()
                  if b["builtin"] and b["status"] in ("failed", "cancelled")]
        assert not failed, [(b["name"], b["error"]) for b in failed]
        assert time.time() < deadline, f"built-in templates not ready: {sorted(set(names) - set(have))}"
        time.sleep(2)


def test_builtin_templates_are_built_and_usable(mail_sink, github, receiver):
    p = start(mail_sink, github, receiver)
    try:
        admin = admin_browser(p)
        have = {t["name"] for t in admin.get("/v1/admin/templates").json()}
        builds = admin.get("/v1/admin/builds").json()
        if "node" not in have:
            # Cold cache: queued at start, and a create answers 503 until the template exists.
            queued = {b["name"] for b in builds if b["builtin"]}
            assert "node" in queued, builds
            with p.client() as api:
                r = api.post("/v1/capsules", json={"template": "node"})
                if r.status_code != 202:  # it may have just finished
                    assert_error(r, 503, "template_building")
                    assert "being built" in r.json()["error"]["message"]
        templates = wait_templates(admin, BUILTINS, BUILD_TIMEOUT)
        for n in BUILTINS:
            assert templates[n]["platform"] and templates[n]["protected"], templates[n]
            assert_error(admin.delete(f"/v1/admin/templates/{n}"), 403, "forbidden")
        assert templates["python"]["type"] == "base" and templates["node"]["type"] == "base"

        from wrenn import Capsule
        kw = dict(wait=True, api_key=p.api_key, base_url=p.base_url)
        c = Capsule(template="python", **kw)
        try:
            r = c.commands.run("python3 -c 'import sys; print(sum(range(10)), sys.version_info[0])'")
            assert (r.exit_code, r.stdout) == (0, "45 3\n"), r
            assert c.commands.run("pip --version && git --version && gcc --version | head -1").exit_code == 0
            # (Without pip: seeding pip into a venv takes most of a minute under TCG.)
            r = c.commands.run("python -m venv --without-pip /tmp/v && /tmp/v/bin/python -c 'print(1)'")
            assert r.stdout == "1\n", r
        finally:
            c.destroy()
        c = Capsule(template="node", **kw)
        try:
            r = c.commands.run("node -e 'console.log(6 * 7)'")
            assert (r.exit_code, r.stdout) == (0, "42\n"), r
            v = c.commands.run("node --version").stdout.strip()
            assert v.startswith("v24."), v
            assert c.commands.run("npm --version").exit_code == 0
        finally:
            c.destroy()
        # The SDK's code runner: its template is a snapshot with the Jupyter server already
        # running (started by the recipe), its kernelspec named `wrenn`, the data stack importable
        # (numpy's wheels need x86-64-v2, so this also checks the guests' CPU model).
        assert templates["code-runner-beta"]["type"] == "snapshot", templates["code-runner-beta"]
        from wrenn.code_runner import Capsule as CodeRunner
        c = CodeRunner(**kw)
        try:
            r = c.commands.run("curl -sf http://127.0.0.1:8888/api/kernelspecs")
            assert r.exit_code == 0 and '"wrenn"' in r.stdout, r
            r = c.commands.run("python3 -c 'import numpy, pandas, matplotlib, seaborn, requests; "
                               "print(int(numpy.arange(10).sum()), len(pandas.DataFrame({\"a\": [1, 2]})))'")
            assert (r.exit_code, r.stdout) == (0, "45 2\n"), r
        finally:
            c.destroy()
    finally:
        stop_platform(p)

    # A platform with a fresh database adopts them from the host's cache: nothing is built.
    q = start(mail_sink, github, receiver)
    try:
        admin = admin_browser(q)
        wait_templates(admin, BUILTINS, 120)
        assert [b for b in admin.get("/v1/admin/builds").json() if b["builtin"]] == []
        from wrenn import Capsule
        c = Capsule(template="node", wait=True, api_key=q.api_key, base_url=q.base_url)
        try:
            assert c.commands.run("node -e 'console.log(1)'").stdout == "1\n"
        finally:
            c.destroy()
    finally:
        stop_platform(q)
