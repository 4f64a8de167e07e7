"""What one team or one credential may take: team quotas (set by platform admins, enforced on
create, resume and snapshot), API rate limits per credential, and open streams per team."""

import httpx
import pytest

from conftest import admin_browser, new_user
from tests.support.waits import wait_status


def err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text
    return r.json()["error"]["message"]


@pytest.fixture
def team(platform, mail_sink):
    """A new account's browser and a client with an API key of its team."""
    owner = new_user(platform, mail_sink)
    key = owner.post("/v1/api-keys", json={"name": "limits"}).json()["key"]
    with httpx.Client(base_url=platform.base_url, headers={"X-API-Key": key}, timeout=60) as c:
        yield owner, c
    # Through the session: a test may have used up the key's rate.
    for cap in owner.get("/v1/capsules").json():
        owner.delete(f"/v1/capsules/{cap['id']}")


def test_team_quotas_are_set_by_admins_and_enforced(platform, team):
    owner, api = team
    team_id = owner.me["team_id"]
    admin = admin_browser(platform)
    q = owner.get(f"/v1/teams/{team_id}/quota").json()
    assert q["limits"] == {"capsules": 50, "vcpus": 32, "memory_mb": 65536, "disk_mb": 512000, "snapshots": 50}, q
    assert q["overrides"] == {k: None for k in q["limits"]} and q["usage"]["capsules"] == 0
    # Only platform admins set them; bad values are refused.
    err(owner.put(f"/v1/admin/teams/{team_id}/quota", json={"capsules": 1}), 403, "forbidden")
    err(admin.put(f"/v1/admin/teams/{team_id}/quota", json={"capsules": -1}), 400, "invalid_request")
    err(admin.put(f"/v1/admin/teams/{team_id}/quota", json={"gpus": 1}), 400, "invalid_request")
    err(admin.put("/v1/admin/teams/team-nope/quota", json={}), 404, "not_found")
    err(admin.get("/v1/admin/teams/team-nope/quota"), 404, "not_found")
    r = admin.put(f"/v1/admin/teams/{team_id}/quota", json={"capsules": 1, "snapshots": 0})
    assert r.status_code == 200, r.text
    assert r.json()["limits"]["capsules"] == 1 and r.json()["overrides"]["vcpus"] is None

    # One capsule, then the next create names the limit.
    r = api.post("/v1/capsules", json={})
    assert r.status_code == 202, r.text
    cid = r.json()["id"]
    msg = err(api.post("/v1/capsules", json={}), 403, "quota_exceeded")
    assert "capsules limit is 1, 1 in use" in msg, msg
    wait_status(api, cid, "running", timeout=120)
    usage = admin.get(f"/v1/admin/teams/{team_id}/quota").json()["usage"]
    assert usage["capsules"] == 1 and usage["vcpus"] >= 1 and usage["memory_mb"] > 0, usage
    # No snapshot templates allowed.
    msg = err(api.post("/v1/snapshots", json={"sandbox_id": cid, "name": "nope"}), 403, "quota_exceeded")
    assert "snapshots" in msg
    # A paused capsule holds no vCPUs; resuming it takes them again.
    assert api.post(f"/v1/capsules/{cid}/pause").status_code in (200, 202)
    wait_status(api, cid, "paused", timeout=60)
    assert admin.get(f"/v1/admin/teams/{team_id}/quota").json()["usage"]["vcpus"] == 0
    admin.put(f"/v1/admin/teams/{team_id}/quota", json={"capsules": 1, "vcpus": 0})
    err(api.post(f"/v1/capsules/{cid}/resume"), 403, "quota_exceeded")
    assert api.get(f"/v1/capsules/{cid}").json()["status"] == "paused"
    # Back to the defaults: the resume goes through.
    admin.put(f"/v1/admin/teams/{team_id}/quota", json={})
    assert api.post(f"/v1/capsules/{cid}/resume").status_code in (200, 202)
    wait_status(api, cid, "running", timeout=60)
    # Admins' changes are audited.
    entries = admin.get("/v1/admin/audit-logs").json()["entries"]
    assert any(e["action"] == "set_quota" and e["resource_id"] == team_id for e in entries), entries[:3]


def test_a_credential_past_its_rate_gets_429_with_retry_after(platform, team):
    owner, api = team
    codes = [api.get("/v1/capsules").status_code for _ in range(450)]
    assert set(codes) <= {200, 429}, set(codes)
    assert codes[:200] == [200] * 200, "the burst passes"
    assert 429 in codes, "a default bucket (200, then 50 a second) cannot take 450 at once"
    r = api.get("/v1/capsules")
    while r.status_code != 429:
        r = api.get("/v1/capsules")
    err(r, 429, "rate_limited")
    assert int(r.headers["retry-after"]) >= 1
    # The limit is the credential's: the team's session and the platform's key are not held up.
    assert owner.get("/v1/api-keys").status_code == 200
    assert platform.client().get("/v1/capsules").status_code == 200


def test_a_team_holds_at_most_its_streams(platform, team):
    _, api = team
    key = api.headers["X-API-Key"]
    url = platform.base_url + "/v1/events/stream"
    held = []
    try:
        for _ in range(24):
            c = httpx.Client(timeout=httpx.Timeout(10, read=None))
            r = c.send(c.build_request("GET", url, headers={"X-API-Key": key}), stream=True)
            held.append((c, r))
            assert r.status_code == 200, r.read()
        msg = err(httpx.get(url, headers={"X-API-Key": key}), 429, "rate_limited")
        assert "24 streams" in msg
        # Another team is not affected.
        with httpx.Client(timeout=httpx.Timeout(10, read=None)) as c, \
                c.stream("GET", url, headers={"X-API-Key": platform.api_key}) as r:
            assert r.status_code == 200
    finally:
        for c, r in held:
            r.close()
            c.close()
