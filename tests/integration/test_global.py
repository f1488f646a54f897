"""Global mode (extension `rate_limit.global`) in real Envoys: two instances (--concurrency 2
each) share every limit through one Rate Limit Service of the standard protocol over one real
Redis (tests/support/ratelimit_service.py); the service stopped, slow or broken shows each
failure mode (`local`, `allow`, `deny`) and its `keygate_global_calls_total` / `keygate_global_fallbacks_total` metrics."""
from __future__ import annotations

import shutil
import threading
import time

import pytest

import harness
from harness import wait_until
from util_rl import (EchoServer, KeyService, ensure_window, key, kh, plugin_config, rate_limited_body,
                     wait_loaded, window_end)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed (make deps installs it)"),
]

from ratelimit_service import RateLimitService, RedisServer, envoy_cluster  # noqa: E402

DOMAIN = "keygate-test"
TIMEOUT_MS = 2000


def lim(limit: int, window_s: int) -> dict:
    return {"limit": limit, "window_s": window_s}


KEYS = {
    "ak_shared": {"rate_limits": [lim(20, 60)]},
    "ak_burst": {"rate_limits": [lim(30, 60)]},
    "ak_two": {"rate_limits": [lim(50, 60), lim(4, 1)]},
    "ak_free": {"rate_limits": []},
    "ak_down": {"rate_limits": [lim(3, 60)]},
    "ak_slow": {"rate_limits": [lim(100, 60)]},
    "ak_broken": {"rate_limits": [lim(100, 60)]},
    "ak_back": {"rate_limits": [lim(100, 60)]},
    "ak_o1": {"owner": "org-g", "rate_limits": [lim(1000, 60)]},
    "ak_o2": {"owner": "org-g", "rate_limits": []},
    "ak_o3": {"owner": "org-g", "rate_limits": [lim(1000, 3600)]},
}
DOC = {"version": "global-1", "owners": {"org-1": {}, "org-g": {"rate_limits": [lim(12, 60)]}},
       "keys": [key(k[3:], k, **extra) for k, extra in KEYS.items()]}


def global_config(mode: str, **extra) -> dict:
    return plugin_config(rate_limit={"headers": "x-ratelimit", "global": {
        "cluster": "rls", "domain": DOMAIN, "timeout_ms": TIMEOUT_MS, "failure_mode": mode, **extra}})


class Fleet:
    def __init__(self):
        self.redis = RedisServer().start()
        self.rls = RateLimitService(self.redis.port).start()
        self.echo = EchoServer().start()
        self.ks = KeyService(DOC).start()
        self.envoys: dict[str, harness.Envoy] = {}

    def start(self, name: str, mode: str) -> harness.Envoy:
        env = harness.start_envoy(global_config(mode), self.ks.port, self.echo.port, concurrency=2,
                                  extra_clusters=[envoy_cluster(self.rls.port)])
        self.envoys[name] = env
        wait_loaded(env)
        return env

    def stop(self) -> list[str]:
        failures = []
        for env in self.envoys.values():
            env.stop()
            failures += env.wasm_failures()
        self.echo.stop()
        self.ks.stop()
        self.rls.close()
        self.redis.stop()
        return failures


_ENVOYS: list = []


@pytest.fixture(autouse=True)
def _attach_logs(request):
    request.node._keygate_envoys = _ENVOYS
    yield


@pytest.fixture(scope="module")
def fleet():
    f = Fleet()
    try:
        # A and B share the limits; each shows one failure mode, C the third.
        for name, mode in (("a", "local"), ("b", "allow"), ("c", "deny")):
            _ENVOYS.append(f.start(name, mode))
        yield f
    finally:
        failures = f.stop()
    if failures:
        pytest.fail("the wasm VM crashed (SPEC §5):\n" + "\n".join(failures[:20]))


