"""Rate limiting in a real Envoy (--concurrency 2): exact counts, fixed windows aligned to the epoch,
plans and defaults, several windows per key, header styles, error templates, invalid_key_limit per
client IP, and counters that survive key-list reloads (SPEC §2 "Effective rate limits", §3 steps 6,
7 and 12, §4 headers and templates, §5 exactness)."""
from __future__ import annotations

import copy
import math
import re
import time

import pytest

from harness import wait_until
from util_rl import (BODY, Stack, align_to_second, ensure_window, header_count, key, kh, plugin_config,
                     rate_limited_body, start_stack, window_end)

pytestmark = pytest.mark.timeout(150)

_ENVOYS: list = []

XRL = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
IETF = ("ratelimit-policy", "ratelimit")


@pytest.fixture(autouse=True)
def _attach_logs(request):
    request.node._keygate_envoys = _ENVOYS
    yield


def _module_stack(cfg: dict, doc: dict) -> Stack:
    stack = start_stack(cfg, doc)
    _ENVOYS.append(stack.env)
    return stack


def _teardown(stack: Stack) -> None:
    failures = stack.stop()
    if failures:
        pytest.fail("the wasm VM crashed (SPEC §5):\n" + "\n".join(failures[:20]))


def _doc(keys: dict, plans: dict | None = None, version: str = "rl-1") -> dict:
    doc = {"version": version, "keys": [key(k[3:], k, **extra) for k, extra in keys.items()]}
    if plans is not None:
        doc["plans"] = plans
    return doc


def lim(limit: int, window_s: int) -> dict:
    return {"limit": limit, "window_s": window_s}


def xrl(r) -> tuple[int, int, int]:
    """(limit, remaining, reset) from the X-RateLimit-* headers."""
    return tuple(int(r.headers[h]) for h in XRL)  # type: ignore[return-value]


def assert_allowed(r) -> None:
    assert r.status == 200, r
    assert "header_list" in r.json(), r  # answered by the echo upstream


def assert_rate_limited(r, t0: float, t1: float, until: int | None = None) -> int:
    """r is `rate_limited` with the default body; returns Retry-After. With `until` (the Unix second
    at which every exceeded window has reset), Retry-After must be the time left until then."""
    assert r.status == 429, r
    assert "retry-after" in r.headers, r
    ra = int(r.headers["retry-after"])
    assert ra >= 1, r
    assert r.body == rate_limited_body(ra), r
    assert r.headers.get("content-type") == "application/json", r
    if until is not None:
        lo, hi = max(1, math.floor(until - t1)), max(1, math.ceil(until - t0))
        assert lo <= ra <= hi, f"Retry-After {ra} not in [{lo}, {hi}] (window ends at {until}, now {t1:.3f})"
    return ra


def timed(fn, *a, **kw):
    t0 = time.time()
    r = fn(*a, **kw)
    return r, t0, time.time()


# ------------------------------------------------------------------------------------------------
# Envoy 1: x-ratelimit headers, default limit, plans, several windows, invalid_key_limit, reloads.
# ------------------------------------------------------------------------------------------------
R1_PLANS = {"free": {"rate_limits": [lim(7, 60)]}, "unl": {"rate_limits": []}}
R1_KEYS = {
    "ak_seq": {"rate_limits": [lim(5, 60)]},
    "ak_burst": {"rate_limits": [lim(50, 60)]},
    "ak_free": {"plan": "free"},
    "ak_free_own": {"plan": "free", "rate_limits": [lim(9, 60)]},
    "ak_free_none": {"plan": "free", "rate_limits": []},
    "ak_unl_plan": {"plan": "unl"},
    "ak_default": {},
    "ak_none": {"rate_limits": []},
    "ak_multi": {"rate_limits": [lim(5, 60), lim(3, 1)]},
    "ak_tie": {"rate_limits": [lim(2, 60), lim(2, 1)]},
    "ak_both1": {"rate_limits": [lim(1, 60), lim(1, 1)]},
    "ak_only1s": {"rate_limits": [lim(1, 1), lim(5, 60)]},
    "ak_once": {"rate_limits": [lim(1, 60)]},
    "ak_ivalid": {"rate_limits": [lim(100, 60)]},
    "ak_reload": {"rate_limits": [lim(6, 60)]},
    "ak_change": {"rate_limits": [lim(10, 60)]},
}
R1_CFG = plugin_config(
    rate_limit={"default": [lim(4, 60)], "headers": "x-ratelimit"},
    invalid_key_limit={"limit": 3, "window_s": 60},
)


