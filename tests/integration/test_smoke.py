"""Smoke tests of the test infrastructure itself: real Envoy (no wasm filter), the echo upstream
and the fake key service. They prove the harness before any keygate behaviour is tested."""
from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

import harness
from keyservice import KeyService, etag_of, sha256_hex


def _get(port: int, path: str, headers=None):
    return harness.http_request("127.0.0.1", port, "GET", path, headers)


# --- echo upstream ----------------------------------------------------------------------------
def test_echo_answers_any_method_with_json(echo):
    r = harness.http_request("127.0.0.1", echo.port, "PATCH", "/a/b?c=d", [("X-One", "1"), ("X-One", "2")], body="hi")
    assert r.status == 200
    doc = r.json()
    assert doc["method"] == "PATCH"
    assert doc["path"] == "/a/b?c=d"
    assert doc["headers"]["x-one"] == "1, 2"
    assert ["x-one", "1"] in doc["header_list"] and ["x-one", "2"] in doc["header_list"]
    assert doc["body"] == "hi"
    assert echo.requests[-1]["path"] == "/a/b?c=d"


# --- Envoy without the wasm filter -----------------------------------------------------------
def test_envoy_proxies_to_echo(envoy_factory, echo):
    t0 = time.monotonic()
    env = envoy_factory(None, None, echo.port, wasm=False)
    ready_s = time.monotonic() - t0
    assert ready_s < 20
    status, headers, body = env.request("POST", "/v1/things?x=1", headers={"X-Api-Key": "k"}, body=b'{"a":1}')
    assert status == 200, body
    assert headers["server"] == "envoy"
    doc = json.loads(body)
    assert doc["method"] == "POST"
    assert doc["path"] == "/v1/things?x=1"
    assert doc["headers"]["x-api-key"] == "k"
    assert doc["body"] == '{"a":1}'
    assert env.stat("envoy_cluster_upstream_rq_completed") >= 1
    assert env.keygate_stats() == {}
    assert "starting main dispatch loop" in env.log()


def test_source_ip_reaches_envoy(envoy_factory, echo):
    # use_remote_address makes Envoy append the connection's source address to x-forwarded-for
    env = envoy_factory(None, None, echo.port, wasm=False, hcm_extra={"use_remote_address": True})
    for ip in ("127.0.0.2", "127.0.0.3"):
        r = env.request("GET", "/", source_ip=ip)
        assert r.status == 200
        assert r.json()["headers"]["x-forwarded-for"] == ip


def test_request_many_spreads_over_connections(envoy_factory, echo):
    env = envoy_factory(None, None, echo.port, wasm=False, concurrency=2)
    results = env.request_many(40, "GET", "/many", headers={"x-n": "1"}, workers=8)
    assert [r.status for r in results] == [200] * 40
    assert env.stat("envoy_http_downstream_cx_total") >= 40


def test_upstream_down_gives_503(envoy_factory):
    env = envoy_factory(None, None, None, wasm=False)  # upstream on a closed port
    assert env.request("GET", "/").status == 503


def test_stop_is_idempotent_and_keeps_log(echo):
    env = harness.start_envoy(None, None, echo.port, wasm=False)
    assert env.running
    env.stop()
    env.stop()
    assert not env.running
    assert "starting main dispatch loop" in env.log()
    with pytest.raises(OSError):
        env.request("GET", "/", timeout=2)


def test_bad_bootstrap_is_reported():
    def break_route(boot):
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["cluster"] = "no_such_cluster"

    log = harness.expect_envoy_config_failure(None, wasm=False, bootstrap_hook=break_route, timeout=15)
    assert "no_such_cluster" in log
    with pytest.raises(harness.EnvoyStartError) as ei:
        harness.start_envoy(None, None, None, wasm=False, bootstrap_hook=break_route)
    assert "no_such_cluster" in str(ei.value)


def test_expect_config_failure_rejects_a_good_config():
    with pytest.raises(AssertionError, match="accepted"):
        harness.expect_envoy_config_failure(None, wasm=False, timeout=15)


def test_wait_until():
    t0 = time.monotonic()
    assert harness.wait_until(lambda: time.monotonic() - t0 > 0.2 and "done", timeout=5) == "done"
    with pytest.raises(AssertionError, match="never"):
        harness.wait_until(lambda: False, timeout=0.2, message="never")


