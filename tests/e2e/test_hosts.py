"""Hosts over HTTP: records and permissions, registration with one-time tokens, host tokens and
refresh rotation, mTLS material, heartbeats and liveness, tags, capsule events, deletion."""

import itertools
import time

import httpx
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from conftest import admin_browser, new_user


def err(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.json()["error"]["code"] == code, r.text


# One host per address: each registration of these tests gets a port of its own.
_PORTS = itertools.count(17443)


def register(platform, token, address=None, **specs):
    address = address or f"127.0.0.1:{next(_PORTS)}"
    body = {"token": token, "address": address, "arch": "x86_64", "cpu_cores": 8, "memory_mb": 16384, "disk_gb": 100, **specs}
    return httpx.post(platform.base_url + "/v1/hosts/register", json=body)


def host_client(platform, jwt):
    return httpx.Client(base_url=platform.base_url, headers={"X-Host-Token": jwt})


def test_embedded_host_is_a_regular_online_host(platform, api, running_capsule):
    admin = admin_browser(platform)
    hosts = admin.get("/v1/hosts").json()
    emb = [h for h in hosts if h["provider"] == "embedded"]
    assert len(emb) == 1, hosts
    h = emb[0]
    assert h["type"] == "regular" and h["status"] == "online" and h["id"].startswith("host-")
    assert h["cpu_cores"] >= 1 and h["memory_mb"] > 0 and h["last_heartbeat_at"]
    # Its capsules show in the delete preview; it cannot be deleted.
    preview = admin.get(f"/v1/hosts/{h['id']}/delete-preview").json()
    assert running_capsule["id"] in preview["sandbox_ids"] and preview["host"]["id"] == h["id"]
    err(admin.delete(f"/v1/hosts/{h['id']}"), 400, "invalid_request")
    # Heartbeats keep it online.
    time.sleep(7)
    assert admin.get(f"/v1/hosts/{h['id']}").json()["status"] == "online"


def test_create_permissions_and_byoc(platform, mail_sink):
    admin = admin_browser(platform)
    owner = new_user(platform, mail_sink)
    member = new_user(platform, mail_sink)
    outsider = new_user(platform, mail_sink)
    team = owner.me["team_id"]
    assert owner.post(f"/v1/teams/{team}/members", json={"email": member.email}).status_code == 201
    assert member.post("/v1/auth/switch-team", json={"team_id": team}).status_code == 200

    err(owner.post("/v1/hosts", json={"type": "regular"}), 403, "forbidden")
    err(admin.post("/v1/hosts", json={"type": "weird"}), 400, "invalid_request")
    err(admin.post("/v1/hosts", json={"type": "byoc"}), 400, "invalid_request")
    err(owner.post("/v1/hosts", json={"type": "byoc", "team_id": team}), 400, "invalid_request")  # BYOC off
    assert admin.put(f"/v1/admin/teams/{team}/byoc", json={"byoc": True}).status_code == 204
    err(member.post("/v1/hosts", json={"type": "byoc", "team_id": team}), 403, "forbidden")
    err(outsider.post("/v1/hosts", json={"type": "byoc", "team_id": team}), 404, "not_found")
    r = owner.post("/v1/hosts", json={"type": "byoc", "team_id": team, "provider": "hetzner", "availability_zone": "eu-west"})
    assert r.status_code == 201, r.text
    byoc, token = r.json()["host"], r.json()["registration_token"]
    assert len(token) == 64 and byoc["status"] == "pending" and byoc["team_id"] == team and byoc["type"] == "byoc"
    assert byoc["created_by"] == owner.me["user_id"] and byoc["provider"] == "hetzner"

    # Visibility: admins all, the team its BYOC hosts, others nothing.
    assert any(h["id"] == byoc["id"] for h in admin.get("/v1/hosts").json())
    assert [h["id"] for h in member.get("/v1/hosts").json()] == [byoc["id"]]
    assert outsider.get("/v1/hosts").json() == []
    err(outsider.get(f"/v1/hosts/{byoc['id']}"), 404, "not_found")
    assert member.get(f"/v1/hosts/{byoc['id']}").status_code == 200
    # Managing: owner and admins yes, members no, outsiders see nothing.
    err(member.post(f"/v1/hosts/{byoc['id']}/tags", json={"tag": "gpu"}), 403, "forbidden")
    err(outsider.post(f"/v1/hosts/{byoc['id']}/tags", json={"tag": "gpu"}), 404, "not_found")
    assert owner.post(f"/v1/hosts/{byoc['id']}/tags", json={"tag": "gpu"}).status_code == 204
    assert owner.post(f"/v1/hosts/{byoc['id']}/tags", json={"tag": "zone:eu"}).status_code == 204
    err(owner.post(f"/v1/hosts/{byoc['id']}/tags", json={"tag": "no spaces"}), 400, "invalid_request")
    assert member.get(f"/v1/hosts/{byoc['id']}/tags").json() == ["gpu", "zone:eu"]
    assert owner.delete(f"/v1/hosts/{byoc['id']}/tags/gpu").status_code == 204
    err(owner.delete(f"/v1/hosts/{byoc['id']}/tags/gpu"), 404, "not_found")
    err(member.get(f"/v1/hosts/{byoc['id']}/delete-preview"), 403, "forbidden")
    # A team admin manages the team's BYOC hosts like the owner.
    assert owner.patch(f"/v1/teams/{team}/members/{member.me['user_id']}", json={"role": "admin"}).status_code == 204
    assert member.post(f"/v1/hosts/{byoc['id']}/tags", json={"tag": "by-admin"}).status_code == 204
    assert member.get(f"/v1/hosts/{byoc['id']}/delete-preview").json()["sandbox_ids"] == []
    assert member.delete(f"/v1/hosts/{byoc['id']}/tags/by-admin").status_code == 204
    assert owner.patch(f"/v1/teams/{team}/members/{member.me['user_id']}", json={"role": "member"}).status_code == 204
    # A new token while pending replaces the old one.
    r = owner.post(f"/v1/hosts/{byoc['id']}/token")
    assert r.status_code == 201
    err(register(platform, token), 401, "unauthorized")
    token = r.json()["registration_token"]
    err(member.post(f"/v1/hosts/{byoc['id']}/token"), 403, "forbidden")
    assert register(platform, token).status_code == 201
    err(owner.post(f"/v1/hosts/{byoc['id']}/token"), 409, "invalid_state")
    err(member.delete(f"/v1/hosts/{byoc['id']}"), 403, "forbidden")
    err(outsider.delete(f"/v1/hosts/{byoc['id']}"), 404, "not_found")
    assert owner.delete(f"/v1/hosts/{byoc['id']}").status_code == 204
    err(owner.get(f"/v1/hosts/{byoc['id']}"), 404, "not_found")


def test_registration_tokens_refresh_and_liveness(platform):
    admin = admin_browser(platform)
    r = admin.post("/v1/hosts", json={"type": "regular"})
    host, token = r.json()["host"], r.json()["registration_token"]
    err(register(platform, token, address="not-an-address"), 400, "invalid_request")
    err(register(platform, "0" * 64), 401, "unauthorized")
    r = register(platform, token, address="127.0.0.1:07443")
    assert r.status_code == 201, r.text
    reg = r.json()
    err(register(platform, token), 401, "unauthorized")  # single use
    assert reg["host"]["status"] == "online" and reg["host"]["address"] == "127.0.0.1:7443"
    assert reg["host"]["cpu_cores"] == 8 and reg["host"]["memory_mb"] == 16384 and reg["host"]["arch"] == "x86_64"
    jwt, refresh = reg["token"], reg["refresh_token"]
    assert jwt.count(".") == 2 and len(refresh) == 64

    # mTLS material: a P-256 server certificate for the agent's IP, signed by the CA.
    ca = x509.load_pem_x509_certificate(reg["tls"]["ca_cert"].encode())
    cert = x509.load_pem_x509_certificate(reg["tls"]["cert"].encode())
    assert cert.issuer == ca.subject
    ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, __import__("cryptography.hazmat.primitives.asymmetric.ec", fromlist=["ECDSA"]).ECDSA(cert.signature_hash_algorithm))
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    # It names the host: the control plane connects to that name, so a certificate issued to
    # another host (even one at this address) is refused.
    assert san.get_values_for_type(x509.DNSName) == [f"{host['id']}.hosts.wrenn.internal"]
    # One host per address, however it is spelled: another host cannot take this one's.
    other = admin.post("/v1/hosts", json={"type": "regular"}).json()
    err(register(platform, other["registration_token"], address=" 127.0.0.1:7443 "), 409, "conflict")
    assert admin.delete(f"/v1/hosts/{other['host']['id']}").status_code == 204
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert "PRIVATE KEY" in reg["tls"]["key"]

    hid = host["id"]
    with host_client(platform, jwt) as hc:
        assert hc.post(f"/v1/hosts/{hid}/heartbeat").status_code == 204
        err(hc.post("/v1/hosts/host-someoneelse0000000000000000/heartbeat"), 403, "forbidden")
        err(hc.post("/v1/hosts/sandbox-events", json={"event": "sandbox.stopped", "sandbox_id": "cl-x", "host_id": "host-other"}), 403, "forbidden")
        assert hc.post("/v1/hosts/sandbox-events", json={"event": "sandbox.future_thing", "sandbox_id": "cl-x", "host_id": hid}).status_code == 204
        err(hc.post("/v1/hosts/sandbox-events", json={"sandbox_id": "cl-x", "host_id": hid}), 400, "invalid_request")
    err(httpx.post(f"{platform.base_url}/v1/hosts/{hid}/heartbeat"), 401, "unauthorized")
    err(httpx.post(f"{platform.base_url}/v1/hosts/{hid}/heartbeat", headers={"X-Host-Token": jwt[:-3] + "abc"}), 401, "unauthorized")
    # Host tokens are not user credentials.
    err(httpx.get(f"{platform.base_url}/v1/capsules", headers={"X-Host-Token": jwt}), 401, "unauthorized")

    # Silent for three intervals (2 s here) → unreachable; a heartbeat brings it back.
    deadline = time.time() + 20
    while admin.get(f"/v1/hosts/{hid}").json()["status"] != "unreachable":
        assert time.time() < deadline, "host never became unreachable"
        time.sleep(0.5)
    with host_client(platform, jwt) as hc:
        assert hc.post(f"/v1/hosts/{hid}/heartbeat").status_code == 204
    assert admin.get(f"/v1/hosts/{hid}").json()["status"] == "online"

    # Refresh rotates: the old refresh token is dead at once; the new JWT works.
    r = httpx.post(platform.base_url + "/v1/hosts/auth/refresh", json={"refresh_token": refresh})
    assert r.status_code == 200, r.text
    new = r.json()
    assert new["refresh_token"] != refresh and new["host"]["id"] == hid and new["tls"]["cert"]
    err(httpx.post(platform.base_url + "/v1/hosts/auth/refresh", json={"refresh_token": refresh}), 401, "unauthorized")
    with host_client(platform, new["token"]) as hc:
        assert hc.post(f"/v1/hosts/{hid}/heartbeat").status_code == 204
    r = httpx.post(platform.base_url + "/v1/hosts/auth/refresh", json={"refresh_token": new["refresh_token"]})
    assert r.status_code == 200
    err(httpx.post(platform.base_url + "/v1/hosts/auth/refresh", json={"refresh_token": new["refresh_token"]}), 401, "unauthorized")
    last = r.json()

    # Deleted: its tokens stop working (404 tells the agent to forget its credentials).
    assert admin.get(f"/v1/hosts/{hid}/delete-preview").json()["sandbox_ids"] == []
    assert admin.delete(f"/v1/hosts/{hid}").status_code == 204
    with host_client(platform, last["token"]) as hc:
        err(hc.post(f"/v1/hosts/{hid}/heartbeat"), 404, "not_found")
    err(httpx.post(platform.base_url + "/v1/hosts/auth/refresh", json={"refresh_token": last["refresh_token"]}), 401, "unauthorized")


