"""Waiting for a capsule to reach a status."""

import time


def wait_status(api, capsule_id, targets, timeout=30, interval=0.25, fail_on=()):
    """Polls `GET /v1/capsules/{id}` through `api` (an httpx client with a key) every `interval`
    seconds until the capsule's status is one of `targets` (a status or a set) and returns the
    capsule. Fails (AssertionError) when the status is in `fail_on` and not wanted, or when
    `timeout` seconds pass (`None`: wait as long as it takes)."""
    targets = {targets} if isinstance(targets, str) else set(targets)
    deadline = None if timeout is None else time.time() + timeout
    while True:
        r = api.get(f"/v1/capsules/{capsule_id}")
        assert r.status_code == 200, r.text
        last = r.json()
        if last["status"] in targets:
            return last
        if last["status"] in fail_on:
            raise AssertionError(f"capsule {capsule_id} is {last['status']}, wanted {'/'.join(sorted(targets))}")
        if deadline is not None and time.time() >= deadline:
            raise AssertionError(f"capsule {capsule_id} stuck in {last['status']}")
        time.sleep(interval)