def test_parse_prometheus():
    text = '# TYPE keygate_allowed counter\nkeygate_allowed{} 3\nkeygate_keys_loaded 2\nenvoy_x{a="b c"} 1.5\n'
    assert harness.parse_prometheus(text) == {"keygate_allowed": 3.0, "keygate_keys_loaded": 2.0, 'envoy_x{a="b c"}': 1.5}


# --- fake key service --------------------------------------------------------------------------
def test_keyservice_etag_and_304(keyservice: KeyService):
    doc = {"version": "v1", "keys": [{"id": "k1", "hash": sha256_hex("ak_1"), "owner": "o"}]}
    keyservice.set_document(doc)
    r = _get(keyservice.port, "/v1/keys", {"Authorization": "Bearer t"})
    assert r.status == 200
    assert r.json() == doc
    tag = r.headers["etag"]
    assert tag == etag_of(json.dumps(doc).encode()) == keyservice.current_etag
    assert tag.startswith('"') and tag.endswith('"')
    r2 = _get(keyservice.port, "/v1/keys", {"If-None-Match": tag})
    assert r2.status == 304 and r2.body == b""
    r3 = _get(keyservice.port, "/v1/keys", {"If-None-Match": '"other"'})
    assert r3.status == 200
    assert _get(keyservice.port, "/other").status == 404
    assert keyservice.count == 4
    assert keyservice.requests[0].headers["authorization"] == "Bearer t"
    assert keyservice.requests[1].headers["if-none-match"] == tag


def test_keyservice_switches(keyservice: KeyService):
    keyservice.status = 500
    assert _get(keyservice.port, "/v1/keys").status == 500
    keyservice.reset()
    keyservice.body_override = b"{not json"
    r = _get(keyservice.port, "/v1/keys")
    assert r.status == 200 and r.body == b"{not json" and r.headers["etag"] == etag_of(b"{not json")
    keyservice.reset()
    keyservice.etag = False
    r = _get(keyservice.port, "/v1/keys")
    assert "etag" not in r.headers
    keyservice.reset()
    keyservice.delay = 0.5
    t0 = time.monotonic()
    assert _get(keyservice.port, "/v1/keys").status == 200
    assert time.monotonic() - t0 >= 0.45
    keyservice.reset()
    keyservice.drop = True
    with pytest.raises((http.client.HTTPException, ConnectionError, socket.error)):
        _get(keyservice.port, "/v1/keys")
    keyservice.reset()
    big = b"x" * (3 * 1024 * 1024)
    keyservice.body_override = big
    assert len(_get(keyservice.port, "/v1/keys").body) == len(big)
    assert keyservice.wait_for_requests(6, timeout=1)


def test_keyservice_behind_envoy_keepalive(envoy_factory, keyservice: KeyService):
    """Envoy reuses upstream connections; the key service must serve several requests per
    connection, including 304s (no body, no content-length)."""
    keyservice.set_document({"version": "v", "keys": []})
    env = envoy_factory(None, keyservice.port, keyservice.port, wasm=False, concurrency=1)
    r = env.request("GET", "/v1/keys")
    assert r.status == 200
    tag = r.headers["etag"]
    for _ in range(5):
        assert env.request("GET", "/v1/keys", headers={"if-none-match": tag}).status == 304
    assert env.request("GET", "/v1/keys").status == 200
    assert keyservice.count == 7
    assert env.stat("envoy_cluster_upstream_cx_total") < 7  # connections were reused


def test_keyservice_stop_closes_keepalive_connections(envoy_factory):
    ks = KeyService().start()
    env = envoy_factory(None, ks.port, ks.port, wasm=False, concurrency=1)
    assert env.request("GET", "/v1/keys").status == 200
    ks.stop()
    assert env.request("GET", "/v1/keys").status == 503


def test_non_utf8_header_values_pass_through_envoy(envoy_factory, echo):
    """Clients can send header bytes that are not UTF-8 (SPEC §5: the filter must not panic on them)."""
    env = envoy_factory(None, None, echo.port, wasm=False)
    r = env.request("GET", "/", headers=[("x-api-key", b"ak_\xff\xfe"), ("x-api-key-id", "spoof")])
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-api-key"].encode("latin-1") == b"ak_\xff\xfe"
    assert seen["x-api-key-id"] == "spoof"
