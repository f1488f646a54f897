"""The five seed-API profiles in envoy/examples/<api>/ against a real Envoy.

Each profile test loads envoy/examples/<api>/keygate.json, replaces only its `key_list` (so it
points at the fake key service and refreshes every second), serves a key list made here (keys in
the API's documented format, SHA-256 hashed), and walks through every promise of the API's
authentication page (listed in envoy/examples/<api>/README.md). The file tests also check that
every envoy.yaml is what render.py makes of its keygate.json, that each configuration passes
`keygate check-config` and `envoy --mode validate`, that the demo key lists agree with
demo-keys.txt, and that each envoy.yaml runs as shipped.
"""
from __future__ import annotations

import json
import secrets
import string
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harness
from keyservice import KeyService, sha256_hex

EXAMPLES = harness.REPO / "envoy" / "examples"
sys.path.insert(0, str(EXAMPLES))
import render  # noqa: E402  (envoy/examples/render.py)

PROFILES = render.PROFILES
TEST_KEY_LIST = {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": 1}
ALNUM = string.ascii_letters + string.digits
PAST = "2025-01-01T00:00:00Z"
FUTURE = "2099-01-01T00:00:00Z"


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def profile_config(api: str, **extra) -> dict:
    """envoy/examples/<api>/keygate.json with only key_list replaced (plus `extra` top-level
    fields, used only where a test says why)."""
    cfg = json.loads((EXAMPLES / api / "keygate.json").read_text())
    cfg["key_list"] = dict(TEST_KEY_LIST)
    cfg.update(extra)
    return cfg


def rand(n: int, alphabet: str = ALNUM) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def rec(kid: str, key: str, owner: str, **fields) -> dict:
    return {"id": kid, "hash": sha256_hex(key), "owner": owner, **fields}


def start(envoy_factory, keyservice: KeyService, echo, cfg: dict, document: dict, probe: dict,
          probe_path: str = "/") -> harness.Envoy:
    """Envoy with this plugin config; first shows the `unavailable` answer while the key service
    fails, then serves `document` and waits until a request with `probe` headers gets through."""
    keyservice.status = 500
    env = envoy_factory(cfg, keyservice.port, echo.port)
    keyservice.wait_for_requests(1)
    r = env.request("GET", probe_path, probe)
    assert r.status == 503, r
    unavailable = cfg["errors"]["unavailable"]
    assert r.body == unavailable["body"].encode()
    assert r.headers["content-type"] == unavailable.get("content_type", "application/json")
    keyservice.reset()
    keyservice.set_document(document)
    harness.wait_until(lambda: env.request("GET", probe_path, probe).status == 200, timeout=15,
                       message="key list loaded")
    # Every worker must answer from the loaded list from now on (requests spread over workers).
    # `probe` must be a key without rate limits.
    harness.wait_until(lambda: all(r.status == 200 for r in env.request_many(8, "GET", probe_path, probe)),
                       timeout=5, message="key list loaded on every worker")
    echo.clear()
    return env


def refusal(cfg: dict, cls: str, r: harness.Response) -> None:
    """r is the profile's answer for class `cls`, byte for byte (no rate-limit context)."""
    e = cfg["errors"][cls]
    assert r.status == e["status"], r
    assert r.body == e["body"].encode(), r
    assert r.headers["content-type"] == e.get("content_type", "application/json"), r
    for k, v in e.get("headers", {}).items():
        assert r.headers.get(k.lower()) == v, r
    assert "x-ratelimit-limit" not in r.headers, r


def upstream_saw(echo, n: int = 1) -> list[dict]:
    harness.wait_until(lambda: len(echo.requests) >= n, timeout=5, message="upstream request")
    return echo.requests


def fresh_window(window_s: int = 60, need_s: float = 8.0) -> None:
    """Sleep into the next fixed window if fewer than need_s seconds are left in this one, so a
    sequence of counted requests falls into one window."""
    left = window_s - (time.time() % window_s)
    if left < need_s:
        time.sleep(left + 0.2)


def rl_headers(r: harness.Response) -> tuple[int, int, int]:
    return (int(r.headers["x-ratelimit-limit"]), int(r.headers["x-ratelimit-remaining"]),
            int(r.headers["x-ratelimit-reset"]))


# ------------------------------------------------------------------------------------------------
# the example files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("api", PROFILES)
def test_envoy_yaml_is_rendered_from_keygate_json(api):
    text = (EXAMPLES / api / "envoy.yaml").read_text()
    assert text == render.render(api), f"envoy/examples/{api}/envoy.yaml is stale: run python3 envoy/examples/render.py"
    assert render.embedded_config(text) == json.loads((EXAMPLES / api / "keygate.json").read_text())
    assert "filename: target/wasm32-wasip1/release/keygate.wasm" in text
    assert "use_remote_address: true" in text  # the client IP is the TCP peer, not a written XFF
    for port in (8080, 8081, 8082, 9901):
        assert f"port_value: {port}" in text
    assert subprocess.run([sys.executable, str(EXAMPLES / "render.py"), "--check", api]).returncode == 0


@pytest.mark.parametrize("api", PROFILES)
def test_keygate_json_shape(api):
    cfg = json.loads((EXAMPLES / api / "keygate.json").read_text())
    assert cfg["key_list"]["cluster"] == "keyservice"
    # every class has an explicit answer in the API's own shape
    assert set(cfg["errors"]) == {"missing_key", "invalid_key", "expired_key", "forbidden", "ip_denied",
                                  "rate_limited", "unavailable"}
    for cls, e in cfg["errors"].items():
        body = e["body"].replace("{retry_after}", "7")
        json.loads(body)  # valid JSON once the template is filled


def _cli() -> Path:
    if not harness.CLI_PATH.exists():
        pytest.skip("target/release/keygate not built: make cli")
    return harness.CLI_PATH


@pytest.mark.parametrize("api", PROFILES)
def test_keygate_json_passes_check_config(api):
    out = subprocess.run([str(_cli()), "check-config", str(EXAMPLES / api / "keygate.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out


PREFIX = {"mindo": "mindo_", "minimo": "mn-", "mindbaz": "", "autype": "ak_", "minds": "minds_"}


@pytest.mark.parametrize("api", PROFILES)
def test_demo_keys_agree(api):
    lines = [ln.split(None, 2) for ln in (EXAMPLES / api / "demo-keys.txt").read_text().splitlines()
             if ln.strip() and not ln.lstrip().startswith("#")]
    demo = {kid: key for kid, key, *_ in lines}
    text = (EXAMPLES / api / "keys.json").read_text()
    doc = json.loads(text)
    assert set(demo) == {k["id"] for k in doc["keys"]}
    for k in doc["keys"]:
        key = demo[k["id"]]
        assert key.startswith(PREFIX[api]) and len(key) >= 16
        assert k["hash"] == sha256_hex(key)
        assert key not in text
    out = subprocess.run([str(_cli()), "check-keys", str(EXAMPLES / api / "keys.json")], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ok: "), out


@pytest.mark.parametrize("api", PROFILES)
def test_envoy_validates_the_example(api, wasm_path):
    out = subprocess.run([harness.envoy_binary(), "--mode", "validate", "-c", f"envoy/examples/{api}/envoy.yaml",
                          "--disable-hot-restart", "--log-level", "error"],
                         cwd=harness.REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "OK" in out.stdout + out.stderr


DEMO_PROBE = {  # (method, path, header name, header value template) a demo key may use
    "mindo": ("GET", "/api/v1/business-accounts/", "X-API-Key", "{}"),
    "minimo": ("POST", "/public/v1/contacts", "Authorization", "Bearer {}"),
    "mindbaz": ("GET", "/api/123/resource", "X-API-KEY", "{}"),
    "autype": ("GET", "/api/v1/dev/documents", "X-API-Key", "{}"),
    "minds": ("GET", "/api/v1/auth/me", "Authorization", "Bearer {}"),
}


@pytest.mark.parametrize("api", PROFILES)
def test_example_runs_as_shipped(api, envoy_factory, echo, wasm_path):
    """envoy.yaml itself (ports moved to free ones), its keys.json served as the key list, and the
    first demo key of demo-keys.txt."""
    ks = KeyService((EXAMPLES / api / "keys.json").read_bytes())
    ks.start()
    try:
        port, admin = harness._free_ports(2)
        text = (EXAMPLES / api / "envoy.yaml").read_text()
        for old, new in ((8080, port), (9901, admin), (8081, ks.port), (8082, echo.port)):
            text = text.replace(f"port_value: {old}}}", f"port_value: {new}}}")
        env = envoy_factory.config(text, port, admin, cwd=harness.REPO)
        first = next(ln.split() for ln in (EXAMPLES / api / "demo-keys.txt").read_text().splitlines()
                     if ln.strip() and not ln.startswith("#"))
        method, path, hname, tmpl = DEMO_PROBE[api]
        hdrs = {hname: tmpl.format(first[1])}
        r = harness.wait_until(lambda: (lambda r: r if r.status == 200 else None)(env.request(method, path, hdrs)),
                               timeout=20, message="demo key accepted")
        if api == "minds":
            assert r.json() == {"id": json.loads((EXAMPLES / api / "keys.json").read_text())["keys"][0]["owner"]}
        else:
            assert r.json()["headers"]["x-api-key-id"] == first[0]
        cfg = json.loads((EXAMPLES / api / "keygate.json").read_text())
        refusal(cfg, "missing_key", env.request(method, path))
    finally:
        ks.stop()


# ------------------------------------------------------------------------------------------------
# 000 mindo -- X-API-Key: mindo_..., DRF-style {"detail": ...}
# ------------------------------------------------------------------------------------------------
def mindo_key() -> str:
    return "mindo_" + rand(24)  # X-API-Key: mindo_xxxxxxxxxxxxxxxxxxxxxxxx


def test_mindo(envoy_factory, keyservice, echo):
    cfg = profile_config("mindo")
    good, expired, revoked, disabled, deleted, elsewhere, orphan = (mindo_key() for _ in range(7))
    future = mindo_key()
    document = {
        "version": "mindo-1",
        "owners": {"acct-1": {"status": "active"}, "acct-gone": {"status": "disabled"}},
        "keys": [
            rec("k_good", good, "acct-1"),
            rec("k_future", future, "acct-1", expires_at=FUTURE),
            rec("k_expired", expired, "acct-1", expires_at=PAST),
            rec("k_revoked", revoked, "acct-1", status="revoked"),
            rec("k_disabled", disabled, "acct-1", status="disabled"),
            rec("k_deleted", deleted, "acct-1", status="deleted"),
            rec("k_elsewhere", elsewhere, "acct-1", allowed_ips=["192.0.2.0/24"]),
            rec("k_orphan", orphan, "acct-gone"),
        ],
    }
    path = "/api/v1/business-accounts/"
    env = start(envoy_factory, keyservice, echo, cfg, document, {"X-API-Key": good}, path)

    # the documented request: X-API-Key on /api/v1/business-accounts/ (trailing slash kept)
    r = env.request("GET", path, {"X-API-Key": good})
    assert r.status == 200, r
    seen = r.json()
    assert seen["path"] == path
    assert seen["headers"]["x-api-key-id"] == "k_good" and seen["headers"]["x-api-key-owner"] == "acct-1"
    assert "x-api-key" not in seen["headers"]  # the key never reaches the upstream
    assert "x-ratelimit-limit" not in r.headers  # the page documents no rate limit
    for name in ("x-api-key", "X-API-KEY", "x-Api-kEY"):
        assert env.request("GET", path, {name: good}).status == 200, name
    assert env.request("GET", path, {"X-API-Key": future}).status == 200

    # 401 "Este endpoint requiere autenticacion con API Key (header X-API-Key)": header not sent
    refusal(cfg, "missing_key", env.request("GET", path))
    refusal(cfg, "missing_key", env.request("GET", path, {"X-API-Key": ""}))
    assert json.loads(env.request("GET", path).body) == {
        "detail": "Este endpoint requiere autenticacion con API Key (header X-API-Key)"}
    # only the X-API-Key header is read: Bearer or a query parameter is "not sent"
    refusal(cfg, "missing_key", env.request("GET", path, {"Authorization": f"Bearer {good}"}))
    refusal(cfg, "missing_key", env.request("GET", f"{path}?api_key={good}"))

    # a key that is not a mindo_ key, or not known (page silent: 401 {"detail": "API Key invalida"})
    for bad in (mindo_key(), good.replace("mindo_", "MINDO_"), "ak_" + good[6:], good + "x", good[:-1]):
        refusal(cfg, "invalid_key", env.request("GET", path, {"X-API-Key": bad}))
    refusal(cfg, "invalid_key", env.request("GET", path, {"X-API-Key": orphan}))

    # 401 "API Key expirada": expired or revoked (and disabled/deleted)
    for k in (expired, revoked, disabled, deleted):
        r = env.request("GET", path, {"X-API-Key": k})
        refusal(cfg, "expired_key", r)
        assert r.json() == {"detail": "API Key expirada"}

    # 403 "API Key no tiene acceso a este recurso": a key the list restricts elsewhere (per-key IPs)
    r = env.request("GET", path, {"X-API-Key": elsewhere})
    refusal(cfg, "ip_denied", r)
    assert r.json() == {"detail": "API Key no tiene acceso a este recurso"}
    assert echo.requests and all(q["headers"].get("x-api-key-id") in ("k_good", "k_future") for q in echo.requests)


def test_mindo_forbidden_with_an_endpoint_permission(envoy_factory, keyservice, echo):
    """The page documents the 403 for "a key without permission for this endpoint" but lists no
    endpoints, so keygate.json has no `routes`. With one route added by the operator (the only
    change to the profile here), a key lacking its scope gets the documented 403."""
    route = {"path_prefix": "/api/v1/business-accounts", "methods": ["POST", "PUT", "PATCH", "DELETE"],
             "scope": "business-accounts:write"}
    cfg = profile_config("mindo", routes=[route])
    reader, writer = mindo_key(), mindo_key()
    document = {"version": "mindo-2", "keys": [
        rec("k_reader", reader, "acct-1"),
        rec("k_writer", writer, "acct-1", scopes=["business-accounts:write"]),
    ]}
    path = "/api/v1/business-accounts/"
    env = start(envoy_factory, keyservice, echo, cfg, document, {"X-API-Key": reader}, path)
    r = env.request("POST", path, {"X-API-Key": reader}, body="{}")
    refusal(cfg, "forbidden", r)
    assert r.json() == {"detail": "API Key no tiene acceso a este recurso"}
    assert env.request("POST", path, {"X-API-Key": writer}, body="{}").status == 200
    assert env.request("GET", path, {"X-API-Key": reader}).status == 200


# ------------------------------------------------------------------------------------------------
# 001 minimo -- Authorization: Bearer mn-{CLIENT_ID}-{SECRET_KEY}; read-only / write-only keys
# ------------------------------------------------------------------------------------------------
def minimo_key(client_id: str = "abc123") -> str:
    return f"mn-{client_id}-{rand(18, string.ascii_lowercase + string.digits)}"


def test_minimo(envoy_factory, keyservice, echo):
    cfg = profile_config("minimo")
    full, star, ro, wo, noscope, revoked, expired = (minimo_key() for _ in range(7))
    limited, other_client, probe = minimo_key(), minimo_key("zz9"), minimo_key()
    document = {
        "version": "minimo-1",
        "owners": {"abc123": {}, "zz9": {"status": "active"}},
        "keys": [
            rec("full", full, "abc123", scopes=["contacts:*"], expires_at=FUTURE),
            rec("star", star, "abc123", scopes=["*"]),
            rec("readonly", ro, "abc123", scopes=["contacts:read"]),
            rec("writeonly", wo, "abc123", scopes=["contacts:write"]),
            rec("noscope", noscope, "abc123"),
            rec("revoked", revoked, "abc123", scopes=["contacts:*"], status="revoked"),
            rec("expired", expired, "abc123", scopes=["contacts:*"], expires_at=PAST),
            rec("limited", limited, "abc123", scopes=["contacts:*"], rate_limits=[{"limit": 3, "window_s": 60}]),
            rec("other", other_client, "zz9", scopes=["contacts:read"]),
            rec("probe", probe, "abc123", rate_limits=[]),
        ],
    }
    contacts = "/public/v1/contacts"
    bearer = lambda k: {"Authorization": f"Bearer {k}", "Content-Type": "application/json"}  # noqa: E731
    payload = json.dumps({"email": "customer@example.com", "firstName": "Jane", "lastName": "Doe"})
    env = start(envoy_factory, keyservice, echo, cfg, document, bearer(probe), "/public/v1/ping")

    # the documented request: POST /public/v1/contacts with Authorization: Bearer
    fresh_window()
    r = env.request("POST", contacts, bearer(full), body=payload)
    assert r.status == 200, r
    seen = r.json()
    assert seen["method"] == "POST" and seen["path"] == contacts and json.loads(seen["body"])["firstName"] == "Jane"
    assert "authorization" not in seen["headers"]
    assert seen["headers"]["x-api-key-owner"] == "abc123" and seen["headers"]["x-api-key-id"] == "full"
    # "Check the X-RateLimit-* headers in responses" (profile default: 60/minute)
    limit, remaining, reset = rl_headers(r)
    assert limit == 60 and 0 <= remaining < 60 and reset % 60 == 0 and time.time() < reset <= time.time() + 61
    # scheme and header name are case-insensitive; surrounding spaces are tolerated
    for hdr in ({"authorization": f"bearer {full}"}, {"AUTHORIZATION": f"BEARER {full}"},
                {"Authorization": f"Bearer   {full}  "}):
        assert env.request("GET", contacts, hdr).status == 200, hdr

    # 401 {"error":{"code":"unauthorized","message":"Invalid or missing API key"}}: missing ...
    refusal(cfg, "missing_key", env.request("POST", contacts, body=payload))
    assert env.request("GET", contacts).json() == {"error": {"code": "unauthorized", "message": "Invalid or missing API key"}}
    for hdr in ({"Authorization": full}, {"Authorization": f"Basic {full}"}, {"Authorization": "Bearer"},
                {"Authorization": f"Token {full}"}, {"X-API-Key": full}):
        refusal(cfg, "missing_key", env.request("GET", contacts, hdr))
    refusal(cfg, "missing_key", env.request("GET", f"{contacts}?api_key={full}"))
    # client-side use is "technically possible": the browser's CORS preflight carries no key
    preflight = {"Origin": "https://dashboard.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = env.request("OPTIONS", contacts, preflight)
    assert r.status == 200 and r.json()["method"] == "OPTIONS" and "x-api-key-id" not in r.json()["headers"]
    refusal(cfg, "missing_key", env.request("OPTIONS", contacts))
    # ... or invalid (unknown, not an mn- key), revoked, expired: the same documented 401
    for bad in (minimo_key(), "mx-" + full[3:], full.upper(), "abc123-" + full[3:], full + "0"):
        refusal(cfg, "invalid_key", env.request("GET", contacts, bearer(bad)))
    refusal(cfg, "expired_key", env.request("GET", contacts, bearer(revoked)))
    refusal(cfg, "expired_key", env.request("GET", contacts, bearer(expired)))
    assert env.request("GET", contacts, bearer(revoked)).body == env.request("GET", contacts).body

    # permissions: read-only keys for dashboards, write-only keys for contact imports
    forbidden = {"error": {"code": "forbidden", "message": "This API key does not have permission to access this resource"}}
    for m in ("GET", "HEAD"):
        assert env.request(m, contacts, bearer(ro)).status == 200
        assert env.request(m, contacts, bearer(other_client)).status == 200
    assert env.request("GET", contacts + "/42?fields=email", bearer(ro)).status == 200
    for m in ("POST", "PUT", "PATCH", "DELETE"):
        r = env.request(m, contacts + ("" if m == "POST" else "/42"), bearer(ro), body=payload)
        refusal(cfg, "forbidden", r)
        assert r.json() == forbidden
    # path tricks do not dodge the write rule
    for p in ("/public/v1//contacts", "/public/v1/./contacts", "/public/v1/x/../contacts", "/public/v1/contacts/"):
        refusal(cfg, "forbidden", env.request("POST", p, bearer(ro), body=payload))
    for m in ("POST", "PUT", "PATCH", "DELETE"):
        assert env.request(m, contacts + ("" if m == "POST" else "/42"), bearer(wo), body=payload).status == 200, m
    refusal(cfg, "forbidden", env.request("GET", contacts, bearer(wo)))
    refusal(cfg, "forbidden", env.request("GET", contacts + "/42", bearer(wo)))
    # full access (contacts:* or *) does both; a key without permissions does neither
    for k in (full, star):
        assert env.request("GET", contacts, bearer(k)).status == 200
        assert env.request("DELETE", contacts + "/42", bearer(k)).status == 200
    refusal(cfg, "forbidden", env.request("GET", contacts, bearer(noscope)))
    refusal(cfg, "forbidden", env.request("POST", contacts, bearer(noscope), body=payload))
    # resources without a permission rule: any valid key
    assert env.request("GET", "/public/v1/contactsx", bearer(noscope)).status == 200
    assert env.request("GET", "/public/v1/other", bearer(wo)).status == 200

    # 429 {"error":{"code":"rate_limit_exceeded","message":"...retry after N seconds.","retry_after":N}}
    fresh_window()
    rs = [env.request("GET", contacts, bearer(limited)) for _ in range(4)]
    assert [r.status for r in rs] == [200, 200, 200, 429], rs
    assert [rl_headers(r)[:2] for r in rs[:3]] == [(3, 2), (3, 1), (3, 0)]
    r = rs[3]
    retry = int(r.headers["retry-after"])
    assert 1 <= retry <= 60
    assert r.json() == {"error": {"code": "rate_limit_exceeded",
                                  "message": f"Rate limit exceeded. Please retry after {retry} seconds.",
                                  "retry_after": retry}}
    assert rl_headers(r)[:2] == (3, 0) and rl_headers(r)[2] == rl_headers(rs[0])[2]
    # other keys are not affected
    assert env.request("GET", contacts, bearer(full)).status == 200


# ------------------------------------------------------------------------------------------------
# 002 mindbaz -- X-API-KEY, /swagger + OPTIONS exempt, sites, IPs, per-minute limits
# ------------------------------------------------------------------------------------------------
def mindbaz_key() -> str:
    return rand(32)  # no documented format ("abcdef123456")


def test_mindbaz(envoy_factory, keyservice, echo):
    cfg = profile_config("mindbaz")
    k = {name: mindbaz_key() for name in ("any", "site123", "sites", "ip", "ip6", "small", "unlimited", "disabled",
                                          "deleted", "revoked", "expired", "future", "userless", "userdisabled", "burst")}
    document = {
        "version": "mindbaz-1",
        "owners": {"u1": {"status": "active"}, "u2": {}, "u-off": {"status": "disabled"}},
        "keys": [
            rec("any", k["any"], "u1"),
            rec("site123", k["site123"], "u1", sites=["123"]),
            rec("sites", k["sites"], "u2", sites=["123", "456"]),
            rec("ip", k["ip"], "u1", allowed_ips=["127.0.0.2/32", "10.0.0.0/8"]),
            rec("ip6", k["ip6"], "u1", allowed_ips=["2001:db8::/32"]),
            rec("small", k["small"], "u1", rate_limits=[{"limit": 3, "window_s": 60}]),
            rec("unlimited", k["unlimited"], "u1", rate_limits=[]),
            rec("burst", k["burst"], "u1", rate_limits=[{"limit": 5, "window_s": 60}]),
            rec("disabled", k["disabled"], "u1", status="disabled"),
            rec("deleted", k["deleted"], "u1", status="deleted"),
            rec("revoked", k["revoked"], "u1", status="revoked"),
            rec("expired", k["expired"], "u1", expires_at=int(time.time()) - 5),
            rec("future", k["future"], "u1", expires_at=FUTURE),
            rec("userless", k["userless"], "u-missing"),
            rec("userdisabled", k["userdisabled"], "u-off"),
        ],
    }
    res = "/api/123/resource"
    key = lambda name, hname="X-API-KEY": {hname: k[name]}  # noqa: E731
    env = start(envoy_factory, keyservice, echo, cfg, document, key("unlimited"), res)

    # the documented request: X-API-KEY on /api/123/resource
    fresh_window()
    r = env.request("GET", res, key("any"))
    assert r.status == 200, r
    assert r.json()["path"] == res
    assert r.json()["headers"]["x-api-key-id"] == "any" and "x-api-key" not in r.json()["headers"]
    for hname in ("X-API-KEY", "x-api-key", "X-Api-Key"):
        assert env.request("GET", res, key("any", hname)).status == 200, hname
    # identity headers sent by a client never reach the API
    r = env.request("GET", res, {**key("any"), "X-Api-Key-Owner": "u-evil", "X-Api-Key-Id": "evil"})
    assert r.json()["headers"]["x-api-key-owner"] == "u1" and r.json()["headers"]["x-api-key-id"] == "any"

    # missing / other schemes
    refusal(cfg, "missing_key", env.request("GET", res))
    refusal(cfg, "missing_key", env.request("GET", res, {"Authorization": f"Bearer {k['any']}"}))
    refusal(cfg, "missing_key", env.request("GET", res, {"X-API-KEY": "   "}))
    body = env.request("GET", res).json()
    assert body["status"] == 401 and body["title"] == "Unauthorized"

    # cases where the key is not required: Swagger documentation and OPTIONS (CORS preflight)
    echo.clear()
    for p in ("/swagger", "/swagger/", "/swagger/index.html", "/swagger/v1/swagger.json?x=1"):
        r = env.request("GET", p, {"X-Api-Key-Owner": "u-evil"})
        assert r.status == 200, (p, r)
        assert "x-ratelimit-limit" not in r.headers
        assert "x-api-key-owner" not in r.json()["headers"] and "x-api-key-id" not in r.json()["headers"]
    refusal(cfg, "missing_key", env.request("GET", "/swaggerx"))
    refusal(cfg, "missing_key", env.request("GET", "/api/123/swagger"))
    preflight = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "x-api-key"}
    r = env.request("OPTIONS", res, preflight)
    assert r.status == 200 and r.json()["method"] == "OPTIONS"
    assert env.request("OPTIONS", "/api/456/other").status == 200  # the page exempts every OPTIONS request
    refusal(cfg, "missing_key", env.request("GET", res, preflight))

    # validity conditions: existence, associated user, status, expiration
    refusal(cfg, "invalid_key", env.request("GET", res, {"X-API-KEY": mindbaz_key()}))
    refusal(cfg, "invalid_key", env.request("GET", res, key("userless")))
    refusal(cfg, "invalid_key", env.request("GET", res, key("userdisabled")))
    for name in ("disabled", "deleted", "revoked", "expired"):
        refusal(cfg, "expired_key", env.request("GET", res, key(name)))
    assert env.request("GET", res, key("future")).status == 200

    # site restriction: the site is the 2nd path segment, /api/{site}/...
    assert env.request("GET", res, key("site123")).status == 200
    assert env.request("POST", "/api/123/other/deeper?site=456", key("site123"), body="{}").status == 200
    for p in ("/api/456/resource", "/api/1234/resource", "/api", "/api/", "/", "/api/%31%32%33x/resource"):
        refusal(cfg, "forbidden", env.request("GET", p, key("site123")))
    for site in ("123", "456"):
        assert env.request("GET", f"/api/{site}/resource", key("sites")).status == 200
    refusal(cfg, "forbidden", env.request("GET", "/api/789/resource", key("sites")))
    assert env.request("GET", "/api/789/resource", key("any")).status == 200

    # IP restriction
    assert env.request("GET", res, key("ip"), source_ip="127.0.0.2").status == 200
    refusal(cfg, "ip_denied", env.request("GET", res, key("ip"), source_ip="127.0.0.3"))
    refusal(cfg, "ip_denied", env.request("GET", res, key("ip6")))
    assert env.request("GET", res, key("any"), source_ip="127.0.0.3").status == 200
    # the address is the connection's, whatever X-Forwarded-For a client writes
    refusal(cfg, "ip_denied", env.request("GET", res, key("ip") | {"X-Forwarded-For": "127.0.0.2"}, source_ip="127.0.0.3"))
    assert env.request("GET", res, key("ip") | {"X-Forwarded-For": "192.0.2.1"}, source_ip="127.0.0.2").status == 200

    # per-minute rate limit with X-RateLimit-Limit / -Remaining / -Reset
    fresh_window()
    now = time.time()
    rs = [env.request("GET", res, key("small")) for _ in range(4)]
    assert [r.status for r in rs] == [200, 200, 200, 429], rs
    assert [rl_headers(r)[:2] for r in rs] == [(3, 2), (3, 1), (3, 0), (3, 0)]
    reset = rl_headers(rs[0])[2]
    assert reset % 60 == 0 and now < reset <= now + 61  # Unix timestamp of the reset
    assert all(rl_headers(r)[2] == reset for r in rs)
    e = cfg["errors"]["rate_limited"]
    retry = int(rs[3].headers["retry-after"])
    assert 1 <= retry <= 60 and abs(reset - time.time() - retry) <= 2
    assert rs[3].headers["content-type"] == "application/problem+json"
    assert rs[3].body == e["body"].replace("{retry_after}", str(retry)).encode()
    # keys without their own limit get the profile default, 60/minute; [] means unlimited
    assert rl_headers(env.request("GET", res, key("any")))[0] == 60
    assert "x-ratelimit-limit" not in env.request("GET", res, key("unlimited")).headers
    # counting is exact across Envoy's workers
    fresh_window()
    many = env.request_many(20, "GET", res, key("burst"), workers=10)
    statuses = [r.status for r in many]
    assert statuses.count(200) == 5 and statuses.count(429) == 15, statuses


# ------------------------------------------------------------------------------------------------
# 003 autype -- X-API-Key: ak_...; Bearer and JWT not accepted
# ------------------------------------------------------------------------------------------------
def autype_key() -> str:
    return "ak_" + rand(32)


def test_autype(envoy_factory, keyservice, echo):
    cfg = profile_config("autype")
    good, revoked, expired, disabled = (autype_key() for _ in range(4))
    not_ak = "sk_" + rand(32)  # in the list, but without the ak_ prefix
    document = {
        "version": "autype-1",
        "owners": {"org_1": {"status": "active"}},
        "keys": [
            rec("good", good, "org_1"),
            rec("revoked", revoked, "org_1", status="revoked"),
            rec("expired", expired, "org_1", expires_at=PAST),
            rec("disabled", disabled, "org_1", status="disabled"),
            rec("not_ak", not_ak, "org_1"),
        ],
    }
    path = "/api/v1/dev/documents"
    env = start(envoy_factory, keyservice, echo, cfg, document, {"X-API-Key": good}, path)

    # X-API-Key, header name case-insensitive
    for hname in ("X-API-Key", "x-api-key", "X-API-KEY", "x-ApI-kEy"):
        r = env.request("GET", path, {hname: good})
        assert r.status == 200, (hname, r)
    seen = r.json()["headers"]
    assert seen["x-api-key-owner"] == "org_1"  # keys are bound to the organization
    assert "x-api-key" not in seen
    assert env.request("POST", "/api/v1/dev/render", {"X-API-Key": good}, body="{}").status == 200

    # 401 "API key is required": no API key in the request
    r = env.request("GET", path)
    refusal(cfg, "missing_key", r)
    assert r.json() == {"message": "API key is required", "error": "Unauthorized", "statusCode": 401}
    # Bearer authentication and JWT tokens are not supported: they are no API key
    jwt = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJvcmdfMSJ9.c2lnbmF0dXJl"
    for hdr in ({"Authorization": f"Bearer {good}"}, {"Authorization": f"Bearer {jwt}"},
                {"Authorization": good}, {"X-API-Key": ""}):
        refusal(cfg, "missing_key", env.request("GET", path, hdr))
    refusal(cfg, "missing_key", env.request("GET", f"{path}?api_key={good}"))
    # with a valid X-API-Key an extra Authorization header changes nothing
    assert env.request("GET", path, {"X-API-Key": good, "Authorization": f"Bearer {jwt}"}).status == 200

    # 401 "Invalid or expired API key": only ak_ keys are accepted; unknown, revoked, expired
    for bad in (not_ak, jwt, autype_key(), "AK_" + good[3:], good[:-1]):
        r = env.request("GET", path, {"X-API-Key": bad})
        refusal(cfg, "invalid_key", r)
        assert r.json() == {"message": "Invalid or expired API key", "error": "Unauthorized", "statusCode": 401}
    for k in (revoked, expired, disabled):
        refusal(cfg, "expired_key", env.request("GET", path, {"X-API-Key": k}))
        assert env.request("GET", path, {"X-API-Key": k}).body == env.request("GET", path, {"X-API-Key": not_ak}).body


# ------------------------------------------------------------------------------------------------
# 004 minds -- Authorization: Bearer minds_<48 hex>; plans; GET /api/v1/auth/me
# ------------------------------------------------------------------------------------------------
def minds_key() -> str:
    return "minds_" + secrets.token_hex(24)  # minds_10e9d89a4f88331be68ce05736271bcc58409a26b03a412b


def test_minds(envoy_factory, keyservice, echo):
    cfg = profile_config("minds")
    user = "550e8400-e29b-41d4-a716-446655440000"
    k = {name: minds_key() for name in ("free", "free2", "lite", "premium", "academic", "team", "deleted", "odd", "noplan")}
    odd_owner = 'o"dd\\owner'
    document = {
        "version": "minds-1",
        "plans": {
            "free": {"rate_limits": [{"limit": 2, "window_s": 60}]},
            "lite": {"rate_limits": [{"limit": 30, "window_s": 60}]},
            "premium": {"rate_limits": [{"limit": 600, "window_s": 60}]},
            "academic": {"rate_limits": [{"limit": 600, "window_s": 60}]},
            "team": {"rate_limits": []},
        },
        "keys": [
            rec("k_free", k["free"], user, plan="free"),
            rec("k_free2", k["free2"], "user-free2", plan="free"),
            rec("k_lite", k["lite"], "user-lite", plan="lite"),
            rec("k_premium", k["premium"], "user-premium", plan="premium"),
            rec("k_academic", k["academic"], "user-academic", plan="academic"),
            rec("k_team", k["team"], "user-team", plan="team"),
            rec("k_deleted", k["deleted"], user, plan="premium", status="deleted"),
            rec("k_odd", k["odd"], odd_owner),
            rec("k_noplan", k["noplan"], "user-noplan"),
        ],
    }
    bearer = lambda name: {"Authorization": f"Bearer {k[name]}"}  # noqa: E731
    me = "/api/v1/auth/me"
    env = start(envoy_factory, keyservice, echo, cfg, document, bearer("team"), "/api/v1/api-keys")

    # GET /api/v1/auth/me -> {"id": "<user id>"}, answered by keygate itself
    fresh_window()
    echo.clear()
    r = env.request("GET", me, bearer("free"))
    assert r.status == 200, r
    assert r.json() == {"id": user}
    assert r.headers["content-type"] == "application/json"
    assert echo.requests == []
    assert env.request("GET", me + "?verbose=1", {"authorization": f"bearer {k['team']}"}).json() == {"id": "user-team"}
    assert env.request("GET", me, bearer("odd")).json() == {"id": odd_owner}  # JSON-escaped
    # ... and 401 if the key is missing or invalid
    refusal(cfg, "missing_key", env.request("GET", me))
    refusal(cfg, "invalid_key", env.request("GET", me, {"Authorization": f"Bearer {minds_key()}"}))

    # the other endpoints go to the API with the caller's identity, never the key
    r = env.request("GET", "/api/v1/api-keys", bearer("premium"))
    assert r.status == 200
    seen = r.json()["headers"]
    assert seen["x-api-key-owner"] == "user-premium" and "authorization" not in seen
    assert env.request("POST", "/api/v1/api-keys", bearer("premium") | {"Content-Type": "application/json"},
                       body='{"name":"prod"}').json()["body"] == '{"name":"prod"}'
    assert env.request("DELETE", "/api/v1/api-keys/key-id", bearer("premium")).status == 200

    # 401 {"statusCode":401,"statusMessage":"Unauthorized","message":"Invalid or missing API key"}
    unauth = {"statusCode": 401, "statusMessage": "Unauthorized", "message": "Invalid or missing API key"}
    path = "/api/v1/api-keys"
    r = env.request("GET", path)
    refusal(cfg, "missing_key", r)
    assert r.json() == unauth
    # "Ensure you're using the Bearer prefix": the key alone, or in another header, is missing
    for hdr in ({"Authorization": k["premium"]}, {"X-API-Key": k["premium"]}, {"Authorization": f"Basic {k['premium']}"}):
        refusal(cfg, "missing_key", env.request("GET", path, hdr))
    for hdr in ({"authorization": f"bearer {k['premium']}"}, {"AUTHORIZATION": f"BEARER {k['premium']}"}):
        assert env.request("GET", path, hdr).status == 200
    # invalid: unknown, not a minds_ key, deleted ("Generate a new key if the old one was deleted")
    for bad in (minds_key(), "mind_" + k["premium"][6:], k["premium"].upper(), k["premium"][:-2]):
        r = env.request("GET", path, {"Authorization": f"Bearer {bad}"})
        refusal(cfg, "invalid_key", r)
        assert r.json() == unauth
    r = env.request("GET", path, bearer("deleted"))
    refusal(cfg, "expired_key", r)
    assert r.json() == unauth

    # plans: the key list's plans give each key its limits (here free 2/minute)
    fresh_window()
    rs = [env.request("GET", path, bearer("free2")) for _ in range(3)]
    assert [r.status for r in rs] == [200, 200, 429], rs
    assert [rl_headers(r)[:2] for r in rs] == [(2, 1), (2, 0), (2, 0)]
    r = rs[-1]
    retry = int(r.headers["retry-after"])
    assert r.body == cfg["errors"]["rate_limited"]["body"].replace("{retry_after}", str(retry)).encode()
    assert r.json()["statusCode"] == 429 and r.json()["statusMessage"] == "Too Many Requests"
    assert rl_headers(r)[:2] == (2, 0)
    assert rl_headers(env.request("GET", path, bearer("lite")))[0] == 30
    assert rl_headers(env.request("GET", path, bearer("premium")))[0] == 600
    assert rl_headers(env.request("GET", path, bearer("academic")))[0] == 600
    assert "x-ratelimit-limit" not in env.request("GET", path, bearer("team")).headers
    assert "x-ratelimit-limit" not in env.request("GET", path, bearer("noplan")).headers
