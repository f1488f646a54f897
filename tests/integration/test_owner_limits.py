"""Owner limits (SPEC §2 and §3 step 12) in a real Envoy (--concurrency 2): an owner's
`rate_limits` are counted across all of its keys, exactly across workers, in addition to each
key's own limits; the headers describe the limit with least remaining."""
from __future__ import annotations

import time

import pytest

from util_rl import ensure_window, key, kh, plugin_config, start_stack, window_end

pytestmark = pytest.mark.timeout(120)

_ENVOYS: list = []


@pytest.fixture(autouse=True)
def _attach_logs(request):
    request.node._keygate_envoys = _ENVOYS
    yield


DOC = {
    "version": "owners-1",
    "owners": {
        "org-shared": {"rate_limits": [{"limit": 40, "window_s": 60}]},
        "org-tight": {"status": "active", "rate_limits": [{"limit": 3, "window_s": 60}]},
        "org-free": {},
    },
    "plans": {"big": {"rate_limits": [{"limit": 10000, "window_s": 60}]}},
    "keys": [
        key("s1", "ak_s1", owner="org-shared", rate_limits=[{"limit": 1000, "window_s": 60}]),
        key("s2", "ak_s2", owner="org-shared", plan="big"),
        key("s3", "ak_s3", owner="org-shared"),
        key("s4", "ak_s4", owner="org-shared", rate_limits=[]),
        key("t1", "ak_t1", owner="org-tight", rate_limits=[{"limit": 1, "window_s": 60}]),
        key("t2", "ak_t2", owner="org-tight"),
        key("f1", "ak_f1", owner="org-free"),
    ],
}


@pytest.fixture(scope="module")
def stack():
    s = start_stack(plugin_config(), DOC)
    _ENVOYS.append(s.env)
    yield s
    failures = s.stop()
    if failures:
        pytest.fail("the wasm VM crashed (SPEC §5):\n" + "\n".join(failures[:20]))


def test_several_keys_of_one_owner_over_64_connections_get_exactly_the_owners_limit(stack):
    L, W, N = 40, 60, 200
    ensure_window(W, 20)
    from concurrent.futures import ThreadPoolExecutor
    secrets = ["ak_s1", "ak_s2", "ak_s3", "ak_s4"]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(lambda i: stack.env.request("GET", f"/o/{i}", kh(secrets[i % 4])), range(N)))
    statuses = [r.status for r in results]
    assert statuses.count(200) == L, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(429) == N - L
    # The owner's limit has the least remaining, so it is the one described: each count once.
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in results if r.status == 200)
    assert remaining == list(range(L)), remaining
    for r in results:
        assert r.headers["x-ratelimit-limit"] == str(L)
        assert int(r.headers["x-ratelimit-reset"]) == window_end(W, t0)
        if r.status == 429:
            assert int(r.headers["retry-after"]) >= 1
    # Every key of the owner is held now, whatever its own limits.
    for s in secrets:
        assert stack.get("/after", kh(s)).status == 429


def test_a_keys_own_tighter_limit_is_described_and_the_owner_still_counts(stack):
    ensure_window(60, 8)
    r = stack.get("/t", kh("ak_t1"))
    assert r.status == 200, r
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("1", "0")
    r = stack.get("/t", kh("ak_t1"))
    assert r.status == 429, r
    # Both of t1's requests counted against org-tight (3/min): one left for t2.
    r = stack.get("/t", kh("ak_t2"))
    assert r.status == 200, r
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("3", "0")
    assert stack.get("/t", kh("ak_t2")).status == 429


def test_an_owner_without_limits_holds_nothing(stack):
    for _ in range(10):
        r = stack.get("/f", kh("ak_f1"))
        assert r.status == 200 and "x-ratelimit-limit" not in r.headers, r
