"""Hostile and odd input from the field (issue 12) in real Envoy (--concurrency 2), one test per
kind: path parameters, ambiguous credentials, `+` in a query key, duplicate JSON members,
trailing data, unknown members, upstream rate-limit headers, WWW-Authenticate; and no secret
leaks with the wasm component logging at trace level (SPEC §2, §3, §4, §5, §6)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import wait_until
from keyservice import sha256_hex
from util import (
    assert_refused,
    code,
    doc,
    expect_config_failure,
    header_values,
    key,
    plugin_config,
    start_envoy,
    upstream_seen,
    wait_loaded,
)

GOOD = "ak_hostile_good"
ADMIN = "ak_hostile_admin"


def gateway(envoy_factory, keyservice, echo, document=None, **cfg):
    keyservice.set_document(document if document is not None else doc([
        key("k-good", GOOD, scopes=["read"]),
        key("k-admin", ADMIN, scopes=["admin"]),
    ]))
    env = start_envoy(envoy_factory, plugin_config(**cfg), keyservice.port, echo.port)
    return env


# ---- 1. path parameters -------------------------------------------------------------------------
def test_path_parameters_cannot_reach_a_rule_by_way_of_an_exempt_prefix(envoy_factory, keyservice, echo):
    env = gateway(envoy_factory, keyservice, echo, exempt=[{"path_prefix": "/public"}],
                  routes=[{"path_prefix": "/admin", "scope": "admin"}])
    wait_loaded(env, GOOD)
    echo.clear()
    for p in ["/public/..;/admin/users", "/public/..;x=1/admin/users", "/public;a/..;/admin",
              "/public/.;/..;/admin/users"]:
        assert_refused(env.request("GET", p), "missing_key", p)
        r = env.request("GET", p, {"x-api-key": GOOD})
        assert r.status == 403 and code(r) == "forbidden", f"{p}: {r}"
        assert upstream_seen(env.request("GET", p, {"x-api-key": ADMIN}), p)["path"] == p
    assert not [d for d in echo.requests if "x-api-key-id" not in d["headers"]], "a refused request reached the upstream"
    assert env.request("GET", "/public;jsessionid=1/doc").status == 200


# ---- 2. ambiguous credentials -------------------------------------------------------------------
def test_a_credential_given_twice_is_an_invalid_key_in_any_order(envoy_factory, keyservice, echo):
    env = gateway(envoy_factory, keyservice, echo,
                  credentials=[{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"},
                               {"query": "api_key"}])
    wait_loaded(env, GOOD)
    cases = [
        ([("x-api-key", GOOD), ("x-api-key", "bogus")], "/r"),
        ([("x-api-key", "bogus"), ("x-api-key", GOOD)], "/r"),
        ([("x-api-key", GOOD), ("x-api-key", GOOD)], "/r"),
        ([("x-api-key", f"{GOOD}, bogus")], "/r"),
        ([("authorization", f"Bearer {GOOD}"), ("authorization", "Bearer bogus")], "/r"),
        ([], f"/r?api_key={GOOD}&api_key=bogus"),
        ([], f"/r?api_key=bogus&api_key={GOOD}"),
    ]
    for headers, path in cases:
        r = env.request("GET", path, headers)
        assert_refused(r, "invalid_key", f"{headers} {path}")
    assert env.request("GET", "/r", {"x-api-key": GOOD}).status == 200


# ---- 3. `+` in a query credential ---------------------------------------------------------------
def test_plus_in_a_query_key_stays_a_plus(envoy_factory, keyservice, echo):
    plus = "ak_x+y/z="
    env = gateway(envoy_factory, keyservice, echo, document=doc([key("k-plus", plus), key("k-good", GOOD)]),
                  credentials=[{"query": "api_key"}])
    wait_until(lambda: env.request("GET", "/r?api_key=ak_x%2By%2Fz%3D").status == 200, 5, 0.05, "list loaded")
    d = upstream_seen(env.request("GET", "/r?a=1&api_key=ak_x+y/z=&b=c+d"), "raw +")
    assert d["headers"].get("x-api-key-id") == "k-plus"
    assert d["path"] == "/r?a=1&b=c+d", d["path"]
    assert_refused(env.request("GET", "/r?api_key=ak_x%20y/z="), "invalid_key", "%20 is a space, not +")


# ---- 4-6. the key list's JSON rules -------------------------------------------------------------
def bad_lists() -> list[tuple[str, str]]:
    k = json.dumps(key("k-d", GOOD, owner="org-d"))
    return [
        ("owner named twice, disabled first", '{"owners":{"org-d":{"status":"disabled"},"org-d":{}},"keys":[%s]}' % k),
        ("owner named twice, disabled last", '{"owners":{"org-d":{},"org-d":{"status":"disabled"}},"keys":[%s]}' % k),
        ("key member twice", '{"keys":[%s]}' % k.replace('"owner"', '"status": "revoked", "status": "active", "owner"')),
        ("trailing data", '{"keys":[%s]} garbage' % k),
        ("second document", '{"keys":[%s]}{"keys":[]}' % k),
        ("misspelt restriction", '{"keys":[%s]}' % k.replace('"owner"', '"alowed_ips": ["10.0.0.0/8"], "owner"')),
        ("unknown top-level member", '{"keys":[%s],"key":[]}' % k),
    ]


def test_a_list_breaking_the_json_rules_is_rejected_and_the_last_good_one_stays(envoy_factory, keyservice, echo):
    env = gateway(envoy_factory, keyservice, echo, document=doc([key("k-good", GOOD)]))
    wait_loaded(env, GOOD)
    for name, text in bad_lists():
        before = env.stat('keygate_list_fetches_total{result="rejected"}')
        keyservice.set_document(text)
        wait_until(lambda: env.stat('keygate_list_fetches_total{result="rejected"}') > before, 10, 0.1, f"{name}: rejected")
        assert env.request("GET", "/r", {"x-api-key": GOOD}).status == 200, f"{name}: last good list lost"
    # With metadata and a BOM, the same list loads.
    ok = "\ufeff" + json.dumps({"meta": {"by": "ops"}, "owners": {"org-d": {"rate_limits": [{"limit": 9, "window_s": 60}]}},
                                 "keys": [key("k-d", GOOD, owner="org-d", name="n", meta={"t": 1}, created_at="2026-01-01T00:00:00Z")]})
    keyservice.set_document(ok.encode())
    wait_until(lambda: upstream_seen(env.request("GET", "/r", {"x-api-key": GOOD})).get("headers", {}).get("x-api-key-id") == "k-d",
               10, 0.1, "list with metadata and BOM loaded")
    assert not env.wasm_failures()


def test_a_configuration_breaking_the_json_rules_is_refused_naming_the_field():
    base = '"key_list":{"cluster":"keyservice","path":"/v1/keys"}'
    for cfg, needle in [
        ("{%s} x" % base, "trailing characters"),
        ('{%s,"exempt":[],"exempt":[]}' % base, "duplicate field `exempt`"),
        ('{"key_list":{"cluster":"keyservice","path":"/v1/keys","headers":{"a":"1","a":"2"}}}', "key_list.headers"),
        ('{%s,"ip_alow":[]}' % base, "ip_alow"),
    ]:
        log = expect_config_failure(cfg, timeout=20.0)
        lines = "\n".join(ln for ln in log.splitlines() if "keygate" in ln and "configuration rejected" in ln)
        assert needle in lines, f"{cfg}: {lines or log[-800:]}"


# ---- 7. upstream rate-limit headers are replaced ------------------------------------------------
class _RateLimitedUpstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):  # noqa: N802 - stdlib naming
        body = b"{}"
        self.send_response(200)
        for name in ["X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset", "RateLimit-Policy", "RateLimit"]:
            self.send_header(name, "upstream-1")
            self.send_header(name.lower(), "upstream-2")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_rate_limit_headers_replace_the_upstreams(envoy_factory, keyservice):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RateLimitedUpstream)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    try:
        keyservice.set_document(doc([key("k-good", GOOD)]))
        env = start_envoy(envoy_factory, plugin_config(rate_limit={"default": [{"limit": 50, "window_s": 60}], "headers": "both"}),
                          keyservice.port, server.server_address[1])
        wait_until(lambda: env.request("GET", "/r", {"x-api-key": GOOD}).status == 200, 5, 0.05, "list loaded")
        r = env.request("GET", "/r", {"x-api-key": GOOD})
        for name in ["x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "ratelimit-policy", "ratelimit"]:
            values = [v for k, v in r.header_list if k == name]
            assert len(values) == 1 and "upstream" not in values[0], f"{name}: {values}"
        assert dict(r.header_list)["x-ratelimit-limit"] == "50"
        # Without a key limit, nothing is set and the upstream's pass through untouched.
    finally:
        server.shutdown()
        server.server_close()


# ---- 8. WWW-Authenticate ------------------------------------------------------------------------
def test_unauthorized_answers_carry_a_challenge_unless_overridden(envoy_factory, keyservice, echo):
    keyservice.set_document(doc([key("k-good", GOOD), key("k-old", "ak_hostile_old", status="revoked")]))
    env = start_envoy(envoy_factory, plugin_config(
        credentials=[{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}, {"query": "api_key"}],
        errors={"expired_key": {"headers": {"WWW-Authenticate": 'Custom realm="x"'}}}), keyservice.port, echo.port)
    wait_loaded(env, GOOD)
    r = env.request("GET", "/r")
    assert r.status == 401 and r.headers["www-authenticate"] == (
        'ApiKey realm="keygate", header="x-api-key", Bearer realm="keygate", ApiKey realm="keygate", query="api_key"')
    r = env.request("GET", "/r", {"x-api-key": "nope"})
    assert 'Bearer realm="keygate", error="invalid_token"' in r.headers["www-authenticate"]
    r = env.request("GET", "/r", {"x-api-key": "ak_hostile_old"})
    assert code(r) == "expired_key" and [v for k, v in r.header_list if k == "www-authenticate"] == ['Custom realm="x"']
    assert "www-authenticate" not in env.request("GET", "/r", {"x-api-key": GOOD}).headers


# ---- no secret leaks ----------------------------------------------------------------------------
def test_no_key_hash_or_authorization_value_leaks_at_trace_level(envoy_factory, keyservice, echo):
    keys = {name: f"ak_leak_{name}_{i:04d}" for i, name in enumerate(
        ["good", "revoked", "scoped", "site", "ip", "limited", "whoami"])}
    service_token = "Bearer svc-token-never-logged-7f3a"
    document = doc([
        key("k-good", keys["good"]),
        key("k-revoked", keys["revoked"], status="revoked"),
        key("k-scoped", keys["scoped"], scopes=["read"]),
        key("k-site", keys["site"], sites=["9"]),
        key("k-ip", keys["ip"], allowed_ips=["10.0.0.0/8"]),
        key("k-limited", keys["limited"], rate_limits=[{"limit": 1, "window_s": 3600}]),
        key("k-whoami", keys["whoami"]),
    ])
    keyservice.status = 500  # unavailable first, and a failed fetch
    cfg = plugin_config(
        key_list={"headers": {"authorization": service_token}},
        credentials=[{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}, {"query": "api_key"}],
        exempt=[{"path_prefix": "/public"}], routes=[{"path_prefix": "/admin", "scope": "admin"}],
        site={"path_segment": 1}, ip_deny=["127.0.0.9/32"], whoami={"path": "/whoami"})
    env = start_envoy(envoy_factory, cfg, keyservice.port, echo.port, log_level="info",
                      extra_args=["--component-log-level", "wasm:trace,http:info,router:info,connection:info"])
    assert code(env.request("GET", "/r", {"x-api-key": keys["good"]})) == "unavailable"
    keyservice.reset()
    keyservice.set_document(doc([key("k-x", "ak_leak_x")], version="v0"))
    wait_loaded(env, "ak_leak_x", timeout=20)
    keyservice.set_document('{"keys":[%s]} trailing' % json.dumps(key("k-y", keys["good"])))  # rejected list
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="rejected"}') >= 1, 10, 0.1, "rejected fetch")
    keyservice.set_document(document)
    wait_loaded(env, keys["good"], timeout=20)
    wait_until(lambda: env.stat('keygate_list_fetches_total{result="not_modified"}') >= 1, 10, 0.1, "a 304")
    echo.clear()
    auth = lambda k: {"authorization": f"Bearer {k}"}  # noqa: E731
    seen = [
        env.request("GET", "/9/r", {"x-api-key": keys["good"]}),
        env.request("GET", "/9/r", auth(keys["good"])),
        env.request("GET", f"/9/r?api_key={keys['good']}&x=1"),
        env.request("GET", "/public/x", {"x-api-key": keys["good"]}),
        env.request("GET", "/whoami", auth(keys["whoami"])),
        env.request("GET", "/r"),
        env.request("GET", "/r", auth(keys["revoked"])),
        env.request("GET", "/admin", auth(keys["scoped"])),
        env.request("GET", "/1/r", auth(keys["site"])),
        env.request("GET", "/r", auth(keys["ip"])),
        env.request("GET", "/r", auth(keys["limited"])),
        env.request("GET", "/r", auth(keys["limited"])),
        env.request("GET", "/r", auth(keys["good"]), source_ip="127.0.0.9"),
    ]
    for _ in range(5):
        seen.append(env.request("GET", "/r", auth("ak_leak_wrong_0000"), source_ip="127.0.0.7"))
        seen.append(env.request("GET", "/r", [("x-api-key", keys["good"]), ("x-api-key", keys["good"])], source_ip="127.0.0.6"))
    classes = {code(r) or ("whoami" if r.status == 200 and "key_id" in r.text else r.status) for r in seen}
    for c in ["missing_key", "invalid_key", "expired_key", "forbidden", "ip_denied", "rate_limited", "whoami", 200]:
        assert c in classes, f"{c} not exercised: {classes}"
    plaintexts = list(keys.values()) + ["ak_leak_wrong_0000", "ak_leak_x"]
    _, prom = env.admin("/stats/prometheus")
    _, stats = env.admin("/stats")
    upstream = json.dumps(echo.requests)
    for where, text in (("log", env.log()), ("/stats/prometheus", prom), ("/stats", stats), ("upstream", upstream)):
        for p in plaintexts:
            for needle in (p, sha256_hex(p), sha256_hex(p).upper(), f"Bearer {p}"):
                assert needle not in text, f"{needle[:14]}... found in {where}"
        assert "svc-token-never-logged" not in text or where == "upstream", f"service token in {where}"
    for d in echo.requests:
        assert not header_values(d, "authorization") and not header_values(d, "x-api-key"), d
    assert "wasm" in env.log()  # the trace-level component did log
