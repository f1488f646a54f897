"""keygate core in real Envoy (--concurrency 2): the decisions without rate limits / IP / scopes,
error overrides, key-list refresh and revocation, fetch behaviour (one per refresh, ETag, 304,
headers, authority), bad lists, key service down or slow, max_stale_s, fail_open, configuration
errors, metrics, no key material in logs/stats, and no panic on hostile input.

SPEC references are to the product contract's sections (§1 configuration, §2 key list,
§3 decisions, §4 responses, §5 guarantees, §6 observability); docs/README.md maps each to the
reference page that documents it."""
from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

import harness
from echo import EchoServer
from harness import wait_until
from keyservice import KeyService, sha256_hex
from util import (
    ALL_METRICS,
    DEFAULT_BODIES,
    assert_refused,
    batch_classes,
    code,
    describe,
    doc,
    fetch_total,
    header_values,
    key,
    metric_deltas,
    plugin_config,
    split_path,
    assert_no_key_material,
    start_envoy,
    expect_config_failure,
    upstream_seen,
    wait_loaded,
)

# =================================================================================================
# The shared gateway: one Envoy with a rich, static key list for the decision-class tests.
# =================================================================================================
K = {  # name -> plaintext key
    "live": "ak_live_1",
    "unix_ok": "ak_unix_ok",
    "upper": "ak_upper_hash",
    "nostatus_owner": "ak_owner_nostatus",
    "revoked": "ak_revoked",
    "disabled": "ak_disabled",
    "deleted": "ak_deleted",
    "suspended": "ak_suspended",
    "exp_rfc": "ak_exp_rfc",
    "exp_unix": "ak_exp_unix",
    "exp_offset": "ak_exp_offset",
    "owner_missing": "ak_owner_missing",
    "owner_disabled": "ak_owner_disabled",
    "revoked_bad_owner": "ak_revoked_bad_owner",
    "no_prefix": "zz_in_list",
    "len1024": "ak_" + "L" * 1021,
    "len1025": "ak_" + "M" * 1022,
}
assert len(K["len1024"]) == 1024 and len(K["len1025"]) == 1025

MAIN_DOC = doc(
    [
        key("key_live", K["live"], "org-a", status="active", expires_at="2099-01-01T00:00:00Z"),
        key("key_unix_ok", K["unix_ok"], "org-a", expires_at=4102444800),
        {"id": "key_upper", "hash": sha256_hex(K["upper"]).upper(), "owner": "org-a"},
        key("key_nostatus_owner", K["nostatus_owner"], "org-n"),
        key("key_revoked", K["revoked"], status="revoked"),
        key("key_disabled", K["disabled"], status="disabled"),
        key("key_deleted", K["deleted"], status="deleted"),
        key("key_suspended", K["suspended"], status="suspended"),
        key("key_exp_rfc", K["exp_rfc"], expires_at="2020-01-01T00:00:00Z"),
        key("key_exp_unix", K["exp_unix"], expires_at=1600000000),
        key("key_exp_offset", K["exp_offset"], expires_at="2021-06-01T12:00:00.5+02:00"),
        key("key_owner_missing", K["owner_missing"], "org-ghost"),
        key("key_owner_disabled", K["owner_disabled"], "org-d"),
        key("key_revoked_bad_owner", K["revoked_bad_owner"], "org-d", status="revoked"),
        key("key_no_prefix", K["no_prefix"]),
        key("key_len1024", K["len1024"]),
        key("key_len1025", K["len1025"]),
    ],
    version="main-1",
    owners={"org-a": {"status": "active"}, "org-d": {"status": "disabled"}, "org-n": {}},
)

MAIN_CONFIG = plugin_config(
    refresh_s=2,
    credentials=[{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}, {"query": "api_key"}],
    key_prefixes=["ak_"],
    exempt=[{"preflight": True}, {"path_prefix": "/swagger"}, {"method": "GET", "path_exact": "/healthz"}],
)

LIVE = K["live"]


@dataclass
class Gateway:
    env: harness.Envoy
    ks: KeyService
    echo: EchoServer
    first_allowed_s: float

    def get(self, path="/r", headers=None, method="GET"):
        return self.env.request(method, path, headers)


@pytest.fixture(scope="module")
def _main_gateway():
    ks = KeyService(MAIN_DOC).start()
    echo = EchoServer().start()
    env = None
    try:
        # wasm:debug so that any debug line the filter emits is in the log we grep for key material.
        env = start_envoy(harness.start_envoy, MAIN_CONFIG, ks.port, echo.port,
                                  extra_args=["--component-log-level", "wasm:debug"])
        t0 = time.monotonic()
        wait_until(lambda: env.request("GET", "/r", {"x-api-key": LIVE}).status == 200, 5.0, 0.05,
                   "first key list loaded")
        yield Gateway(env, ks, echo, time.monotonic() - t0)
    finally:
        if env is not None:
            env.stop()
        echo.stop()
        ks.stop()


@pytest.fixture
def gw(request, _main_gateway):
    """The shared gateway; the test fails if the wasm VM panicked during it."""
    request.node._keygate_envoys = [_main_gateway.env]  # conftest attaches its log on failure
    before = len(_main_gateway.env.wasm_failures())
    yield _main_gateway
    failures = _main_gateway.env.wasm_failures()[before:]
    if failures:
        pytest.fail("the wasm VM crashed (SPEC §5: nothing makes the filter panic):\n" + "\n".join(failures[:20]))