@pytest.fixture(scope="module")
def r1():
    stack = _module_stack(R1_CFG, _doc(R1_KEYS, R1_PLANS))
    yield stack
    _teardown(stack)


def test_burst_from_64_connections_allows_exactly_the_limit(r1):
    L, W, N = 50, 60, 250
    ensure_window(W, 15)
    t0 = time.time()
    results = r1.env.request_many(N, "GET", "/burst", kh("ak_burst"), workers=64)
    t1 = time.time()
    assert window_end(W, t0) == window_end(W, t1), "the burst crossed a window boundary"
    statuses = [r.status for r in results]
    assert statuses.count(200) == L, {s: statuses.count(s) for s in set(statuses)}
    assert statuses.count(429) == N - L, {s: statuses.count(s) for s in set(statuses)}
    # every allowed request saw its own count: remaining L-1 ... 0, each exactly once
    remaining = sorted(int(r.headers["x-ratelimit-remaining"]) for r in results if r.status == 200)
    assert remaining == list(range(L)), remaining
    for r in results:
        assert int(r.headers["x-ratelimit-limit"]) == L
        assert int(r.headers["x-ratelimit-reset"]) == window_end(W, t0)
        if r.status == 429:
            assert int(r.headers["x-ratelimit-remaining"]) == 0
            assert r.body == rate_limited_body(r.headers["retry-after"])
    # and the window stays closed
    assert r1.get("/burst", kh("ak_burst")).status == 429


def test_sequence_counts_down_then_rate_limited(r1):
    L, W = 5, 60
    ensure_window(W, 6)
    for i in range(L):
        r, t0, t1 = timed(r1.get, f"/seq/{i}", kh("ak_seq"))
        assert_allowed(r)
        assert xrl(r) == (L, L - 1 - i, window_end(W, t0)), (i, r)
        assert r.json()["path"] == f"/seq/{i}"
    for _ in range(2):
        r, t0, t1 = timed(r1.get, "/seq/over", kh("ak_seq"))
        end = window_end(W, t0)
        ra = assert_rate_limited(r, t0, t1, until=end)
        assert 1 <= ra <= W
        assert xrl(r) == (L, 0, end), r  # remaining never below 0
    assert window_end(W) == end, "the sequence crossed a window boundary"


def test_reset_is_the_end_of_the_epoch_aligned_window(r1):
    r, t0, t1 = timed(r1.get, "/reset", kh("ak_default"))
    assert_allowed(r)
    reset = int(r.headers["x-ratelimit-reset"])
    assert reset % 60 == 0, reset
    assert reset in (window_end(60, t0), window_end(60, t1)), (reset, t0, t1)
    assert t0 < reset <= t1 + 60


def test_effective_limits_key_over_plan_over_default(r1):
    ensure_window(60, 3)
    for secret, L in (("ak_free", 7), ("ak_free_own", 9), ("ak_default", None)):
        r, t0, _ = timed(r1.get, "/plans", kh(secret))
        assert_allowed(r)
        limit, remaining, reset = xrl(r)
        if L is None:  # rate_limit.default; ak_default may have been used by another test
            assert limit == 4 and 0 <= remaining <= 3, r
        else:
            assert (limit, remaining, reset) == (L, L - 1, window_end(60, t0)), (secret, r)