def burst(envs: list[harness.Envoy], n_each: int, secret: str, workers: int) -> list:
    """n_each requests to each Envoy at once, `workers` connections per Envoy."""
    out: list = []
    lock = threading.Lock()

    def run(env):
        rs = env.request_many(n_each, "GET", "/burst", kh(secret), workers=workers)
        with lock:
            out.extend(rs)

    threads = [threading.Thread(target=run, args=(e,)) for e in envs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_two_envoys_share_one_limit_and_the_next_request_is_refused_on_either(fleet):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    L, W = 20, 60
    ensure_window(W, 20)
    t0 = time.time()
    results = burst([a, b], L // 2, "ak_shared", workers=8)
    assert [r.status for r in results].count(200) == L, results
    # Every allowed request saw its own count of the one shared counter.
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in results)
    assert remaining == list(range(L)), remaining
    for r in results:
        assert int(r.headers["x-ratelimit-limit"]) == L
        assert int(r.headers["x-ratelimit-reset"]) == window_end(W, t0)
    for env in (a, b):
        r = env.request("GET", "/next", kh("ak_shared"))
        assert r.status == 429, r
        ra = int(r.headers["retry-after"])
        assert 1 <= ra <= W
        assert r.body == rate_limited_body(ra)
        assert r.headers["x-ratelimit-remaining"] == "0"
        assert int(r.headers["x-ratelimit-reset"]) == window_end(W, t0)
    assert a.stat('keygate_global_calls_total{result="ok"}') > 0 and b.stat('keygate_global_calls_total{result="ok"}') > 0


def test_64_connections_over_two_envoys_allow_exactly_the_limit(fleet):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    L, W, N = 30, 60, 120
    ensure_window(W, 25)
    results = burst([a, b], N // 2, "ak_burst", workers=32)
    statuses = [r.status for r in results]
    assert statuses.count(200) == L, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(429) == N - L, {s: statuses.count(s) for s in set(statuses)}


def test_an_owners_limit_is_shared_by_its_keys_across_two_envoys(fleet):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    L, W = 12, 60
    ensure_window(W, 20)
    out: list = []
    lock = threading.Lock()

    def run(env, secret):
        rs = env.request_many(10, "GET", "/owner", kh(secret), workers=10)
        with lock:
            out.extend(rs)

    threads = [threading.Thread(target=run, args=(env, s))
               for env, s in ((a, "ak_o1"), (b, "ak_o2"), (a, "ak_o3"), (b, "ak_o1"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = [r.status for r in out]
    assert statuses.count(200) == L, {s: statuses.count(s) for s in set(statuses)}
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in out if r.status == 200)
    assert remaining == list(range(L)), remaining
    # The owner's descriptor went out with each key's own.
    req = fleet.rls.requests[-1]
    assert [(e.key, e.value) for e in req.descriptors[-1].entries] == [("keygate_owner", "org-g"),
                                                                       ("window_s", "60")]


def test_the_tightest_limit_of_several_windows_is_described(fleet):
    a, b = fleet.envoys["a"], fleet.envoys["b"]
    # Just after a second starts, with room in the minute.
    ensure_window(60, 5)
    now = time.time()
    time.sleep(int(now) + 1.05 - now)
    seen = [env.request("GET", "/two", kh("ak_two")) for env in (a, b, a, b, a)]
    assert [r.status for r in seen] == [200, 200, 200, 200, 429], seen
    assert [r.headers["x-ratelimit-limit"] for r in seen] == ["4"] * 5
    assert [r.headers["x-ratelimit-remaining"] for r in seen] == ["3", "2", "1", "0", "0"]
    assert seen[-1].headers["retry-after"] == "1"


def test_a_key_without_limits_never_asks_the_service(fleet):
    a = fleet.envoys["a"]
    before = fleet.rls.calls
    for _ in range(5):
        r = a.request("GET", "/free", kh("ak_free"))
        assert r.status == 200 and "x-ratelimit-limit" not in r.headers, r
    assert fleet.rls.calls == before
    # Nor does a refused credential.
    assert a.request("GET", "/x", kh("ak_nope")).status == 401
    assert fleet.rls.calls == before


def test_the_service_stopped_shows_each_failure_mode(fleet):
    a, b, c = fleet.envoys["a"], fleet.envoys["b"], fleet.envoys["c"]
    ensure_window(60, 15)
    fleet.rls.stop()
    try:
        # local: exact counting in that instance (3 allowed, then 429 with the usual headers).
        rs = [a.request("GET", "/down", kh("ak_down")) for _ in range(5)]
        assert [r.status for r in rs] == [200, 200, 200, 429, 429], rs
        assert [r.headers["x-ratelimit-remaining"] for r in rs] == ["2", "1", "0", "0", "0"]
        assert rs[-1].body == rate_limited_body(rs[-1].headers["retry-after"])
        # allow: passes, uncounted, without rate-limit headers.
        rs = [b.request("GET", "/down", kh("ak_down")) for _ in range(5)]
        assert [r.status for r in rs] == [200] * 5, rs
        assert all("x-ratelimit-limit" not in r.headers for r in rs)
        assert rs[0].json()["headers"]["x-api-key-id"] == "down"
        # deny: unavailable.
        r = c.request("GET", "/down", kh("ak_down"))
        assert r.status == 503, r
        assert r.body == b'{"error":{"code":"unavailable","message":"API key list not loaded"}}'
        # Each failure is counted, with what the failure mode did.
        assert a.stat('keygate_global_calls_total{result="unavailable"}') >= 5
        assert a.stat('keygate_global_fallbacks_total{failure_mode="local"}') >= 5
        assert b.stat('keygate_global_fallbacks_total{failure_mode="allow"}') >= 5
        assert c.stat('keygate_global_fallbacks_total{failure_mode="deny"}') >= 1
        assert a.stat('keygate_global_fallbacks_total{failure_mode="allow"}') == 0
    finally:
        fleet.rls.start()
    # Back: the service counts again.
    ok = a.stat('keygate_global_calls_total{result="ok"}')
    wait_until(lambda: a.request("GET", "/back", kh("ak_back")).status == 200
               and a.stat('keygate_global_calls_total{result="ok"}') > ok, timeout=15, message="global mode recovers")


def test_a_slow_service_times_out_and_a_broken_one_is_a_bad_reply(fleet):
    a, c = fleet.envoys["a"], fleet.envoys["c"]
    fleet.rls.delay_s = TIMEOUT_MS / 1000 + 1.0
    try:
        t0 = time.monotonic()
        r = a.request("GET", "/slow", kh("ak_slow"))
        took = time.monotonic() - t0
        assert r.status == 200 and r.headers["x-ratelimit-limit"] == "100", r
        assert TIMEOUT_MS / 1000 - 0.1 <= took < TIMEOUT_MS / 1000 + 0.9, took
        assert a.stat('keygate_global_calls_total{result="timeout"}') >= 1, a.keygate_stats()
    finally:
        fleet.rls.delay_s = 0.0
    fleet.rls.garbage = True
    try:
        r = a.request("GET", "/broken", kh("ak_broken"))
        assert r.status == 200 and r.headers["x-ratelimit-limit"] == "100", r
        assert a.stat('keygate_global_calls_total{result="bad_reply"}') >= 1
        assert c.request("GET", "/broken", kh("ak_broken")).status == 503
        assert c.stat('keygate_global_calls_total{result="bad_reply"}') >= 1
    finally:
        fleet.rls.garbage = False


def test_the_request_carries_one_descriptor_per_limit(fleet):
    a = fleet.envoys["a"]
    n = len(fleet.rls.requests)
    assert a.request("GET", "/d", kh("ak_two")).status in (200, 429)
    req = fleet.rls.requests[n]
    assert req.domain == DOMAIN and req.hits_addend == 1
    got = [([(e.key, e.value) for e in d.entries], d.limit.requests_per_unit, int(d.limit.unit))
           for d in req.descriptors]
    assert got == [([("keygate_key", "two"), ("window_s", "60")], 50, 2),
                   ([("keygate_key", "two"), ("window_s", "1")], 4, 1)]


def test_a_window_the_protocol_cannot_express_is_a_configuration_error():
    cfg = global_config("local")
    cfg["rate_limit"]["default"] = [lim(10, 60), lim(5, 7)]
    log = harness.expect_envoy_config_failure(cfg, extra_clusters=[envoy_cluster(harness.free_port())])
    assert "rate_limit.default[1].window_s" in log and "7 is not one of 1, 60, 3600, 86400" in log, log[-2000:]