def check_refused(gw: Gateway, cls: str, path="/r", headers=None, method="GET"):
    r = gw.get(path, headers, method)
    assert_refused(r, cls, f"{method} {path} {headers!r:.200}")
    return r


def check_allowed(gw: Gateway, key_id: str, owner: str, path="/r", headers=None, method="GET") -> dict:
    r = gw.get(path, headers, method)
    seen = upstream_seen(r, f"{method} {path} {headers!r:.200}")
    assert header_values(seen, "x-api-key-id") == [key_id], seen["header_list"]
    assert header_values(seen, "x-api-key-owner") == [owner], seen["header_list"]
    return seen


# ---- allowed -------------------------------------------------------------------------------------
def test_first_list_loads_quickly(gw):
    # The first fetch happens within ~0.5 s of start; readiness -> allowed well under 2 s.
    assert gw.first_allowed_s < 2.0, f"first list took {gw.first_allowed_s:.2f}s after Envoy was ready"


def test_allowed_header_credential_identity_and_strip(gw):
    seen = check_allowed(gw, "key_live", "org-a", "/items?x=1", {"x-api-key": LIVE, "x-other": "kept"})
    assert seen["path"] == "/items?x=1"
    assert header_values(seen, "x-api-key") == [], "credential header must be stripped (strip_credential default true)"
    assert header_values(seen, "x-other") == ["kept"]
    # Bearer scheme, compared case-insensitively; the authorization header is stripped.
    for value in (f"Bearer {LIVE}", f"bearer {LIVE}", f"BEARER {LIVE}"):
        seen = check_allowed(gw, "key_live", "org-a", "/b", {"authorization": value})
        assert header_values(seen, "authorization") == [], f"{value!r}: authorization not stripped"


def test_allowed_variants(gw):
    check_allowed(gw, "key_unix_ok", "org-a", headers={"x-api-key": K["unix_ok"]})  # future unix expiry
    check_allowed(gw, "key_upper", "org-a", headers={"x-api-key": K["upper"]})  # uppercase hex hash
    check_allowed(gw, "key_nostatus_owner", "org-n", headers={"x-api-key": K["nostatus_owner"]})  # owner {} is active
    check_allowed(gw, "key_len1024", "org-a", headers={"x-api-key": K["len1024"]})  # 1024 bytes is not too long
    # An empty source counts as absent: the next source (here the query) is used.
    seen = check_allowed(gw, "key_live", "org-a", f"/e?api_key={LIVE}", [("x-api-key", ""), ("authorization", "Bearer ")])
    assert "api_key" not in seen["path"]


def test_allowed_query_credential_stripped_other_params_kept(gw):
    seen = check_allowed(gw, "key_live", "org-a", f"/items?a=1&api_key={LIVE}&b=two%20x&c=", {})
    assert seen["path"] == "/items?a=1&b=two%20x&c=", seen["path"]
    seen = check_allowed(gw, "key_live", "org-a", f"/items?api_key={LIVE}", {})
    path, params = split_path(seen["path"])
    assert path == "/items" and params == [], seen["path"]
    # percent-decoded: %61 is 'a'
    seen = check_allowed(gw, "key_live", "org-a", "/items?z=9&api_key=%61k_live_1", {})
    assert seen["path"] == "/items?z=9", seen["path"]
    # source order: x-api-key comes first, even when the query holds a good key
    check_refused(gw, "invalid_key", f"/q?api_key={LIVE}", {"x-api-key": "ak_unknown"})


# ---- refusals -------------------------------------------------------------------------------------
def test_missing_key(gw):
    check_refused(gw, "missing_key", "/items")
    check_refused(gw, "missing_key", "/items", {"authorization": "Basic dXNlcjpwYXNz"})  # wrong scheme = absent
    check_refused(gw, "missing_key", "/items", {"authorization": "Bearer"})
    check_refused(gw, "missing_key", "/items", {"authorization": LIVE})  # no scheme at all
    check_refused(gw, "missing_key", "/items?api_key=&x=1")
    check_refused(gw, "missing_key", "/items?apikey=" + LIVE)  # another parameter name
    check_refused(gw, "missing_key", "/items", {"x-api-key": ""}, method="POST")


def test_invalid_key(gw):
    check_refused(gw, "invalid_key", headers={"x-api-key": "ak_unknown"})
    check_refused(gw, "invalid_key", headers={"authorization": "Bearer ak_unknown"})
    check_refused(gw, "invalid_key", "/r?api_key=ak_unknown")
    # > 1024 bytes, even though its hash is in the list
    check_refused(gw, "invalid_key", headers={"x-api-key": K["len1025"]})
    # not matching key_prefixes, even though its hash is in the list
    check_refused(gw, "invalid_key", headers={"x-api-key": K["no_prefix"]})
    check_refused(gw, "invalid_key", headers={"authorization": "Bearer " + K["no_prefix"]})
    # the hash itself is not a key
    check_refused(gw, "invalid_key", headers={"x-api-key": sha256_hex(LIVE)})
    # a key that differs only in case
    check_refused(gw, "invalid_key", headers={"x-api-key": LIVE.upper().replace("AK_", "ak_")})


@pytest.mark.parametrize("name", ["revoked", "disabled", "deleted", "suspended", "exp_rfc", "exp_unix",
                                  "exp_offset", "revoked_bad_owner"])
def test_expired_key(gw, name):
    check_refused(gw, "expired_key", headers={"x-api-key": K[name]})


