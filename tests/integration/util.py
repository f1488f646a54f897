"""Small helpers shared by keygate's integration tests (plugin configs, key-list documents,
decision checks). Nothing here talks to Envoy except through harness.Envoy."""
from __future__ import annotations

import http.client
import json
import time
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import harness
from harness import Envoy, Response, wait_until
from keyservice import sha256_hex

# SPEC §4 default bodies, byte for byte.
DEFAULT_BODIES = {
    "missing_key": b'{"error":{"code":"missing_key","message":"API key is required"}}',
    "invalid_key": b'{"error":{"code":"invalid_key","message":"Invalid API key"}}',
    "expired_key": b'{"error":{"code":"expired_key","message":"API key expired or revoked"}}',
    "forbidden": b'{"error":{"code":"forbidden","message":"API key has no access to this resource"}}',
    "ip_denied": b'{"error":{"code":"ip_denied","message":"Client IP address not allowed"}}',
    "unavailable": b'{"error":{"code":"unavailable","message":"API key list not loaded"}}',
}
DEFAULT_STATUS = {"missing_key": 401, "invalid_key": 401, "expired_key": 401, "forbidden": 403,
                  "ip_denied": 403, "rate_limited": 429, "unavailable": 503}

# Prometheus names with the tags of envoy/prometheus/stats_tags.yaml (the harness's bootstrap).
DECISIONS = ["allowed", "exempt", "fail_open", "whoami", "missing_key", "invalid_key", "expired_key",
             "forbidden", "ip_denied", "rate_limited", "unavailable"]
DECISION_METRICS = [f'keygate_requests_total{{decision="{d}"}}' for d in DECISIONS]
SHADOW_METRICS = [f'keygate_shadow_refusals_total{{decision="{d}"}}' for d in DECISIONS[4:]]
FETCH_METRICS = [f'keygate_list_fetches_total{{result="{r}"}}' for r in ("ok", "not_modified", "failed", "rejected")]
ALL_METRICS = DECISION_METRICS + SHADOW_METRICS + FETCH_METRICS + ["keygate_keys_loaded", "keygate_list_age_seconds"]


