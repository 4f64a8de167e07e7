"""Schemathesis against the running server for the operations this version implements:
no 5xx, and every response matches docs/openapi.yaml. Capsule operations run with an API key;
account, team and admin operations with a browser session (cookie + CSRF header).

Each run uses a platform of its own, not the session's: fuzzing leaves many capsules behind, and
the admin operations delete every team and user they find (the bootstrap admin's team and API
key included). Each platform is stopped and checked clean when its test ends, so these tests may
run before, after or between any others, in any order."""

import os
import subprocess

import pytest

from conftest import admin_browser, new_user, platform_env
from tests.support.platform import ROOT, start_platform, stop_platform

# A slot range of their own (one platform at a time): not the session platform's (10.201.100.0,
# 64 slots), nor another module's or the benchmarks' (see tests/support/platform.py).
SLOT_BASE = "10.201.160.0"
OPERATIONS = [
    "createCapsule", "listCapsules", "getCapsule", "destroyCapsule", "execCommand", "listProcesses", "killProcess",
    "execStream", "connectProcess", "ptySession", "listDir", "makeDir", "removePath", "downloadFile", "streamDownloadFile", "uploadFile",
    "streamUploadFile", "pauseCapsule", "resumeCapsule", "pingCapsule", "createSnapshot", "listSnapshots",
    "deleteSnapshot", "getCapsuleMetrics", "getCapsuleStats", "getCapsuleUsage",
]
SESSION_OPERATIONS = [
    "signup", "activate", "login", "getMe", "updateName", "deleteAccount", "changePassword", "requestPasswordReset",
    "confirmPasswordReset", "listSessions", "revokeSession", "connectProvider", "disconnectProvider", "oauthRedirect",
    "oauthCallback", "createAPIKey", "listAPIKeys", "deleteAPIKey", "searchUsers", "listTeams", "createTeam", "getTeam",
    "renameTeam", "deleteTeam", "listTeamMembers", "addTeamMember", "updateMemberRole", "removeTeamMember", "leaveTeam",
    # testChannel is left out: fuzzed configs could name hosts beyond this machine
    # (test_channels.py covers it against a local receiver).
    "createChannel", "listChannels", "getChannel", "updateChannel", "deleteChannel", "rotateChannelConfig",
    "listAuditLogs",
]
ADMIN_OPERATIONS = [
    "adminListUsers", "adminSetUserActive", "setUserAdmin", "adminListTeams", "adminSetTeamBYOC", "adminDeleteTeam",
    "adminListCapsules", "adminGetCapsule", "adminDestroyCapsule", "adminCreateSnapshotFromCapsule", "adminExecCommand",
    "adminGetCapsuleMetrics", "adminListProcesses", "adminKillProcess", "adminListDir", "adminMakeDir", "adminRemovePath",
    "adminDownloadFile", "adminUploadFile", "adminListAuditLogs",
    "adminListTemplates", "adminDeleteTemplate", "adminCreateBuild", "adminListBuilds", "adminGetBuild",
    "adminCancelBuild",
    "createHost", "listHosts", "getHost", "deleteHost", "regenerateHostToken", "getHostDeletePreview",
    "listHostTags", "addHostTag", "removeHostTag", "registerHost", "refreshHostToken",
]
# With a registered host's token.
HOST_OPERATIONS = ["hostHeartbeat", "sandboxEventCallback"]
# Last, with a throwaway account: they end the session they run with.
ENDING_OPERATIONS = ["switchTeam", "logout", "logoutAll"]


def run(platform, operations, headers):
    exe = subprocess.run(["which", "schemathesis"], capture_output=True, text=True).stdout.strip()
    if not exe:
        pytest.fail("schemathesis is not installed (scripts/install-deps.sh installs it)")
    args = [
        exe, "run", str(ROOT / "docs/openapi.yaml"),
        "--url", platform.base_url,
        "--checks", "not_a_server_error,response_schema_conformance,content_type_conformance",
        "--max-examples", os.environ.get("WRENN_SCHEMATHESIS_EXAMPLES", "15"),
        "--workers", "1",
        "--phases", "examples,fuzzing",
    ]
    for h in headers:
        args += ["-H", h]
    for op in operations:
        args += ["--include-operation-id", op]
    # Schemathesis keeps its cache (.schemathesis, .hypothesis) in its working directory: under
    # target/, not in the repository's tree.
    cwd = ROOT / "target/schemathesis"
    cwd.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(args, capture_output=True, text=True, timeout=1200, cwd=cwd)
    print(r.stdout[-6000:])
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    # Every listed operation exists in the document (a typo would silently test nothing).
    assert "No operations" not in r.stdout


@pytest.fixture
def own_platform(mail_sink, github, receiver):
    """A `wrenn up` of the test's own, set up as the session's; the capsules the run leaves die
    with it, and it is checked clean (no VM, capsule directory or network namespace left)."""
    p = start_platform(slot_base=SLOT_BASE, env_extra=platform_env(mail_sink, github, receiver))
    yield p
    stop_platform(p)


def session_headers(b):
    return [
        f"Cookie: wrenn_sid={b.cookies['wrenn_sid']}; wrenn_csrf={b.cookies['wrenn_csrf']}",
        f"X-CSRF-Token: {b.cookies['wrenn_csrf']}",
    ]


def test_schemathesis_api_key_operations(own_platform):
    platform = own_platform
    run(platform, OPERATIONS, [f"X-API-Key: {platform.api_key}"])


def test_schemathesis_host_token_operations(own_platform):
    import httpx

    platform = own_platform
    admin = admin_browser(platform)
    token = admin.post("/v1/hosts", json={"type": "regular"}).json()["registration_token"]
    r = httpx.post(platform.base_url + "/v1/hosts/register", json={"token": token, "address": "127.0.0.1:7999"})
    assert r.status_code == 201, r.text
    run(platform, HOST_OPERATIONS, [f"X-Host-Token: {r.json()['token']}"])


def test_operation_ids_exist():
    import yaml

    doc = yaml.safe_load((ROOT / "docs/openapi.yaml").read_text())
    ids = {op["operationId"] for path in doc["paths"].values() for op in path.values() if isinstance(op, dict) and "operationId" in op}
    missing = [o for o in OPERATIONS + SESSION_OPERATIONS + ADMIN_OPERATIONS + ENDING_OPERATIONS + HOST_OPERATIONS if o not in ids]
    assert not missing, missing


def test_schemathesis_session_operations(own_platform, mail_sink):
    # On a platform of its own: the admin operations delete whatever teams and users they find
    # (the bootstrap admin's team and API key included).
    platform = own_platform
    b = new_user(platform, mail_sink)
    run(platform, SESSION_OPERATIONS, session_headers(b))
    run(platform, ADMIN_OPERATIONS, session_headers(admin_browser(platform)))
    run(platform, ENDING_OPERATIONS, session_headers(new_user(platform, mail_sink)))