@pytest.mark.parametrize("secret", ["ak_none", "ak_free_none", "ak_unl_plan"])
def test_explicit_empty_list_means_no_limit_and_no_headers(r1, secret):
    for _ in range(8):  # more than the default (4) and the free plan (7)
        r = r1.get("/unlimited", kh(secret))
        assert_allowed(r)
        for h in XRL + IETF + ("retry-after",):
            assert h not in r.headers, r


def test_several_windows_header_describes_least_remaining(r1):
    # ak_multi: 5 per 60 s and 3 per 1 s
    ensure_window(60, 6)
    end60 = window_end(60)
    align_to_second()
    t_start = time.time()
    seen = [xrl(r1.get("/multi", kh("ak_multi"))) for _ in range(3)]
    t_end = time.time()
    assert int(t_start) == int(t_end), "requests crossed a second boundary"
    end1 = int(t_start) + 1
    # 1 s window: remaining 2,1,0; 60 s window: 4,3,2 -> the 1 s window is described
    assert seen == [(3, 2, end1), (3, 1, end1), (3, 0, end1)], seen
    align_to_second()
    t_start = time.time()
    r4 = r1.get("/multi", kh("ak_multi"))
    r5 = r1.get("/multi", kh("ak_multi"))
    # 1 s window: remaining 2,1; 60 s window: 1,0 -> the 60 s window is described
    assert xrl(r4) == (5, 1, end60), r4
    assert xrl(r5) == (5, 0, end60), r5
    r6, t0, t1 = timed(r1.get, "/multi", kh("ak_multi"))
    assert int(t_start) == int(t1), "requests crossed a second boundary"
    # only the 60 s window is exceeded: Retry-After runs to its end, not to the next second
    ra = assert_rate_limited(r6, t0, t1, until=end60)
    assert ra >= 2
    assert int(r6.headers["x-ratelimit-remaining"]) == 0


def test_several_windows_ties_go_to_the_shortest_window(r1):
    ensure_window(60, 3)
    align_to_second()
    r, t0, t1 = timed(r1.get, "/tie", kh("ak_tie"))  # both windows: remaining 1
    r2 = r1.get("/tie", kh("ak_tie"))                  # both windows: remaining 0
    t2 = time.time()
    assert int(t0) == int(t2), "requests crossed a second boundary"
    assert xrl(r) == (2, 1, int(t0) + 1), r
    assert xrl(r2) == (2, 0, int(t0) + 1), r2


def test_retry_after_covers_every_exceeded_window(r1):
    ensure_window(60, 5)
    end60 = window_end(60)
    # both windows (1 per 60 s, 1 per 1 s) exceeded: wait for the 60 s one
    align_to_second()
    r, t0, _ = timed(r1.get, "/both", kh("ak_both1"))
    assert_allowed(r)
    assert xrl(r) == (1, 0, int(t0) + 1), r  # tie at remaining 0 -> the 1 s window
    r, t0, t1 = timed(r1.get, "/both", kh("ak_both1"))
    assert int(t1) == int(t0)
    ra = assert_rate_limited(r, t0, t1, until=end60)
    assert ra >= 3, ra
    # only the 1 s window (1 per 1 s, 5 per 60 s) exceeded: 1 second
    align_to_second()
    r, t0, _ = timed(r1.get, "/only1s", kh("ak_only1s"))
    assert_allowed(r)
    assert xrl(r) == (1, 0, int(t0) + 1), r
    r, t0, t1 = timed(r1.get, "/only1s", kh("ak_only1s"))
    assert int(t1) == int(t0)
    assert assert_rate_limited(r, t0, t1, until=int(t0) + 1) == 1
    align_to_second()
    assert_allowed(r1.get("/only1s", kh("ak_only1s")))  # the next second opens again