@pytest.mark.parametrize("name", ["owner_missing", "owner_disabled"])
def test_owner_not_valid_is_invalid_key(gw, name):
    check_refused(gw, "invalid_key", headers={"x-api-key": K[name]})


# ---- exempt ---------------------------------------------------------------------------------------
def test_exempt_rules(gw):
    def exempt(method, path, headers=None):
        r = gw.get(path, headers, method)
        seen = upstream_seen(r, f"exempt {method} {path}")
        assert seen["method"] == method
        assert header_values(seen, "x-api-key-id") == [] and header_values(seen, "x-api-key-owner") == [], (
            f"exempt {method} {path}: identity headers reached upstream: {seen['header_list']}")
        assert not any(k.lower().startswith("x-ratelimit") or k.lower().startswith("ratelimit")
                       for k in r.headers), r.headers
        return seen

    before = gw.env.stat('keygate_requests_total{decision="exempt"}')
    pre = {"origin": "https://app.example", "access-control-request-method": "POST"}
    exempt("OPTIONS", "/any/thing", pre)
    exempt("GET", "/swagger")
    exempt("GET", "/swagger/ui/index.html")
    exempt("POST", "/swagger/x")
    exempt("GET", "/healthz")
    # path normalisation (SPEC §3): . and .. resolved, // merged, %2F decoded, \ read as /
    exempt("GET", "/v1/..//swagger/./ui")
    exempt("GET", "/x%2F..%2Fswagger")
    exempt("GET", "/healthz?probe=1")
    # an exempt request with a key still gets no identity, and the key does not go upstream
    # (SPEC §5: keys never appear upstream unless strip_credential is false)
    seen = exempt("GET", "/swagger/ui", {"x-api-key": LIVE})
    assert header_values(seen, "x-api-key") == [], seen["header_list"]
    seen = exempt("OPTIONS", "/r", {**pre, "authorization": f"Bearer {LIVE}"})
    assert header_values(seen, "authorization") == [], seen["header_list"]
    seen = exempt("GET", f"/swagger/ui?v=1&api_key={LIVE}")
    assert seen["path"] == "/swagger/ui?v=1", seen["path"]
    assert gw.env.stat('keygate_requests_total{decision="exempt"}') - before == 11

    # not exempt
    check_refused(gw, "missing_key", "/r", {"origin": "https://app.example"}, method="OPTIONS")  # no ACRM
    check_refused(gw, "missing_key", "/r", {"access-control-request-method": "GET"}, method="OPTIONS")  # no Origin
    check_refused(gw, "missing_key", "/swaggerx")
    check_refused(gw, "missing_key", "/api/swagger")
    check_refused(gw, "missing_key", "/healthz", method="POST")  # method must match too
    check_refused(gw, "missing_key", "/healthz/deep")  # path_exact
    check_refused(gw, "missing_key", "/swagger/../private")


def test_client_identity_headers_never_reach_upstream(gw):
    spoof = [("x-api-key-id", "spoofed-id"), ("X-Api-Key-Owner", "spoofed-owner"), ("x-api-key-id", "again")]
    # allowed: exactly the real values
    seen = check_allowed(gw, "key_live", "org-a", "/r", [("x-api-key", LIVE), *spoof])
    assert "spoofed" not in json.dumps(seen["header_list"])
    # exempt: none at all
    for method, path, extra in (("GET", "/swagger/x", []), ("GET", "/healthz", [("x-api-key", LIVE)]),
                                ("OPTIONS", "/r", [("origin", "o"), ("access-control-request-method", "GET")])):
        seen = upstream_seen(gw.get(path, [*extra, *spoof], method), f"exempt {method} {path}")
        assert header_values(seen, "x-api-key-id") == [] and header_values(seen, "x-api-key-owner") == [], seen["header_list"]


# ---- hostile input --------------------------------------------------------------------------------
HOSTILE = [
    # (description, method, path, headers, expected class or "allowed")
    ("non-UTF-8 x-api-key", "GET", "/r", [("x-api-key", b"ak_\xff\xfe\x80")], "invalid_key"),
    ("non-UTF-8 bearer key", "GET", "/r", [("authorization", b"Bearer ak_\xc3\x28\xff")], "invalid_key"),
    ("non-UTF-8 authorization, no scheme", "GET", "/r", [("authorization", b"\xff\xfe\xfd")], "missing_key"),
    ("non-UTF-8 scheme", "GET", "/r", [("authorization", b"B\xe9arer ak_live_1")], "missing_key"),
    ("non-UTF-8 x-api-key and good bearer", "GET", "/r", [("x-api-key", b"\xff"), ("authorization", "Bearer ak_live_1")], "invalid_key"),
    ("non-UTF-8 spoofed identity", "GET", "/r", [("x-api-key", "ak_live_1"), ("x-api-key-id", b"\xff\xfe")], "allowed"),
    ("10 kB key", "GET", "/r", [("x-api-key", "ak_" + "k" * 10_000)], "invalid_key"),
    ("10 kB bearer key", "GET", "/r", [("authorization", "Bearer ak_" + "k" * 10_000)], "invalid_key"),
    ("10 kB query key", "GET", "/r?api_key=ak_" + "q" * 10_000, [], "invalid_key"),
    ("query %ff", "GET", "/r?api_key=%ff%fe", [], "invalid_key"),
    ("query key with %ff after the prefix", "GET", "/r?api_key=ak_%ff", [], "invalid_key"),
    ("% garbage elsewhere in the query, good key", "GET", "/r?x=%&y=%zz&z=%%41&api_key=ak_live_1&w=%f", [], "allowed"),
    ("% garbage in the query, no key", "GET", "/r?x=%&y=%zz%", [], "missing_key"),
    ("query with only &&&==", "GET", "/r?&&&==&=&api_key", [], "missing_key"),
    ("weird path, no key", "GET", "/%zz/%/..%2F..%5C..//./%2e%2E/", [], "missing_key"),
    ("weird path, good key", "GET", "/%zz/%/..%2F..%5C..//./%2e%2E/x", [("x-api-key", "ak_live_1")], "allowed"),
    ("dot-dot beyond root, good key", "GET", "/../../../../etc/passwd", [("x-api-key", "ak_live_1")], "allowed"),
    ("very long path, no key", "GET", "/" + "a/" * 3000, [], "missing_key"),
    ("many slashes, good key", "GET", "/" * 500 + "x", [("x-api-key", "ak_live_1")], "allowed"),
    ("backslash path", "GET", "/a\\..\\swagger", [], "exempt"),
    ("many credential headers", "GET", "/r", [("x-api-key", "ak_live_1")] * 50, "any"),
    ("key with spaces inside", "GET", "/r", [("x-api-key", "ak_live 1")], "invalid_key"),
]


