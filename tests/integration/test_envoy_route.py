"""`upstream.edits: "envoy_route"` (opt-in, Envoy only): keygate records the key's id and owner in
filter state and leaves the request headers alone; the route removes the credential and the
identity headers and adds the identity from the filter state. What reaches the upstream must be
what the default mode (the filter edits the headers) sends for the same requests."""
from __future__ import annotations

import pytest

import harness
from util import header_values, upstream_seen
from util_rl import BODY, key, kh, plugin_config, start_stack

# The route configuration the README documents for this mode.
ROUTE_EDITS = {
    "request_headers_to_remove": ["x-api-key-id", "x-api-key-owner", "x-api-key", "authorization"],
    "request_headers_to_add": [
        {"header": {"key": "x-api-key-id", "value": "%FILTER_STATE(wasm.keygate_key_id:PLAIN)%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-api-key-owner", "value": "%FILTER_STATE(wasm.keygate_owner:PLAIN)%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
    ],
}

DOC = {"version": "1", "keys": [key("key_a", "kg_secret_a", "org-a")]}


def route_hook(boot: dict) -> None:
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["route_config"]["virtual_hosts"][0]["routes"][0].update(ROUTE_EDITS)


@pytest.fixture(scope="module")
def stack():
    cfg = plugin_config(
        credentials=[{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}, {"query": "api_key"}],
        exempt=[{"path_prefix": "/public"}],
        upstream={"edits": "envoy_route"},
    )
    st = start_stack(cfg, DOC, envoy_kw={"bootstrap_hook": route_hook})
    yield st
    failures = st.stop()
    assert not failures, failures


SPOOF = [("x-api-key-id", "spoof-id"), ("X-Api-Key-Owner", "spoof-owner")]


def test_allowed_request_gets_the_identity_from_filter_state(stack):
    for creds in (kh("kg_secret_a"), {"authorization": "Bearer kg_secret_a"}):
        seen = upstream_seen(stack.get("/v1/items", SPOOF + list(creds.items())), repr(creds))
        assert header_values(seen, "x-api-key-id") == ["key_a"], seen["header_list"]
        assert header_values(seen, "x-api-key-owner") == ["org-a"], seen["header_list"]
        assert header_values(seen, "x-api-key") == [] and header_values(seen, "authorization") == []


def test_query_credential_is_still_taken_out_of_the_path_by_keygate(stack):
    seen = upstream_seen(stack.get("/v1/items?a=1&api_key=kg_secret_a&b=2"))
    assert seen["path"] == "/v1/items?a=1&b=2"
    assert header_values(seen, "x-api-key-id") == ["key_a"]


def test_exempt_request_gets_no_identity_and_spoofed_headers_are_removed(stack):
    seen = upstream_seen(stack.get("/public/x", SPOOF))
    names = [k for k, _ in seen["header_list"]]
    assert "x-api-key-id" not in names and "x-api-key-owner" not in names, seen["header_list"]


def test_refusals_are_unchanged(stack):
    r = stack.get("/v1/items", kh("kg_wrong"))
    assert r.status == 401 and r.body == BODY["invalid_key"]
    r = stack.get("/v1/items")
    assert r.status == 401 and r.body == BODY["missing_key"]


def test_default_mode_is_the_filter(envoy_factory):
    # Without `edits`, the filter itself edits the headers: no route configuration needed.
    st = start_stack(plugin_config(), DOC)
    try:
        seen = upstream_seen(st.get("/v1/items", SPOOF + [("x-api-key", "kg_secret_a")]))
        assert header_values(seen, "x-api-key-id") == ["key_a"]
        assert header_values(seen, "x-api-key-owner") == ["org-a"]
        assert header_values(seen, "x-api-key") == []
    finally:
        assert not st.stop()


def test_unknown_edits_value_is_refused():
    log = harness.expect_envoy_config_failure(plugin_config(upstream={"edits": "route"}))
    assert "upstream.edits" in log and '"route"' in log
