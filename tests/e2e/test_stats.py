"""Team statistics on a real platform: `GET /v1/capsules/stats` and `/usage`, fed by the sampler
(every 10 s), scoped to the caller's team, validated, and parsed by the official SDK."""

import datetime as dt
import time

from wrenn import WrennClient

from tests.support.waits import wait_status
from test_capsules import assert_error

SAMPLER_SEC = 10


def today():
    return dt.datetime.now(dt.timezone.utc).date()


def parse_label(s):
    return dt.datetime.fromisoformat(s.replace("Z", "+00:00"))


def check_series(stats, buckets, width):
    s = stats["series"]
    assert len(s["labels"]) == len(s["running"]) == len(s["vcpus"]) == len(s["memory_mb"]) == buckets, stats
    labels = [parse_label(x) for x in s["labels"]]
    assert all(l.tzinfo is not None for l in labels)
    assert all((b - a).total_seconds() == width for a, b in zip(labels, labels[1:]))
    now = dt.datetime.now(dt.timezone.utc)
    assert labels[-1] <= now < labels[-1] + dt.timedelta(seconds=width + 5)


def usage_today(api):
    r = api.get("/v1/capsules/usage", params={"from": str(today()), "to": str(today())})
    assert r.status_code == 200, r.text
    points = r.json()["points"]
    assert len(points) == 1 and points[0]["date"] == str(today()), points
    return points[0]


def wait_for(cond, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def test_stats_and_usage_follow_the_teams_capsules(platform):
    key = platform.add_team_with_key()
    bystander = platform.add_team_with_key()
    with platform.client(key) as api, platform.client(bystander) as other:
        empty = api.get("/v1/capsules/stats").json()
        assert empty["range"] == "1h"
        assert empty["current"]["running_count"] == 0 and empty["current"]["vcpus_reserved"] == 0
        assert empty["peaks"] == {"running_count": 0, "vcpus": 0, "memory_mb": 0}
        check_series(empty, 120, 30)
        assert set(empty["series"]["running"]) == {0}
        assert usage_today(api) == {"date": str(today()), "cpu_minutes": 0.0, "ram_mb_minutes": 0.0}

        ids = []
        for vcpus, mem in ((1, 256), (2, 512)):
            r = api.post("/v1/capsules", json={"vcpus": vcpus, "memory_mb": mem})
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        started = time.time()
        for cid in ids:
            assert wait_status(api, cid, {"running", "error"}, timeout=120)["status"] == "running"

        # `current` is live; the other team sees none of it.
        s = api.get("/v1/capsules/stats", params={"range": "5m"}).json()
        assert s["current"]["running_count"] == 2, s
        assert (s["current"]["vcpus_reserved"], s["current"]["memory_mb_reserved"]) == (3, 768)
        assert s["series"]["running"][-1] == 2
        check_series(s, 100, 3)
        o = other.get("/v1/capsules/stats").json()
        assert o["current"]["running_count"] == 0 and o["peaks"]["vcpus"] == 0, o

        # The sampler charges reserved vCPU and memory minutes to today.
        u = wait_for(lambda: (p := usage_today(api))["cpu_minutes"] > 0 and p, 3 * SAMPLER_SEC, "usage")
        # Both capsules reserve 256 MiB per vCPU, so every tick adds minutes in that ratio.
        assert abs(u["ram_mb_minutes"] / u["cpu_minutes"] - 256) < 0.5, u
        assert u["cpu_minutes"] <= 3 * (time.time() - started + 2 * SAMPLER_SEC) / 60, u
        assert usage_today(other)["cpu_minutes"] == 0

        # Pausing releases the reservation; destroying too. Peaks remember.
        r = api.post(f"/v1/capsules/{ids[1]}/pause")
        assert r.status_code == 202, r.text
        assert wait_status(api, ids[1], {"paused", "error"}, timeout=120)["status"] == "paused"
        s = api.get("/v1/capsules/stats").json()
        assert (s["current"]["running_count"], s["current"]["vcpus_reserved"], s["current"]["memory_mb_reserved"]) == (1, 1, 256)
        for cid in ids:
            assert api.delete(f"/v1/capsules/{cid}").status_code in (200, 202, 204)
        for cid in ids:
            wait_status(api, cid, {"stopped"}, timeout=60)
        destroyed = time.time()
        s = api.get("/v1/capsules/stats", params={"range": "5m"}).json()
        assert s["current"]["running_count"] == 0 and s["current"]["vcpus_reserved"] == 0
        assert s["peaks"] == {"running_count": 2, "vcpus": 3, "memory_mb": 768}, s
        # The series shows the two capsules in the past and, once a tick has seen them gone, zero.
        assert max(s["series"]["running"]) == 2 and max(s["series"]["memory_mb"]) == 768
        time.sleep(max(0, destroyed + 2.5 * SAMPLER_SEC + 1 - time.time()))
        s = api.get("/v1/capsules/stats", params={"range": "5m"}).json()
        assert s["series"]["running"][-1] == 0, s["series"]
        assert max(s["series"]["running"]) == 2
        # No usage accrues without capsules.
        before = usage_today(api)["cpu_minutes"]
        time.sleep(SAMPLER_SEC + 1)
        assert usage_today(api)["cpu_minutes"] == before


def test_stats_and_usage_validate_their_parameters(platform, api):
    for r in ("5m", "1h", "6h", "24h", "30d"):
        got = api.get("/v1/capsules/stats", params={"range": r})
        assert got.status_code == 200 and got.json()["range"] == r, got.text
    check_series(api.get("/v1/capsules/stats", params={"range": "30d"}).json(), 120, 21600)
    check_series(api.get("/v1/capsules/stats", params={"range": "24h"}).json(), 120, 720)
    assert_error(api.get("/v1/capsules/stats", params={"range": "7d"}), 400, "invalid_request")
    assert_error(api.get("/v1/capsules/stats", params={"range": ""}), 400, "invalid_request")

    u = api.get("/v1/capsules/usage").json()
    assert u["to"] == str(today()) and u["from"] == str(today() - dt.timedelta(days=30))
    assert [p["date"] for p in u["points"]] == [str(today() - dt.timedelta(days=30 - i)) for i in range(31)]
    assert all(p["cpu_minutes"] >= 0 and p["ram_mb_minutes"] >= 0 for p in u["points"])
    r = api.get("/v1/capsules/usage", params={"from": "2026-01-01", "to": "2026-04-02"})
    assert r.status_code == 200 and len(r.json()["points"]) == 92, r.text
    for params in ({"from": "2026-01-01", "to": "2026-04-03"},  # 93 days
                   {"from": "2026-02-02", "to": "2026-02-01"},
                   {"from": "yesterday"}, {"to": "2026-02-30"}, {"from": "2026-1-1"}):
        assert_error(api.get("/v1/capsules/usage", params=params), 400, "invalid_request")
    with platform.client("") as anon:
        assert_error(anon.get("/v1/capsules/stats"), 401, "unauthorized")
        assert_error(anon.get("/v1/capsules/usage"), 401, "unauthorized")


def test_sdk_parses_stats_and_usage(platform):
    with WrennClient(api_key=platform.api_key, base_url=platform.base_url) as w:
        s = w.capsules.stats(range="24h")
        assert s.range == "24h" and s.current.running_count >= 0
        assert len(s.series.labels) == 120 and s.series.labels[0].tzinfo is not None
        u = w.capsules.usage(from_=today() - dt.timedelta(days=6), to=today())
        assert u.from_ == today() - dt.timedelta(days=6) and u.to == today()
        assert [p.date for p in u.points] == [today() - dt.timedelta(days=6 - i) for i in range(7)]