def test_reconciler_destroys_vms_no_capsule_owns(platform, api):
    """A VM whose capsule record is gone (here: deleted behind the platform's back) is an
    orphan: the periodic reconciler destroys it."""
    import sqlite3

    from tests.support.qemu import vmm_processes
    from tests.support.waits import wait_status

    r = api.post("/v1/capsules", json={})
    cid = r.json()["id"]
    assert wait_status(api, cid, {"running"})["status"] == "running"
    assert vmm_processes(cid)
    db = sqlite3.connect(platform.data_dir / "wrenn.db")
    with db:
        db.execute("DELETE FROM capsules WHERE id = ?", (cid,))
    db.close()
    deadline = time.time() + 30
    while vmm_processes(cid):
        assert time.time() < deadline, "the orphaned VM was not destroyed"
        time.sleep(0.5)
    # Recorded: a destroy by the reconciler, reason orphaned (platform-wide: the row is gone).
    from conftest import admin_browser

    admin = admin_browser(platform)
    deadline = time.time() + 10
    while True:
        log = admin.get("/v1/admin/audit-logs", params={"resource_type": "capsule", "action": "destroy"}).json()["entries"]
        entry = [e for e in log if e["resource_id"] == cid]
        if entry:
            break
        assert time.time() < deadline, "no audit entry for the orphan"
        time.sleep(0.5)
    assert (entry[0]["actor_name"], entry[0]["metadata"]["reason"], entry[0]["team_id"]) == ("reconciler", "orphaned", None)