@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_input_no_panic(gw, case):
    desc, method, path, headers, expected = case
    try:
        r = gw.get(path, headers, method)
    except Exception as e:  # noqa: BLE001
        pytest.fail(f"{desc}: no HTTP answer ({e!r})")
    # every refusal is one of the classes; an empty 503 would be a dead VM
    assert not (r.status == 503 and r.body == b""), f"{desc}: empty 503 (wasm VM crashed?)"
    if expected == "any":
        assert r.status == 200 or code(r) in DEFAULT_BODIES, describe(r)
    elif expected in ("allowed", "exempt"):
        seen = upstream_seen(r, desc)
        ids = header_values(seen, "x-api-key-id")
        assert ids == (["key_live"] if expected == "allowed" else []), f"{desc}: identity {ids}"
    else:
        assert_refused(r, expected, desc)
    # the VM of this worker still works afterwards
    assert gw.get("/r", {"x-api-key": LIVE}).status == 200


# ---- metrics, no key material ---------------------------------------------------------------------
def test_metrics_names_and_no_key_material(gw):
    env = gw.env
    before = env.stats()
    check_allowed(gw, "key_live", "org-a", headers={"x-api-key": LIVE})
    upstream_seen(gw.get("/swagger"), "exempt")
    check_refused(gw, "missing_key")
    check_refused(gw, "invalid_key", headers={"x-api-key": "ak_unknown_secret"})
    check_refused(gw, "expired_key", headers={"x-api-key": K["revoked"]})
    after = env.stats()
    d = metric_deltas(before, after)
    for m in ('keygate_requests_total{decision="allowed"}', 'keygate_requests_total{decision="exempt"}', 'keygate_requests_total{decision="missing_key"}', 'keygate_requests_total{decision="invalid_key"}', 'keygate_requests_total{decision="expired_key"}'):
        assert d.get(m) == 1, f"{m} should have grown by exactly 1: deltas {d}"
    for m in ('keygate_requests_total{decision="unavailable"}', 'keygate_requests_total{decision="fail_open"}', 'keygate_requests_total{decision="forbidden"}', 'keygate_requests_total{decision="ip_denied"}',
              'keygate_requests_total{decision="rate_limited"}', 'keygate_list_fetches_total{result="failed"}', 'keygate_list_fetches_total{result="rejected"}'):
        assert d.get(m, 0) == 0, f"{m} should not have changed: deltas {d}"

    status, prom = env.admin("/stats/prometheus")
    assert status == 200
    for m in ALL_METRICS:
        assert re.search(rf"^{re.escape(m)}(\{{\}})? \d", prom, re.M), f"{m} missing from /stats/prometheus"
    assert after["keygate_keys_loaded"] == len(MAIN_DOC["keys"])
    assert after['keygate_list_fetches_total{result="ok"}'] >= 1

    # No metric per key or per client: nothing named after a key id, owner or client address.
    kg_names = [k for k in after if "keygate" in k]
    for k in kg_names:
        assert not re.search(r"key_|org-|127_0_0_1|127\.0\.0\.1", k.replace("keygate_", "", 1)), k

    # No key material anywhere: the plaintext keys sent in this module and their hashes.
    _, stats_text = env.admin("/stats")
    haystacks = {"log": env.log(), "prometheus": prom, "stats": stats_text}
    secrets = list(K.values()) + ["ak_unknown_secret", "ak_unknown"]
    needles = []
    for s in secrets:
        needles += [s, sha256_hex(s), sha256_hex(s).upper()]
    for where, text in haystacks.items():
        for n in needles:
            assert n not in text, f"key material {n[:12]}... found in Envoy's {where}"


