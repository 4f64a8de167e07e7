"""The official Python SDK (`pip install wrenn`), unchanged, against our server."""

import pytest

wrenn = pytest.importorskip("wrenn")


def test_sdk_create_run_destroy(platform):
    from wrenn import Capsule

    capsule = Capsule(template="minimal", wait=True, api_key=platform.api_key, base_url=platform.base_url)
    try:
        assert capsule.capsule_id.startswith("cl-")
        result = capsule.commands.run("echo hello")
        assert result.stdout == "hello\n"
        assert result.exit_code == 0
        r = capsule.commands.run("echo $X; pwd; exit 3", envs={"X": "from-sdk"}, cwd="/tmp")
        assert (r.stdout, r.exit_code) == ("from-sdk\n/tmp\n", 3)
        handle = capsule.commands.run("sleep 60", background=True)
        assert handle.pid > 1 and handle.tag.startswith("proc-")
        info = capsule.get_info() if hasattr(capsule, "get_info") else None
        if info is not None:
            assert info.status.value == "running"
    finally:
        capsule.destroy()
    with platform.client() as api:
        assert api.get(f"/v1/capsules/{capsule.capsule_id}").json()["status"] == "stopped"
