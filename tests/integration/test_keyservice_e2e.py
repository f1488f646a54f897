"""End to end with the real key service: `target/release/keygate keyservice` on SQLite on loopback
feeding Envoy (`--concurrency 2`) with keygate, through its admin API only.

- a key created through the admin API is accepted within `refresh_s` + `timeout_ms`;
- a disabled key, and a key rotated out with `overlap_s` 0, are refused within the same bound;
- usage reported by the gateway (`usage` setting) shows in the key service: `last_used_at` and
  exact per-day counts across both workers;
- bad admin input gets a 400 naming the field, and changes nothing (records, document, ETag).
"""
from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import harness

REFRESH_S = 2
TIMEOUT_MS = 1000
# What the contract promises, plus the polling step and a worker's 100 ms view refresh.
BOUND_S = REFRESH_S + TIMEOUT_MS / 1000 + 0.5
TOKEN = "e2e-admin-token-0123456789"


class KeyService:
    def __init__(self, tmp: Path):
        self.port = harness.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tokens = tmp / "admin-tokens"
        tokens.write_text(f"# e2e\n{TOKEN}\n")
        self.log_path = tmp / "keyservice.log"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [str(harness.CLI_PATH), "keyservice", "--listen", f"127.0.0.1:{self.port}",
             "--database", f"sqlite:{tmp / 'keygate.db'}", "--admin-tokens", str(tokens)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def ready():
            assert self.proc.poll() is None, self.log_path.read_text()
            return self.call("GET", "/healthz", auth=False)[0] == 200
        harness.wait_until(ready, 30, 0.1, "key service ready")

    def call(self, method: str, path: str, body=None, auth: bool = True, headers=None):
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if auth:
            req.add_header("authorization", f"Bearer {TOKEN}")
        if data is not None:
            req.add_header("content-type", "application/json")
        for k, v in (headers or {}).items():
            req.add_header(k, v)
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw, status, hdrs = r.read(), r.status, dict(r.headers)
        except urllib.error.HTTPError as e:
            raw, status, hdrs = e.read(), e.code, dict(e.headers)
        except OSError:
            return 0, None, {}
        try:
            return status, (json.loads(raw) if raw else None), hdrs
        except ValueError:
            return status, raw, hdrs

    def stop(self):
        harness._stop_process(self.proc)
        self.log.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not harness.CLI_PATH.exists() or not harness.WASM_PATH.exists():
        pytest.fail("target/release/keygate or keygate.wasm is missing: run `make build` first")
    from echo import EchoServer  # tests/support/echo.py, the suite's echo upstream

    tmp = tmp_path_factory.mktemp("keyservice_e2e")
    ks = KeyService(tmp)
    echo = EchoServer()
    echo.__enter__()
    env = None
    try:
        status, _, _ = ks.call("PUT", "/v1/admin/owners/org-e2e", {"status": "active"})
        assert status in (200, 201)
        status, first, _ = ks.call("POST", "/v1/admin/keys", {"owner": "org-e2e", "name": "warmup"})
        assert status == 201, first
        config = {
            "key_list": {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": REFRESH_S,
                         "timeout_ms": TIMEOUT_MS},
            "usage": {"interval_s": 1},
        }
        env = harness.start_envoy(config, ks.port, echo.port, concurrency=2)
        warm = {"x-api-key": first["key"]}
        harness.wait_until(lambda: env.request("GET", "/warm", warm).status == 200, 20, 0.1,
                           "first key list loaded")
        yield ks, env
    finally:
        if env is not None:
            env.stop()
        echo.__exit__(None, None, None)
        ks.stop()


def status_within(env, key: str, want: int, bound: float = BOUND_S, seen: list | None = None) -> float:
    """Seconds until every worker answers a request with `key` with `want` (fails after `bound`):
    `want` on four requests in a row (on new connections, so both workers are asked), each worker
    refreshing its view of the list on its own 100 ms tick. Every status is appended to `seen`."""
    t0 = time.monotonic()
    streak = 0
    while True:
        r = env.request("GET", "/v1/things", {"x-api-key": key})
        elapsed = time.monotonic() - t0
        if seen is not None:
            seen.append(r.status)
        streak = streak + 1 if r.status == want else 0
        if streak == 4:
            return elapsed
        assert elapsed < bound, f"still {r.status} after {elapsed:.2f} s (want {want} within {bound} s): {r.body[:200]!r}"
        time.sleep(0.05)


def create(ks, **extra) -> dict:
    status, rec, _ = ks.call("POST", "/v1/admin/keys", {"owner": "org-e2e", **extra})
    assert status == 201, rec
    return rec


def test_created_key_is_accepted_within_the_bound(stack):
    ks, env = stack
    rec = create(ks, name="new")
    assert env.request("GET", "/v1/things", {"x-api-key": rec["key"]}).status == 401
    took = status_within(env, rec["key"], 200)
    r = env.request("GET", "/v1/things", {"x-api-key": rec["key"]})
    assert r.json()["headers"]["x-api-key-id"] == rec["id"]
    print(f"created key accepted after {took:.2f} s")


def test_disabled_key_is_refused_within_the_bound(stack):
    ks, env = stack
    rec = create(ks)
    status_within(env, rec["key"], 200)
    status, patched, _ = ks.call("PATCH", f"/v1/admin/keys/{rec['id']}", {"status": "disabled"})
    assert status == 200 and patched["status"] == "disabled"
    status_within(env, rec["key"], 401)
    r = env.request("GET", "/v1/things", {"x-api-key": rec["key"]})
    assert r.json()["error"]["code"] == "expired_key"
    # enabled again: accepted again
    assert ks.call("PATCH", f"/v1/admin/keys/{rec['id']}", {"status": "active"})[0] == 200
    status_within(env, rec["key"], 200)


def test_rotated_out_key_is_refused_within_the_bound(stack):
    ks, env = stack
    old = create(ks)
    status_within(env, old["key"], 200)
    status, new, _ = ks.call("POST", f"/v1/admin/keys/{old['id']}/rotate", {"overlap_s": 0})
    assert status == 201 and new["id"] != old["id"] and new["key"] != old["key"]
    status_within(env, old["key"], 401)
    assert env.request("GET", "/v1/things", {"x-api-key": old["key"]}).json()["error"]["code"] == "expired_key"
    status_within(env, new["key"], 200)


def test_usage_appears_in_the_key_service(stack):
    ks, env = stack
    rec = create(ks, rate_limits=[{"limit": 6, "window_s": 3600}])
    seen: list[int] = []
    status_within(env, rec["key"], 200, seen=seen)  # 200 four times in a row: every worker sees it
    h = {"x-api-key": rec["key"]}
    codes = [env.request("GET", f"/v1/things/{i}", h).status for i in range(6)]
    # Exactly the limit allowed across both workers, then refused; 401s (a worker that had not
    # seen the key yet) carry no key id and are not usage.
    allowed, limited = (seen + codes).count(200), (seen + codes).count(429)
    assert allowed == 6 and codes[-4:] == [429] * 4, (seen, codes)

    def reported():
        status, u, _ = ks.call("GET", f"/v1/admin/keys/{rec['id']}/usage")
        assert status == 200, u
        days = u["days"]
        total = sum(d["allowed"] for d in days), sum(d["refused"].get("rate_limited", 0) for d in days)
        return u if total == (allowed, limited) else None
    u = harness.wait_until(reported, 10, 0.2, f"usage reported: {allowed} allowed, {limited} rate_limited")
    assert u["last_used_at"] is not None
    status, record, _ = ks.call("GET", f"/v1/admin/keys/{rec['id']}")
    assert record["last_used_at"] == u["last_used_at"]
    # Nothing per key is a metric; the key never shows in Envoy's stats.
    stats = env.admin("/stats/prometheus")[1]
    assert rec["id"] not in stats and rec["key"] not in stats
    # Usage does not change the document.
    s1, _, h1 = ks.call("GET", "/v1/keys", auth=False)
    time.sleep(1.5)
    s2, _, h2 = ks.call("GET", "/v1/keys", auth=False)
    assert s1 == s2 == 200 and h1["etag"] == h2["etag"]


BAD = [
    ("POST", "/v1/admin/keys", {"owner": "org-e2e", "rate_limits": [{"limit": 1, "window_s": 0}]},
     "rate_limits[0].window_s"),
    ("POST", "/v1/admin/keys", {"owner": "org-e2e", "allowed_ips": ["10.0.0.300/8"]}, "allowed_ips[0]"),
    ("POST", "/v1/admin/keys", {"owner": "org-e2e", "sneezed": True}, "sneezed"),
    ("POST", "/v1/admin/keys", {"owner": "org-e2e", "encoding": "base64"}, "encoding"),
    ("PATCH", "/v1/admin/keys/{id}", {"expires_at": "2030-01-01T00:00:00Z"}, "expires_at"),
    ("PATCH", "/v1/admin/keys/{id}", {"status": "sleeping"}, "status"),
    ("PATCH", "/v1/admin/keys/{id}", {"scopes": ["ok", 7]}, "scopes[1]"),
]


def test_bad_admin_input_is_a_400_naming_the_field_and_changes_nothing(stack):
    ks, env = stack
    rec = create(ks, scopes=["a"])
    time.sleep(0.3)

    def snapshot():
        keys = ks.call("GET", "/v1/admin/keys?limit=1000")[1]["keys"]
        doc_status, _, hdrs = ks.call("GET", "/v1/keys", auth=False)
        assert doc_status == 200
        return keys, hdrs["etag"]
    before = snapshot()
    for method, path, body, field in BAD:
        status, err, _ = ks.call(method, path.replace("{id}", rec["id"]), body)
        assert status == 400, (method, path, body, status, err)
        assert err["error"]["code"] == "invalid_request" and err["error"]["field"] == field, (body, err)
    status, err, _ = ks.call("POST", "/v1/admin/keys", b"{not json")
    assert status == 400 and err["error"]["code"] == "invalid_request"
    assert snapshot() == before