# =================================================================================================
# Tests with their own Envoy
# =================================================================================================
def test_unavailable_before_first_good_list_then_allowed(envoy_factory, keyservice, echo):
    good = doc([key("k1", "ak_first")])
    keyservice.set_document(good)
    keyservice.body_override = b'{"version": "broken", "keys": ['  # never a good list
    env = start_envoy(envoy_factory, plugin_config(refresh_s=1), keyservice.port, echo.port)
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="rejected"}') >= 1, 4.0, 0.05, "a rejected fetch")
    for hdrs in ({"x-api-key": "ak_first"}, {}, {"x-api-key": "ak_other"}):
        r = env.request("GET", "/r", hdrs)
        assert r.status == 503 and r.body == DEFAULT_BODIES["unavailable"], f"{hdrs}: {describe(r)}"
        assert r.headers.get("content-type") == "application/json"
    # a failing key service: still no list
    keyservice.body_override = None
    keyservice.status = 500
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="failed"}') >= 1, 4.0, 0.05, "a failed fetch")
    assert_refused(env.request("GET", "/r", {"x-api-key": "ak_first"}), "unavailable", "after 500")
    assert env.stat("keygate_keys_loaded") == 0
    assert env.stat('keygate_requests_total{decision="unavailable"}') >= 4
    # the good list arrives (backoff is capped at refresh_s = 1)
    keyservice.reset()
    wait_loaded(env, "ak_first", timeout=3.0)
    assert_refused(env.request("GET", "/r", {"x-api-key": "ak_other"}), "invalid_key", "after load")
    assert env.stat("keygate_keys_loaded") == 1


def test_error_overrides_and_upstream_options(envoy_factory, keyservice, echo):
    keyservice.set_document(doc([key("kid-1", "ak_ov", "own-1"), key("kid-2", "ak_ov2", "own-1", status="revoked")]))
    cfg = plugin_config(
        refresh_s=2,
        credentials=[{"header": "x-api-key"}, {"query": "api_key"}],
        upstream={"strip_credential": False, "key_id_header": "x-kid", "owner_header": None},
        errors={
            "missing_key": {
                "status": 400,
                "body": "need a key; retry={retry_after} limit={limit} rem={remaining} reset={reset}",
                "content_type": "text/plain; charset=utf-8",
                "headers": {"www-authenticate": 'ApiKey realm="api"', "x-extra": "yes"},
            },
            "invalid_key": {"status": 403},
            "expired_key": {"body": '{"gone":true}'},
        },
    )
    env = start_envoy(envoy_factory, cfg, keyservice.port, echo.port)
    wait_loaded(env, "ak_ov")

    r = env.request("GET", "/r")
    assert r.status == 400, describe(r)
    assert r.body == b"need a key; retry=0 limit=0 rem=0 reset=0", r.body
    assert r.headers.get("content-type") == "text/plain; charset=utf-8"
    assert r.headers.get("www-authenticate") == 'ApiKey realm="api"'
    assert r.headers.get("x-extra") == "yes"

    r = env.request("GET", "/r", {"x-api-key": "ak_nope"})
    assert (r.status, r.body) == (403, DEFAULT_BODIES["invalid_key"]), describe(r)
    assert r.headers.get("content-type") == "application/json"
    assert "x-extra" not in r.headers

    r = env.request("GET", "/r", {"x-api-key": "ak_ov2"})
    assert (r.status, r.body) == (401, b'{"gone":true}'), describe(r)
    assert r.headers.get("content-type") == "application/json"

    # strip_credential false keeps the header and the query parameter; renamed/disabled identity headers
    r = env.request("GET", "/r?a=1", [("x-api-key", "ak_ov"), ("x-kid", "spoof"), ("x-kid", "spoof2")])
    seen = upstream_seen(r, "allowed")
    assert header_values(seen, "x-api-key") == ["ak_ov"]
    assert header_values(seen, "x-kid") == ["kid-1"], seen["header_list"]
    assert header_values(seen, "x-api-key-id") == []
    assert header_values(seen, "x-api-key-owner") == [], "owner_header null must turn the owner header off"
    assert "own-1" not in json.dumps(seen["headers"])
    assert seen["path"] == "/r?a=1"
    seen = upstream_seen(env.request("GET", "/q?api_key=ak_ov&b=2"), "query allowed")
    assert seen["path"] == "/q?api_key=ak_ov&b=2"
    assert header_values(seen, "x-kid") == ["kid-1"]


def test_fail_open_without_list(envoy_factory, keyservice, echo):
    keyservice.set_document(doc([key("k1", "ak_fo")]))
    keyservice.status = 503
    cfg = plugin_config(refresh_s=1, key_list={"fail_open": True},
                        credentials=[{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"},
                                     {"query": "api_key"}])
    env = start_envoy(envoy_factory, cfg, keyservice.port, echo.port)
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="failed"}') >= 1, 4.0, 0.05, "a failed fetch")
    cases = [
        ("/r", [("x-api-key", "ak_fo"), ("x-api-key-id", "spoof"), ("x-api-key-owner", "spoof")]),
        ("/r", [("authorization", "Bearer ak_fo")]),
        ("/r", [("x-api-key", "ak_unknown")]),
        ("/r", []),
        ("/q?a=1&api_key=ak_fo", []),
    ]
    for path, hdrs in cases:
        seen = upstream_seen(env.request("GET", path, hdrs), f"fail_open {path} {hdrs}")
        assert header_values(seen, "x-api-key-id") == [] and header_values(seen, "x-api-key-owner") == [], seen["header_list"]
        assert header_values(seen, "x-api-key") == [] and header_values(seen, "authorization") == [], (
            f"fail_open must not pass the credential upstream: {seen['header_list']}")
        assert "ak_fo" not in seen["path"], seen["path"]
    assert env.stat('keygate_requests_total{decision="fail_open"}') == len(cases)
    assert env.stat('keygate_requests_total{decision="unavailable"}') == 0
    # once a list is loaded, the filter is strict again
    keyservice.reset()
    # (ak_fo already passes while failing open, so wait for a refusal instead)
    wait_until(lambda: code(env.request("GET", "/r", {"x-api-key": "ak_unknown"})) == "invalid_key", 3.0, 0.05,
               "list loaded (unknown key refused)")
    seen = upstream_seen(env.request("GET", "/r", {"x-api-key": "ak_fo"}), "after load")
    assert header_values(seen, "x-api-key-id") == ["k1"], seen["header_list"]
    assert_refused(env.request("GET", "/r"), "missing_key", "after load")
    assert_no_key_material(env, ["ak_fo", "ak_unknown"])


