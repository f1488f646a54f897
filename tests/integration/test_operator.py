"""The operator's side in a real Envoy: shadow mode (`shadow`), tagged Prometheus metrics
(envoy/prometheus/stats_tags.yaml, which the harness's bootstrap includes), the list-age gauge,
the version log lines, and decisions in Envoy's access log (`access_log`)."""
from __future__ import annotations

import re
import time

import pytest

import harness
from util import header_values, upstream_seen
from util_rl import BODY, key, kh, plugin_config, start_stack

# The access-log format docs/metrics.md documents.
LOG_FORMAT = ('[%START_TIME%] "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%" %RESPONSE_CODE% '
              '%RESPONSE_CODE_DETAILS% keygate=%FILTER_STATE(wasm.keygate_decision:PLAIN)% '
              'key_id=%FILTER_STATE(wasm.keygate_decision_key_id:PLAIN)%\n')

DOC = {"version": "ops-1", "keys": [
    key("key_a", "kg_secret_a", "org-1", scopes=["items:read"], rate_limits=[{"limit": 2, "window_s": 3600}]),
    key("key_old", "kg_secret_old", "org-1", status="revoked"),
]}
ROUTES = [{"path_prefix": "/v1/admin", "scope": "admin"}]


def file_log_hook(path):
    def hook(boot: dict) -> None:
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = [{
            "name": "envoy.access_loggers.file",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                "path": str(path),
                "log_format": {"text_format_source": {"inline_string": LOG_FORMAT}},
            },
        }]
    return hook


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    log = tmp_path_factory.mktemp("accesslog") / "access.log"
    cfg = plugin_config(routes=ROUTES, ip_allow=["10.0.0.0/8"],
                        shadow={"ip": True, "scopes": True, "rate_limits": True}, access_log=True)
    st = start_stack(cfg, DOC, envoy_kw={"bootstrap_hook": file_log_hook(log)})
    st.access_log = log
    yield st
    failures = st.stop()
    assert not failures, failures


def stat(env, name: str) -> float:
    return env.stats().get(name, 0.0)


def test_shadowed_checks_let_the_request_through_with_identity(stack):
    env = stack.env
    before = env.stats()
    # ip_allow does not hold 127.0.0.1 (ip_denied, shadowed) and /v1/admin needs a scope the key lacks.
    seen = upstream_seen(stack.get("/v1/admin", kh("kg_secret_a")), "scope shadowed")
    assert header_values(seen, "x-api-key-id") == ["key_a"]
    assert header_values(seen, "x-api-key") == []
    after = env.stats()
    k = 'keygate_shadow_refusals_total{decision="ip_denied"}'
    assert after.get(k, 0) - before.get(k, 0) == 1, after
    a = 'keygate_requests_total{decision="allowed"}'
    assert after.get(a, 0) == before.get(a, 0), "a shadowed request is counted once, as shadow"
    env.wait_for_log(r"keygate: shadow: would refuse ip_denied \(key key_a\), letting it through")


def test_shadowed_rate_limits_keep_the_headers(stack):
    rs = [stack.get("/v1/items", kh("kg_secret_a")) for _ in range(3)]
    assert [r.status for r in rs] == [200, 200, 200], rs
    assert rs[-1].headers.get("x-ratelimit-remaining") == "0"
    assert "retry-after" not in rs[-1].headers


def test_unshadowed_key_checks_still_refuse(stack):
    r = stack.get("/v1/items", kh("kg_wrong"))
    assert r.status == 401 and r.body == BODY["invalid_key"]
    r = stack.get("/v1/items")
    assert r.status == 401 and r.body == BODY["missing_key"]


def test_prometheus_shows_tagged_counters_and_list_gauges(stack):
    status, text = stack.env.admin("/stats/prometheus")
    assert status == 200
    assert re.search(r'^# TYPE keygate_requests_total counter$', text, re.M), text
    assert re.search(r'^keygate_requests_total\{decision="invalid_key"\} [1-9]', text, re.M)
    assert re.search(r'^keygate_shadow_refusals_total\{decision="ip_denied"\} [1-9]', text, re.M)
    assert re.search(r'^keygate_list_fetches_total\{result="ok"\} [1-9]', text, re.M)
    assert re.search(r'^keygate_keys_loaded\{?\}? 2$', text, re.M)
    # The list is fetched every second (200, then 304s): its age stays small.
    harness.wait_until(lambda: re.search(r'^keygate_list_age_seconds\{?\}? [0-3]$',
                                         stack.env.admin("/stats/prometheus")[1], re.M),
                       5.0, 0.2, "keygate_list_age_seconds")
    assert not re.search(r"^keygate_\w*(decision|result)_", text, re.M), "untagged names left"


def test_version_lines_in_the_log(stack):
    log = stack.env.log()
    assert re.search(r"keygate: filter \d+\.\d+\.\d+ configured \(shadow: ip,scopes,rate_limits, access_log: true\)", log)
    assert re.search(r"keygate: key list ops-1 published: 2 keys in \d+ buckets \(filter \d+\.\d+\.\d+\)", log)


def test_decisions_in_the_access_log(stack):
    stack.get("/v1/items/al", kh("kg_secret_old"))  # expired_key
    stack.get("/v1/items/al-missing")  # missing_key
    stack.get("/v1/admin/al", kh("kg_secret_a"))  # shadow (ip_denied first)

    def lines():
        try:
            text = stack.access_log.read_text()
        except FileNotFoundError:
            return None
        return text if "al-missing" in text and "/v1/admin/al" in text and '/v1/items/al"' in text else None

    text = harness.wait_until(lines, 10.0, 0.2, "access log lines")
    got = {m.group(1): m.group(2) for m in re.finditer(r'"GET (\S+)" (.*)', text)}
    assert re.fullmatch(r"401  keygate=expired_key key_id=key_old", got["/v1/items/al"]), got
    assert re.fullmatch(r"401  keygate=missing_key key_id=-", got["/v1/items/al-missing"]), got
    assert re.fullmatch(r"200 via_upstream keygate=shadow:ip_denied key_id=key_a", got["/v1/admin/al"]), got
    assert "kg_secret" not in text


def test_global_shadow_passes_key_refusals_without_identity(envoy_factory):
    cfg = plugin_config(shadow=True)
    st = start_stack(cfg, DOC)
    try:
        harness.wait_until(lambda: st.env.stats().get("keygate_keys_loaded") == 2, 10.0, 0.1, "list loaded")
        time.sleep(0.5)
        before = st.env.stats()
        for headers, cls in ((None, "missing_key"), (kh("kg_wrong"), "invalid_key"),
                             (kh("kg_secret_old"), "expired_key")):
            seen = upstream_seen(st.get("/v1/items", [("x-api-key-id", "spoof")] + list((headers or {}).items())), cls)
            assert header_values(seen, "x-api-key-id") == [], seen["header_list"]
        after = st.env.stats()
        for cls in ("missing_key", "invalid_key", "expired_key"):
            k = f'keygate_shadow_refusals_total{{decision="{cls}"}}'
            assert after.get(k, 0) - before.get(k, 0) == 1, (cls, after)
        seen = upstream_seen(st.get("/v1/items", kh("kg_secret_a")))
        assert header_values(seen, "x-api-key-id") == ["key_a"]
    finally:
        assert not st.stop()


def test_bad_shadow_value_is_refused():
    log = harness.expect_envoy_config_failure(plugin_config(shadow={"ips": True}))
    assert "shadow" in log and "ips" in log