def test_rate_limit_headers_are_added_once(r1):
    ensure_window(60, 3)
    r = r1.get("/once", kh("ak_once"))
    assert_allowed(r)
    r429 = r1.get("/once", kh("ak_once"))
    assert r429.status == 429
    for resp in (r, r429):
        for h in XRL:
            assert header_count(resp, h) == 1, (h, resp.header_list)
        for h in IETF:
            assert header_count(resp, h) == 0, (h, resp.header_list)
    assert header_count(r429, "retry-after") == 1
    assert header_count(r, "retry-after") == 0


def test_invalid_key_limit_per_client_ip(r1):
    ensure_window(60, 6)
    # missing keys do not count
    for hdrs in [None] * 6 + [{"x-api-key": ""}] * 2:
        r = r1.get("/ik", hdrs, source_ip="127.0.0.4")
        assert (r.status, r.body) == (401, BODY["missing_key"]), r
    assert_allowed(r1.get("/ik", kh("ak_ivalid"), source_ip="127.0.0.4"))
    # `limit` (3) failed attempts from 127.0.0.2 are answered invalid_key ...
    for i in range(3):
        r = r1.get("/ik", kh(f"ak_nope_{i}"), source_ip="127.0.0.2")
        assert (r.status, r.body) == (401, BODY["invalid_key"]), (i, r)
    # ... then 127.0.0.2 is rate limited, even with a valid key, before any lookup
    for hdrs in (kh("ak_ivalid"), kh("ak_nope_9"), kh("ak_ivalid")):
        r, t0, t1 = timed(r1.get, "/ik", hdrs, source_ip="127.0.0.2")
        ra = assert_rate_limited(r, t0, t1, until=window_end(60, t0))
        assert 1 <= ra <= 60
        for h in XRL + IETF:
            assert h not in r.headers, r  # no key rate-limit headers
    # 127.0.0.3 is unaffected
    r = r1.get("/ik", kh("ak_ivalid"), source_ip="127.0.0.3")
    assert_allowed(r)
    assert int(r.headers["x-ratelimit-limit"]) == 100
    r = r1.get("/ik", kh("ak_nope_0"), source_ip="127.0.0.3")
    assert (r.status, r.body) == (401, BODY["invalid_key"]), r
    assert_allowed(r1.get("/ik", kh("ak_ivalid"), source_ip="127.0.0.3"))


def _publish_and_wait(stack: Stack, doc: dict, marker: str) -> None:
    """Serve `doc` and wait until its new key `marker` authenticates on every worker. Each probe
    comes from a fresh source address: a probe that fails (old list) counts against
    invalid_key_limit for its address."""
    ips = (f"127.0.1.{i}" for i in range(1, 255))

    def works() -> bool:
        return stack.get("/marker", kh(marker), source_ip=next(ips)).status == 200

    stack.publish(doc)
    wait_until(works, timeout=10, interval=0.1, message=f"new key list with {marker} in force")
    time.sleep(0.6)
    wait_until(lambda: all(works() for _ in range(12)), timeout=5, interval=0.1,
               message=f"new key list with {marker} in force on every worker")


def test_counts_survive_a_key_list_reload(r1):
    ensure_window(60, 12)
    r = r1.get("/reload", kh("ak_reload"))
    assert xrl(r)[:2] == (6, 5), r
    r = r1.get("/reload", kh("ak_reload"))
    assert xrl(r)[:2] == (6, 4), r
    doc = copy.deepcopy(r1.doc)
    doc["version"] = "rl-2"
    doc["keys"].append(key("marker_a", "ak_marker_a", rate_limits=[]))
    _publish_and_wait(r1, doc, "ak_marker_a")
    r = r1.get("/reload", kh("ak_reload"))
    assert xrl(r)[:2] == (6, 3), r
    r = r1.get("/reload", kh("ak_reload"))
    assert xrl(r)[:2] == (6, 2), r