def test_refresh_fetch_once_per_instance_etag_and_revocation(envoy_factory, keyservice, echo):
    refresh_s, timeout_ms = 1, 500
    budget = refresh_s + timeout_ms / 1000 + 0.75  # SPEC §5 + slack for the 250 ms tick and the batch
    k1 = key("k1", "ak_one", "o1")
    k2 = key("k2", "ak_two", "o1")
    keyservice.set_document(doc([k1, k2], "r1"))
    cfg = plugin_config(refresh_s=refresh_s, timeout_ms=timeout_ms,
                        key_list={"authority": "keys.internal",
                                  "headers": {"authorization": "Bearer svc-token", "x-tenant": "t1"}})
    env = start_envoy(envoy_factory, cfg, keyservice.port, echo.port)  # concurrency 2
    wait_loaded(env, "ak_one")

    # --- one fetch per refresh per instance, with If-None-Match; 304 keeps the list ---
    etag = keyservice.current_etag
    st0 = env.stats()
    keyservice.clear_requests()
    t0 = time.monotonic()
    time.sleep(4.2)
    reqs = keyservice.requests
    elapsed = time.monotonic() - t0
    expected = elapsed / refresh_s
    assert len(reqs) <= expected + 2, (
        f"{len(reqs)} key-service requests in {elapsed:.1f}s with refresh_s={refresh_s} "
        f"(expected about {expected:.0f}; once per refresh per Envoy instance, not per worker)")
    assert len(reqs) >= expected - 2, f"only {len(reqs)} fetches in {elapsed:.1f}s"
    for rq in reqs:
        assert rq.method == "GET" and rq.path == "/v1/keys", rq
        assert rq.headers.get("host") == "keys.internal", rq.headers
        assert rq.headers.get("authorization") == "Bearer svc-token", rq.headers
        assert rq.headers.get("x-tenant") == "t1", rq.headers
        assert rq.headers.get("if-none-match") == etag, rq.headers
    st1 = env.stats()
    assert st1['keygate_list_fetches_total{result="not_modified"}'] - st0['keygate_list_fetches_total{result="not_modified"}'] >= len(reqs) - 1
    assert st1['keygate_list_fetches_total{result="ok"}'] == st0['keygate_list_fetches_total{result="ok"}']
    assert st1["keygate_keys_loaded"] == 2
    assert batch_classes(env, "ak_one") == ["allowed"] * 20
    assert batch_classes(env, "ak_two", 10) == ["allowed"] * 10

    # --- revocation: refused on every request (both workers) within refresh_s + timeout_ms ---
    keyservice.set_document(doc([dict(k1, status="revoked"), k2], "r2"))
    t_change = time.monotonic()
    wait_until(lambda: batch_classes(env, "ak_one") == ["expired_key"] * 20, budget + 1.0, 0.1,
               "revoked key refused on every request")
    took = time.monotonic() - t_change
    assert took <= budget, f"revocation took {took:.2f}s > refresh_s + timeout_ms + slack = {budget:.2f}s"
    for _ in range(3):
        assert batch_classes(env, "ak_one") == ["expired_key"] * 20
    assert batch_classes(env, "ak_two", 10) == ["allowed"] * 10
    new_req = [rq for rq in keyservice.requests if rq.headers.get("if-none-match") == etag]
    assert new_req, "the changed list was fetched with the old ETag"

    # --- a new key becomes valid, a removed key invalid, likewise ---
    keyservice.set_document(doc([dict(k1, status="revoked"), key("k3", "ak_three", "o3")], "r3"))
    t_change = time.monotonic()
    wait_until(lambda: batch_classes(env, "ak_three") == ["allowed"] * 20, budget + 1.0, 0.1,
               "new key allowed on every request")
    took = time.monotonic() - t_change
    assert took <= budget, f"new key took {took:.2f}s > {budget:.2f}s"
    assert batch_classes(env, "ak_two") == ["invalid_key"] * 20
    assert env.stat("keygate_keys_loaded") == 2
    assert env.stat('keygate_list_fetches_total{result="ok"}') >= 3
    assert_no_key_material(env, ["ak_one", "ak_two", "ak_three"])


BAD_DOCS = []  # (name, makes the bad body from the good document + one new key, metric that grows)


def _bad(name, metric='keygate_list_fetches_total{result="rejected"}'):
    def deco(fn):
        BAD_DOCS.append((name, fn, metric))
        return fn
    return deco


NEW = key("k_new", "ak_new", "o1", plan="free")


@_bad("bad JSON")
def _bad_json(good):
    return json.dumps(doc(good["keys"] + [NEW], plans=good["plans"]))[:-3].encode()