def plugin_config(refresh_s: int = 1, timeout_ms: int = 1000, **top: Any) -> dict:
    """A plugin configuration with the `keyservice` cluster; `key_list` entries in
    top["key_list"] are merged over the defaults used here."""
    kl = {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": refresh_s, "timeout_ms": timeout_ms}
    kl.update(top.pop("key_list", {}))
    return {"key_list": kl, **top}


def key(kid: str, plaintext: str, owner: str = "org-a", **fields: Any) -> dict:
    return {"id": kid, "hash": sha256_hex(plaintext), "owner": owner, **fields}


def doc(keys: list[dict], version: str = "v1", **extra: Any) -> dict:
    return {"version": version, **extra, "keys": keys}


def code(r: Response) -> str | None:
    """The `error.code` of a keygate refusal, else None."""
    try:
        return r.json()["error"]["code"]
    except Exception:  # noqa: BLE001 - not a keygate JSON refusal
        return None


def describe(r: Response) -> str:
    return f"{r.status} {r.body[:200]!r}"


def assert_refused(r: Response, cls: str, what: str = "") -> None:
    """r is keygate's default refusal of class `cls` (status and exact default body)."""
    assert r.status == DEFAULT_STATUS[cls] and r.body == DEFAULT_BODIES[cls], (
        f"{what}: expected {cls} ({DEFAULT_STATUS[cls]} {DEFAULT_BODIES[cls]!r}), got {describe(r)}")
    assert r.headers.get("content-type") == "application/json", f"{what}: content-type {r.headers.get('content-type')!r}"


def upstream_seen(r: Response, what: str = "") -> dict:
    """The echo document of a request that reached the upstream (asserts it did)."""
    assert r.status == 200, f"{what}: expected to reach upstream, got {describe(r)}"
    d = r.json()
    assert "header_list" in d, f"{what}: not an echo answer: {describe(r)}"
    return d


def header_values(echo_doc: dict, name: str) -> list[str]:
    return [v for k, v in echo_doc["header_list"] if k == name]


def split_path(p: str) -> tuple[str, list[tuple[str, str]]]:
    u = urlsplit(p)
    return u.path, parse_qsl(u.query, keep_blank_values=True)


def allowed(env: Envoy, plaintext: str, path: str = "/r") -> bool:
    r = env.request("GET", path, {"x-api-key": plaintext})
    return r.status == 200 and "header_list" in r.json()


def wait_loaded(env: Envoy, plaintext: str, timeout: float = 5.0) -> float:
    """Wait until `plaintext` is allowed; return how long that took."""
    t0 = time.monotonic()
    wait_until(lambda: allowed(env, plaintext), timeout, 0.05, f"key list loaded ({plaintext[:6]}... allowed)")
    return time.monotonic() - t0


def batch(env: Envoy, plaintext: str, n: int = 20, path: str = "/r") -> list[Response]:
    """n requests with the key, each on a fresh connection (spread over the workers)."""
    return env.request_many(n, "GET", path, {"x-api-key": plaintext}, workers=8)


def batch_classes(env: Envoy, plaintext: str, n: int = 20) -> list[str]:
    """The outcome of each of n requests: 'allowed' or the refusal code."""
    out = []
    for r in batch(env, plaintext, n):
        if r.status == 200 and code(r) is None:
            out.append("allowed")
        else:
            out.append(code(r) or f"status {r.status}")
    return out


def fetch_total(env: Envoy) -> float:
    st = env.stats()
    return sum(st.get(m, 0.0) for m in FETCH_METRICS)


def metric_deltas(before: dict, after: dict) -> dict:
    """Changed keygate_* metrics: name -> after - before."""
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in sorted(set(before) | set(after))
            if k.startswith("keygate_") and after.get(k, 0.0) != before.get(k, 0.0)}


def dumps(d: Any) -> str:
    return json.dumps(d)


def _port_race(e: BaseException) -> bool:
    """Envoy lost its pre-picked free port to another socket before binding it (the harness picks
    ports, then Envoy binds them ~2 s later; on a busy loopback another connection can take one),
    or the /ready probe connected to itself on the not-yet-bound admin port. Not keygate's fault."""
    if isinstance(e, http.client.HTTPException):
        return True
    return isinstance(e, harness.EnvoyStartError) and "Address already in use" in str(e)


def start_envoy(start, *args, attempts: int = 3, **kwargs) -> Envoy:
    """start(*args, **kwargs) (envoy_factory or harness.start_envoy), retried on a port race."""
    for i in range(attempts):
        try:
            return start(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if i == attempts - 1 or not _port_race(e):
                raise
    raise AssertionError("unreachable")


def expect_config_failure(cfg, attempts: int = 3, **kwargs) -> str:
    """harness.expect_envoy_config_failure, retried when Envoy died of a port race instead."""
    for i in range(attempts):
        try:
            log = harness.expect_envoy_config_failure(cfg, **kwargs)
        except http.client.HTTPException:
            if i == attempts - 1:
                raise
            continue
        if "Address already in use" in log and "configuration rejected" not in log and i < attempts - 1:
            continue
        return log
    raise AssertionError("unreachable")


def assert_no_key_material(env: Envoy, plaintexts: list[str]) -> None:
    """SPEC §5/§6: neither the keys nor their hashes appear in Envoy's log or stats."""
    _, prom = env.admin("/stats/prometheus")
    _, stats = env.admin("/stats")
    for where, text in (("log", env.log()), ("/stats/prometheus", prom), ("/stats", stats)):
        for p in plaintexts:
            for needle in (p, sha256_hex(p), sha256_hex(p).upper()):
                assert needle not in text, f"key material {needle[:12]}... (of key {p[:6]}...) found in Envoy's {where}"