def test_changed_limit_applies_from_the_next_request(r1):
    ensure_window(60, 12)
    for rem in (9, 8):
        r = r1.get("/change", kh("ak_change"))
        assert xrl(r)[:2] == (10, rem), r
    doc = copy.deepcopy(r1.doc)
    doc["version"] = "rl-3"
    for k in doc["keys"]:
        if k["id"] == "change":
            k["rate_limits"] = [lim(4, 60)]
    doc["keys"].append(key("marker_b", "ak_marker_b", rate_limits=[]))
    _publish_and_wait(r1, doc, "ak_marker_b")
    # 2 already counted in this window: the 3rd and 4th are allowed, the 5th is not
    r = r1.get("/change", kh("ak_change"))
    assert xrl(r)[:2] == (4, 1), r
    r = r1.get("/change", kh("ak_change"))
    assert xrl(r)[:2] == (4, 0), r
    r, t0, t1 = timed(r1.get, "/change", kh("ak_change"))
    assert_rate_limited(r, t0, t1, until=window_end(60, t0))
    assert xrl(r)[:2] == (4, 0), r


# ------------------------------------------------------------------------------------------------
# Envoy 2: IETF draft headers.
# ------------------------------------------------------------------------------------------------
R2_CFG = plugin_config(rate_limit={"default": [lim(3, 60)], "headers": "ietf"})


@pytest.fixture(scope="module")
def r2():
    stack = _module_stack(R2_CFG, _doc({"ak_ietf": {}, "ak_ietf_multi": {"rate_limits": [lim(10, 60), lim(2, 10)]}}))
    yield stack
    _teardown(stack)


RL_RX = re.compile(r'^"default";r=(\d+);t=(\d+)$')


def _ietf(r, L: int, W: int, t0: float, t1: float) -> int:
    """Checks RateLimit-Policy / RateLimit for the limit L per W s; returns r (remaining)."""
    assert header_count(r, "ratelimit-policy") == 1 and header_count(r, "ratelimit") == 1, r.header_list
    assert r.headers["ratelimit-policy"] == f'"default";q={L};w={W}', r
    m = RL_RX.match(r.headers["ratelimit"])
    assert m, r
    end = window_end(W, t0)
    t = int(m.group(2))
    assert max(0, math.floor(end - t1)) <= t <= math.ceil(end - t0), (t, end, t0, r)
    for h in XRL:
        assert h not in r.headers, r
    return int(m.group(1))


def test_ietf_headers(r2):
    L, W = 3, 60
    ensure_window(W, 5)
    for i in range(L):
        r, t0, t1 = timed(r2.get, "/ietf", kh("ak_ietf"))
        assert_allowed(r)
        assert _ietf(r, L, W, t0, t1) == L - 1 - i
    r, t0, t1 = timed(r2.get, "/ietf", kh("ak_ietf"))
    assert_rate_limited(r, t0, t1, until=window_end(W, t0))
    assert _ietf(r, L, W, t0, t1) == 0


def test_ietf_headers_describe_least_remaining_window(r2):
    ensure_window(60, 5)
    ensure_window(10, 2)
    r, t0, t1 = timed(r2.get, "/ietf", kh("ak_ietf_multi"))
    assert _ietf(r, 2, 10, t0, t1) == 1


# ------------------------------------------------------------------------------------------------
# Envoy 3: both header styles, error templates, invalid_key_limit without key headers.
# ------------------------------------------------------------------------------------------------
R3_CFG = plugin_config(
    rate_limit={"default": [lim(2, 60)], "headers": "both"},
    invalid_key_limit={"limit": 1, "window_s": 60},
    errors={
        "rate_limited": {"body": "ra={retry_after} l={limit} r={remaining} rs={reset}",
                         "content_type": "text/plain", "headers": {"x-extra": "yes"}},
        "missing_key": {"status": 401, "body": "mk ra={retry_after} l={limit} r={remaining} rs={reset}"},
    },
)


@pytest.fixture(scope="module")
def r3():
    stack = _module_stack(R3_CFG, _doc({"ak_both": {}, "ak_tpl": {}, "ak_ik": {}}))
    yield stack
    _teardown(stack)