@_bad("missing field (hash)")
def _missing(good):
    broken = {k: v for k, v in key("k_x", "ak_x", "o1").items() if k != "hash"}
    return json.dumps(doc(good["keys"] + [NEW, broken], plans=good["plans"])).encode()


@_bad("missing field (owner)")
def _missing_owner(good):
    broken = {k: v for k, v in key("k_x", "ak_x", "o1").items() if k != "owner"}
    return json.dumps(doc(good["keys"] + [NEW, broken], plans=good["plans"])).encode()


@_bad("missing keys")
def _missing_keys(good):
    return json.dumps({"version": "nokeys", "plans": good["plans"]}).encode()


@_bad("duplicate id")
def _dup_id(good):
    return json.dumps(doc(good["keys"] + [NEW, key("k_new", "ak_other", "o1")], plans=good["plans"])).encode()


@_bad("duplicate hash")
def _dup_hash(good):
    return json.dumps(doc(good["keys"] + [NEW, key("k_other", "ak_new", "o1")], plans=good["plans"])).encode()


@_bad("duplicate hash (case differs)")
def _dup_hash_case(good):
    other = dict(key("k_other", "ak_new", "o1"), hash=sha256_hex("ak_new").upper())
    return json.dumps(doc(good["keys"] + [NEW, other], plans=good["plans"])).encode()


@_bad("bad CIDR")
def _bad_cidr(good):
    return json.dumps(doc(good["keys"] + [dict(NEW, allowed_ips=["10.0.0.0/33"])], plans=good["plans"])).encode()


@_bad("bad hash")
def _bad_hash(good):
    return json.dumps(doc(good["keys"] + [NEW, dict(key("k_x", "ak_x", "o1"), hash="zz" * 32)],
                          plans=good["plans"])).encode()


@_bad("short hash")
def _short_hash(good):
    return json.dumps(doc(good["keys"] + [NEW, dict(key("k_x", "ak_x", "o1"), hash=sha256_hex("ak_x")[:63])],
                          plans=good["plans"])).encode()


@_bad("unknown plan")
def _unknown_plan(good):
    return json.dumps(doc(good["keys"] + [NEW, dict(key("k_x", "ak_x", "o1"), plan="gold")], plans=good["plans"])).encode()


@_bad("over max_bytes", metric=None)
def _too_big(good):
    body = json.dumps(doc(good["keys"] + [NEW], plans=good["plans"], padding="p" * 5000)).encode()
    assert len(body) > 4096
    return body


@_bad("non-200 status", metric='keygate_list_fetches_total{result="failed"}')
def _status_500(good):
    return 500


def test_bad_lists_rejected_whole_last_good_stays(envoy_factory, keyservice, echo):
    good = doc([key("k_old", "ak_old", "o1", plan="free")], "good-1", plans={"free": {"rate_limits": []}})
    keyservice.set_document(good)
    env = start_envoy(envoy_factory, plugin_config(refresh_s=1, timeout_ms=500, key_list={"max_bytes": 4096}),
                        keyservice.port, echo.port)
    wait_loaded(env, "ak_old")
    problems = []
    for name, make, metric in BAD_DOCS:
        bad = make(good)
        st0 = env.stats()
        if isinstance(bad, int):
            keyservice.status = bad
        else:
            keyservice.body_override = bad
        n = keyservice.count
        # a fetch that started after the switch, and its outcome counted
        keyservice.wait_for_requests(n + 1, timeout=4.0)
        wait_until(lambda: fetch_total(env) >= n + 1, 3.0, 0.05, f"{name}: fetch outcome counted")
        st1 = env.stats()
        d = metric_deltas(st0, st1)
        grew = d.get('keygate_list_fetches_total{result="rejected"}', 0) + d.get('keygate_list_fetches_total{result="failed"}', 0)
        if metric is not None and d.get(metric, 0) < 1:
            problems.append(f"{name}: {metric} did not grow (deltas {d})")
        elif grew < 1:
            problems.append(f"{name}: neither fetch_rejected nor fetch_failed grew (deltas {d})")
        if d.get('keygate_list_fetches_total{result="ok"}', 0):
            problems.append(f"{name}: counted as fetch_ok (deltas {d})")
        old = batch_classes(env, "ak_old", 10)
        if old != ["allowed"] * 10:
            problems.append(f"{name}: the last good list did not stay: ak_old -> {old}")
        new = batch_classes(env, "ak_new", 4)
        if new != ["invalid_key"] * 4:
            problems.append(f"{name}: the bad document was applied in part: ak_new -> {new}")
        if st1.get("keygate_keys_loaded") != 1:
            problems.append(f"{name}: keygate_keys_loaded = {st1.get('keygate_keys_loaded')}")
        keyservice.reset()
    assert not problems, "\n".join(problems)
    # and a good list is still taken afterwards
    keyservice.set_document(doc(good["keys"] + [NEW], "good-2", plans=good["plans"]))
    wait_loaded(env, "ak_new", timeout=3.0)
    assert batch_classes(env, "ak_old", 10) == ["allowed"] * 10
    # rejection log lines name keys by id, never by value or hash (SPEC §6)
    assert_no_key_material(env, ["ak_old", "ak_new", "ak_other"])


def test_keyservice_slow_then_down_last_list_stays(envoy_factory, keyservice, echo):
    keyservice.set_document(doc([key("k1", "ak_stay")]))
    env = start_envoy(envoy_factory, plugin_config(refresh_s=1, timeout_ms=300), keyservice.port, echo.port)
    wait_loaded(env, "ak_stay")
    last_ok = time.monotonic()
    unavailable0 = env.stat('keygate_requests_total{decision="unavailable"}')  # (503s while waiting for the first list)
    # slow: every answer takes longer than timeout_ms
    keyservice.delay = 1.5
    f0 = env.stat('keygate_list_fetches_total{result="failed"}')
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="failed"}') >= f0 + 2, 6.0, 0.1, "two timed-out fetches")
    assert batch_classes(env, "ak_stay") == ["allowed"] * 20
    assert_refused(env.request("GET", "/r", {"x-api-key": "ak_other"}), "invalid_key", "slow")
    # down: the key service is stopped (connection refused)
    keyservice.stop()
    f1 = env.stat('keygate_list_fetches_total{result="failed"}')
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="failed"}') >= f1 + 2, 6.0, 0.1, "two failed fetches while down")
    assert time.monotonic() - last_ok > 3.0
    assert batch_classes(env, "ak_stay") == ["allowed"] * 20
    assert env.stat("keygate_keys_loaded") == 1
    assert env.stat('keygate_requests_total{decision="unavailable"}') == unavailable0


def test_max_stale_makes_requests_unavailable_and_304_refreshes(envoy_factory, keyservice, echo):
    max_stale = 2
    keyservice.set_document(doc([key("k1", "ak_stale")]))
    env = start_envoy(envoy_factory, plugin_config(refresh_s=1, timeout_ms=300, key_list={"max_stale_s": max_stale}),
                        keyservice.port, echo.port)
    wait_loaded(env, "ak_stale")
    keyservice.wait_for_requests(2, timeout=3.0)  # at least one 304 already (a 304 counts as success)
    keyservice.status = 500
    n = keyservice.count
    last_ok_wall = keyservice.requests[n - 1].time  # the last request answered normally
    ok_until = last_ok_wall + max_stale - 0.2
    early = []
    while time.time() < ok_until:
        r = env.request("GET", "/r", {"x-api-key": "ak_stale"})
        if r.status != 200 and time.time() < ok_until:
            early.append(f"{time.time() - last_ok_wall:.2f}s: {describe(r)}")
        time.sleep(0.1)
    assert not early, f"refused before max_stale_s={max_stale}: {early[:3]}"
    r = wait_until(lambda: (lambda r: r.status == 503 and r)(env.request("GET", "/r", {"x-api-key": "ak_stale"})),
                   max_stale + 2.5, 0.05, "stale list -> unavailable")
    age = time.time() - last_ok_wall
    assert r.body == DEFAULT_BODIES["unavailable"], describe(r)
    assert age <= max_stale + 1.6, f"unavailable only {age:.2f}s after the last successful fetch (max_stale_s={max_stale})"
    assert_refused(env.request("GET", "/r"), "unavailable", "stale, no key")
    # the service answers again, with 304 (same ETag): that is a successful fetch
    nm0 = env.stat('keygate_list_fetches_total{result="not_modified"}')
    keyservice.reset()
    wait_loaded(env, "ak_stale", timeout=3.0)
    assert env.stat('keygate_list_fetches_total{result="not_modified"}') > nm0
    assert env.stat('keygate_list_fetches_total{result="ok"}') == 1


# =================================================================================================
# Configuration errors: Envoy refuses to start and the log names the field
# =================================================================================================
BASE = {"key_list": {"cluster": "keyservice", "path": "/v1/keys"}}
CONFIG_ERRORS = [
    ("unknown top-level field", {**BASE, "frobnicate": 1}, ["frobnicate"]),
    ("missing key_list.cluster", {"key_list": {"path": "/v1/keys"}}, ["key_list", "cluster"]),
    ("bad refresh_s type", {"key_list": {**BASE["key_list"], "refresh_s": "30"}}, ["key_list.refresh_s", '"30"']),
    ("bad CIDR in ip_allow", {**BASE, "ip_allow": ["10.0.0.0/8", "10.1.2.300/24"]}, ["ip_allow", "10.1.2.300/24"]),
    ("unknown errors class", {**BASE, "errors": {"teapot": {"status": 418}}}, ["errors", "teapot"]),
    ("bad rate_limit.headers", {**BASE, "rate_limit": {"headers": "fancy"}}, ["rate_limit.headers", "fancy"]),
    ("invalid JSON", '{"key_list": {"cluster": "keyservice", "path": "/v1/keys"', []),
]


def test_config_errors_refuse_start_and_name_the_field():
    def run(case):
        name, cfg, needles = case
        log = expect_config_failure(cfg, timeout=20.0)
        lines = [ln for ln in log.splitlines() if "wasm log" in ln and "keygate" in ln]
        text = "\n".join(lines)
        missing = [n for n in needles if n not in text]
        if not lines:
            return f"{name}: no keygate log line explaining the failure; log tail:\n" + "\n".join(log.splitlines()[-8:])
        if missing:
            return f"{name}: keygate's log does not name {missing}: {text[:400]}"
        if name == "invalid JSON" and not re.search(r"(?i)json|EOF|expected|line \d", text):
            return f"{name}: log does not say the JSON is invalid: {text[:400]}"
        return None

    # two at a time: each is an Envoy start (~1.5 s)
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, CONFIG_ERRORS))
    problems = [p for p in results if p]
    assert not problems, "\n".join(problems)