def test_both_header_styles(r3):
    ensure_window(60, 5)
    for rem in (1, 0):
        r, t0, t1 = timed(r3.get, "/both", kh("ak_both"))
        assert_allowed(r)
        assert xrl(r) == (2, rem, window_end(60, t0)), r
        assert _ietf_both(r, 2, 60, t0, t1) == rem
    r, t0, t1 = timed(r3.get, "/both", kh("ak_both"))
    assert r.status == 429, r
    assert xrl(r) == (2, 0, window_end(60, t0)), r
    assert _ietf_both(r, 2, 60, t0, t1) == 0


def _ietf_both(r, L, W, t0, t1) -> int:
    assert r.headers["ratelimit-policy"] == f'"default";q={L};w={W}', r
    m = RL_RX.match(r.headers["ratelimit"])
    assert m, r
    for h in XRL + IETF:
        assert header_count(r, h) == 1, (h, r.header_list)
    end = window_end(W, t0)
    assert max(0, math.floor(end - t1)) <= int(m.group(2)) <= math.ceil(end - t0), r
    return int(m.group(1))


def test_error_template_substitutions(r3):
    ensure_window(60, 5)
    assert_allowed(r3.get("/tpl", kh("ak_tpl")))
    assert_allowed(r3.get("/tpl", kh("ak_tpl")))
    r, t0, t1 = timed(r3.get, "/tpl", kh("ak_tpl"))
    assert r.status == 429, r
    ra = int(r.headers["retry-after"])
    reset = window_end(60, t0)
    assert int(r.headers["x-ratelimit-reset"]) == reset
    assert r.body == f"ra={ra} l=2 r=0 rs={reset}".encode(), r
    assert r.headers["content-type"] == "text/plain"
    assert r.headers.get("x-extra") == "yes"
    assert max(1, math.floor(reset - t1)) <= ra <= math.ceil(reset - t0)
    # no rate-limit context: every placeholder is 0
    r = r3.get("/tpl")
    assert (r.status, r.body) == (401, b"mk ra=0 l=0 r=0 rs=0"), r
    assert r.headers["content-type"] == "application/json"


def test_invalid_key_rate_limited_has_no_key_headers_in_any_style(r3):
    ensure_window(60, 3)
    r = r3.get("/ik", kh("ak_wrong"), source_ip="127.0.0.5")
    assert (r.status, r.body) == (401, BODY["invalid_key"]), r
    r, t0, t1 = timed(r3.get, "/ik", kh("ak_ik"), source_ip="127.0.0.5")
    assert r.status == 429, r
    ra = int(r.headers["retry-after"])
    assert max(1, math.floor(window_end(60, t0) - t1)) <= ra <= math.ceil(window_end(60, t0) - t0)
    for h in XRL + IETF:
        assert h not in r.headers, r
    assert r.body.startswith(f"ra={ra} ".encode()), r  # the rate_limited template, Retry-After substituted
    assert_allowed(r3.get("/ik", kh("ak_ik"), source_ip="127.0.0.6"))


# ------------------------------------------------------------------------------------------------
# Envoy 4: no rate-limit headers.
# ------------------------------------------------------------------------------------------------
R4_CFG = plugin_config(rate_limit={"default": [lim(2, 60)], "headers": "none"})


@pytest.fixture(scope="module")
def r4():
    stack = _module_stack(R4_CFG, _doc({"ak_quiet": {}}))
    yield stack
    _teardown(stack)


def test_header_style_none(r4):
    ensure_window(60, 3)
    for _ in range(2):
        r = r4.get("/none", kh("ak_quiet"))
        assert_allowed(r)
        for h in XRL + IETF + ("retry-after",):
            assert h not in r.headers, r
    r, t0, t1 = timed(r4.get, "/none", kh("ak_quiet"))
    assert_rate_limited(r, t0, t1, until=window_end(60, t0))  # still limited, with Retry-After
    for h in XRL + IETF:
        assert h not in r.headers, r
