"""Access rules in a real Envoy (--concurrency 2): client IP (source address, X-Forwarded-For with
trusted hops), global ip_allow / ip_deny, per-key allowed_ips, sites, route scopes, path hardening
and identity headers (SPEC §3 steps 1, 2, 3, 9, 10, 11 and "Path matching"; §4 bodies).

Distinct clients are distinct loopback source addresses (127.0.0.2, 127.0.0.3, ...). Envoy's HCM
in the harness neither normalises paths nor touches X-Forwarded-For (use_remote_address is off),
so the filter sees exactly what the client sent."""
from __future__ import annotations

import pytest

from util_rl import BODY, Stack, key, kh, plugin_config, start_stack

pytestmark = pytest.mark.timeout(120)

_ENVOYS: list = []


@pytest.fixture(autouse=True)
def _attach_logs(request):
    # conftest's report hook attaches the log tail of every Envoy in this list to a failing test.
    request.node._keygate_envoys = _ENVOYS
    yield


def _module_stack(cfg: dict, doc: dict, **kw) -> Stack:
    stack = start_stack(cfg, doc, **kw)
    _ENVOYS.append(stack.env)
    return stack


def _teardown(stack: Stack) -> None:
    failures = stack.stop()
    if failures:
        pytest.fail("the wasm VM crashed (SPEC §5):\n" + "\n".join(failures[:20]))


def assert_class(r, status: int, cls: str) -> None:
    assert (r.status, r.body) == (status, BODY[cls]), r
    assert r.headers.get("content-type") == "application/json", r


def assert_upstream(r, path: str | None = None) -> dict:
    """r was allowed and answered by the echo upstream; returns what the upstream received."""
    assert r.status == 200, r
    seen = r.json()
    assert "method" in seen and "header_list" in seen, r  # really the echo, not a filter answer
    if path is not None:
        assert seen["path"] == path
    return seen


# ------------------------------------------------------------------------------------------------
# Envoy 1: source address only (xff_trusted_hops 0), global lists, exempt /swagger, sites by path
# segment, routes with scopes.
# ------------------------------------------------------------------------------------------------
E1_KEYS = {
    "ak_plain": {},
    "ak_read": {"scopes": ["contacts:read"]},
    "ak_write": {"scopes": ["contacts:write"]},
    "ak_cstar": {"scopes": ["contacts:*"]},
    "ak_star": {"scopes": ["*"]},
    "ak_admin": {"scopes": ["admin"]},
    "ak_eread": {"scopes": ["e:read"]},
    "ak_near": {"scopes": ["contacts:rea", "contacts", "contacts:read:x", "contacts:readx", "Contacts:read"]},
    "ak_ip": {"allowed_ips": ["127.0.0.2/32", "10.0.0.0/8"]},
    "ak_mapped": {"allowed_ips": ["::ffff:127.0.0.2/128"]},
    "ak_mapped_cidr": {"allowed_ips": ["::ffff:127.0.0.4/126"]},
    "ak_mapped_bare": {"allowed_ips": ["::ffff:127.0.0.3"]},
    "ak_site": {"sites": ["123", "abc"]},
}

E1_CFG = plugin_config(
    client_ip={"xff_trusted_hops": 0},
    ip_allow=["127.0.0.0/28"],      # 127.0.0.0 - 127.0.0.15
    ip_deny=["127.0.0.13"],         # inside the allow list: deny wins
    exempt=[{"path_prefix": "/swagger"}],
    site={"path_segment": 2},
    routes=[
        {"path_prefix": "/admin", "scope": "admin"},
        {"path_prefix": "/c", "methods": ["POST", "DELETE"], "scope": "contacts:write"},
        {"path_prefix": "/c", "scope": "contacts:read"},
        {"path_prefix": "/cx", "scope": "contactsx:read"},
        {"path_prefix": "/pub"},                                  # no scope: any valid key
        {"path_prefix": "/pub/x", "scope": "never"},              # shadowed by the rule above
        {"path_exact": "/e", "scope": "e:read"},
        {"path_prefix": "/m", "methods": ["PUT"], "scope": "m:put"},
    ],
)


def _doc(keys: dict) -> dict:
    return {"version": "access", "keys": [key(k[3:], k, **extra) for k, extra in keys.items()]}


@pytest.fixture(scope="module")
def e1():
    stack = _module_stack(E1_CFG, _doc(E1_KEYS))
    yield stack
    _teardown(stack)


def test_client_ip_is_source_address_and_xff_is_ignored_without_trusted_hops(e1):
    # Note: with the HCM's default use_remote_address=false, Envoy rewrites the stream's
    # downstream remote address (the wasm `source.address` property) to the rightmost XFF entry;
    # a filter that reads that property sees the client-chosen XFF address, not the connection's.
    # Inside ip_allow -> the IP check passes and the (key-less) request reaches step 5.
    assert_class(e1.get("/v1", source_ip="127.0.0.2"), 401, "missing_key")
    # Outside ip_allow: a spoofed allowed address in X-Forwarded-For must not help.
    for xff in ("127.0.0.2", "127.0.0.2, 127.0.0.2", "10.0.0.1, 127.0.0.2"):
        assert_class(e1.get("/v1", {**kh("ak_plain"), "x-forwarded-for": xff}, source_ip="127.0.0.20"),
                     403, "ip_denied")
    # A denied source cannot escape with an allowed XFF either ...
    assert_class(e1.get("/v1", {**kh("ak_plain"), "x-forwarded-for": "127.0.0.2"}, source_ip="127.0.0.13"),
                 403, "ip_denied")
    # ... and a denied address in XFF does not hurt an allowed source.
    assert_upstream(e1.get("/v1", {**kh("ak_plain"), "x-forwarded-for": "127.0.0.13"}, source_ip="127.0.0.2"))
    # Per-key allowed_ips also use the source address only.
    assert_class(e1.get("/v1", {**kh("ak_ip"), "x-forwarded-for": "127.0.0.2"}, source_ip="127.0.0.3"),
                 403, "ip_denied")


def test_global_deny_wins_over_allow_and_applies_to_exempt_requests(e1):
    # allowed address, valid key and exempt path both pass
    assert_upstream(e1.get("/v1/x", kh("ak_plain"), source_ip="127.0.0.2"))
    assert_upstream(e1.get("/swagger/ui", source_ip="127.0.0.2"), "/swagger/ui")
    # 127.0.0.13 is in ip_allow and in ip_deny: deny wins, for keyed, key-less and exempt requests
    for path, hdrs in (("/v1/x", kh("ak_plain")), ("/v1/x", kh("ak_star")), ("/v1/x", None),
                       ("/swagger", None), ("/swagger/ui", None), ("/v1/x", kh("ak_unknown"))):
        assert_class(e1.get(path, hdrs, source_ip="127.0.0.13"), 403, "ip_denied")
    # 127.0.0.20 is outside a non-empty ip_allow
    for path, hdrs in (("/v1/x", kh("ak_plain")), ("/swagger", None), ("/v1/x", None)):
        assert_class(e1.get(path, hdrs, source_ip="127.0.0.20"), 403, "ip_denied")
    # the boundaries of 127.0.0.0/28
    assert_upstream(e1.get("/v1/x", kh("ak_plain"), source_ip="127.0.0.15"))
    assert_class(e1.get("/v1/x", kh("ak_plain"), source_ip="127.0.0.16"), 403, "ip_denied")
    assert_upstream(e1.get("/v1/x", kh("ak_plain"), source_ip="127.0.0.12"))
    assert_upstream(e1.get("/v1/x", kh("ak_plain"), source_ip="127.0.0.14"))


def test_per_key_allowed_ips(e1):
    assert_upstream(e1.get("/v1/x", kh("ak_ip"), source_ip="127.0.0.2"))
    for ip in ("127.0.0.3", "127.0.0.1", "127.0.0.12"):
        assert_class(e1.get("/v1/x", kh("ak_ip"), source_ip=ip), 403, "ip_denied")
    # other keys are not affected by ak_ip's list
    assert_upstream(e1.get("/v1/x", kh("ak_plain"), source_ip="127.0.0.3"))


def test_ipv4_mapped_entries_in_allowed_ips_match_ipv4_clients(e1):
    # "::ffff:127.0.0.2/128" is 127.0.0.2/32
    assert_upstream(e1.get("/v1/x", kh("ak_mapped"), source_ip="127.0.0.2"))
    assert_class(e1.get("/v1/x", kh("ak_mapped"), source_ip="127.0.0.3"), 403, "ip_denied")
    # "::ffff:127.0.0.4/126" is 127.0.0.4/30 (127.0.0.4 - 127.0.0.7)
    for ip in ("127.0.0.4", "127.0.0.7"):
        assert_upstream(e1.get("/v1/x", kh("ak_mapped_cidr"), source_ip=ip))
    for ip in ("127.0.0.3", "127.0.0.8"):
        assert_class(e1.get("/v1/x", kh("ak_mapped_cidr"), source_ip=ip), 403, "ip_denied")
    # a bare mapped address
    assert_upstream(e1.get("/v1/x", kh("ak_mapped_bare"), source_ip="127.0.0.3"))
    assert_class(e1.get("/v1/x", kh("ak_mapped_bare"), source_ip="127.0.0.2"), 403, "ip_denied")


@pytest.mark.parametrize("path,allowed", [
    ("/v1/123/x", True),
    ("/v1/abc", True),
    ("/v1/123?site=999", True),
    ("/v1//123", True),            # `//` merged: segment 2 is 123
    ("/v1/./123/x", True),
    ("/zz/../v1/123", True),
    ("/v1/%31%32%33", True),       # percent-encoded unreserved characters decode
    ("/v1/999/x", False),
    ("/v1/123x", False),
    ("/v1", False),                # no segment 2
    ("/", False),
    ("/v1/", False),               # empty segment 2
    ("/123/v1", False),
])
def test_site_from_path_segment(e1, path, allowed):
    r = e1.get(path, kh("ak_site"))
    if allowed:
        assert_upstream(r, path)
    else:
        assert_class(r, 403, "forbidden")
    # a key without `sites` is not restricted
    assert_upstream(e1.get(path, kh("ak_plain")))


ROUTE_CASES = [
    # key, method, path, allowed
    ("ak_read", "GET", "/c", True),
    ("ak_read", "GET", "/c/1", True),
    ("ak_read", "HEAD", "/c/1", True),
    ("ak_read", "POST", "/c", False),
    ("ak_read", "DELETE", "/c/1", False),
    ("ak_write", "POST", "/c", True),
    ("ak_write", "DELETE", "/c/9", True),
    ("ak_write", "GET", "/c", False),
    ("ak_write", "PUT", "/c", False),           # PUT is not in the write rule: the read rule applies
    ("ak_cstar", "GET", "/c", True),
    ("ak_cstar", "POST", "/c/2", True),
    ("ak_cstar", "GET", "/cx", False),          # contacts:* does not cover contactsx:read
    ("ak_read", "GET", "/cx", False),
    ("ak_star", "GET", "/admin", True),
    ("ak_star", "POST", "/c", True),
    ("ak_star", "GET", "/cx/1", True),
    ("ak_star", "GET", "/e", True),
    ("ak_admin", "GET", "/admin/users", True),
    ("ak_admin", "GET", "/c", False),
    ("ak_plain", "GET", "/c", False),           # no scopes at all
    ("ak_plain", "GET", "/admin", False),
    ("ak_near", "GET", "/c", False),            # near misses of contacts:read
    ("ak_plain", "GET", "/other", True),        # no matching rule: any valid key
    ("ak_plain", "GET", "/pub", True),          # rule without scope
    ("ak_plain", "GET", "/pub/x", True),        # first matching rule (no scope) wins over /pub/x
    ("ak_plain", "GET", "/publish", True),      # /pub does not match /publish; no rule matches
    ("ak_plain", "GET", "/e", False),           # path_exact
    ("ak_eread", "GET", "/e", True),
    ("ak_plain", "GET", "/e/x", True),          # path_exact does not match below it
    ("ak_plain", "GET", "/e?x=1", False),       # the query is not part of the path
    ("ak_plain", "GET", "/m", True),            # method-restricted rule does not match GET
    ("ak_plain", "PUT", "/m", False),
]


@pytest.mark.parametrize("secret,method,path,allowed", ROUTE_CASES)
def test_route_scopes(e1, secret, method, path, allowed):
    r = e1.req(method, path, kh(secret))
    if allowed:
        assert r.status == 200, r
        if method != "HEAD":
            assert_upstream(r, path)
    elif method == "HEAD":
        assert r.status == 403, r
    else:
        assert_class(r, 403, "forbidden")


# Exempt prefix /swagger: key-less requests that resolve inside it go upstream (200), the ones that
# resolve elsewhere are not exempt (401 missing_key).
EXEMPT_HARDENING = [
    ("/swagger/../admin", False),
    ("/swagger/%2e%2e/admin", False),
    ("/swagger/%2E%2E/admin", False),
    ("/swagger/.%2e/admin", False),
    ("/swagger%2F..%2Fadmin", False),
    ("/swagger%2f..%2fadmin", False),
    ("/swagger\\..\\admin", False),
    ("/swagger%5C..%5Cadmin", False),
    ("/swagger/ui/../../admin", False),
    ("/swagger/./../admin", False),
    ("/swagger/..", False),
    ("/swaggerx", False),
    ("/swagger.json", False),
    ("/api/swagger", False),
    ("/admin?/swagger", False),
    ("/swagger", True),
    ("/swagger/", True),
    ("//swagger", True),
    ("//swagger//ui", True),
    ("/\\swagger", True),
    ("/./swagger", True),
    ("/swagger/./ui", True),
    ("/swagger/ui/../index.html", True),
    ("/admin/../swagger/ui", True),
    ("/x/..%2Fswagger", True),
    ("/x%5C..%5Cswagger/ui", True),
    ("/swagger/%2e%2e/swagger/ui", True),
    ("/swagger%2Fui", True),
    ("/%73wagger", True),
    ("/swagger?next=/../admin", True),
]


@pytest.mark.parametrize("path,exempt", EXEMPT_HARDENING)
def test_exempt_prefix_path_hardening(e1, path, exempt):
    r = e1.get(path, source_ip="127.0.0.2")
    if exempt:
        seen = assert_upstream(r)
        if not path.startswith("//"):      # Python's http.server collapses a leading "//" itself
            assert seen["path"] == path    # the raw path goes upstream, unchanged
    else:
        assert_class(r, 401, "missing_key")


# Route /admin needs scope "admin": ak_read must be refused on every spelling that resolves to
# /admin or below, and allowed where the path is really elsewhere.
SCOPED_HARDENING = [
    ("/admin", True),
    ("/admin/", True),
    ("/admin//x", True),
    ("//admin", True),
    ("/admin/.", True),
    ("/%61dmin", True),
    ("/%61%64%6D%69%6E/x", True),
    ("/adm%69n", True),
    ("/x/../admin", True),
    ("/x/%2e%2e/admin/y", True),
    ("/x%2F..%2Fadmin", True),
    ("/x\\..\\admin", True),
    ("/admin%2Fx", True),
    ("/admin?x=1", True),
    ("/adminx", False),
    ("/admin.x", False),
    ("/admin/../other", False),
    ("/x/admin", False),
]


@pytest.mark.parametrize("path,scoped", SCOPED_HARDENING)
def test_scoped_prefix_path_hardening(e1, path, scoped):
    r = e1.get(path, kh("ak_read"))
    if scoped:
        assert_class(r, 403, "forbidden")
        # the key that holds the scope gets through, and the raw path goes upstream
        seen = assert_upstream(e1.get(path, kh("ak_admin")))
        if not path.startswith("//"):
            assert seen["path"] == path
    else:
        assert_upstream(r, path)


def test_client_sent_identity_headers_never_reach_upstream(e1):
    spoof = [("X-Api-Key-Id", "spoof-id"), ("x-api-key-id", "spoof-2"), ("X-API-KEY-OWNER", "spoof-owner")]
    # exempt request: no identity at all upstream
    seen = assert_upstream(e1.get("/swagger/ui", spoof, source_ip="127.0.0.2"))
    names = [k for k, _ in seen["header_list"]]
    assert "x-api-key-id" not in names and "x-api-key-owner" not in names, seen["header_list"]
    # allowed request: exactly the filter's identity, once each; the credential is stripped
    seen = assert_upstream(e1.get("/v1/x", spoof + [("x-api-key", "ak_plain")], source_ip="127.0.0.2"))
    ids = [v for k, v in seen["header_list"] if k == "x-api-key-id"]
    owners = [v for k, v in seen["header_list"] if k == "x-api-key-owner"]
    assert ids == ["plain"] and owners == ["org-1"], seen["header_list"]
    assert "x-api-key" not in seen["headers"]
    # no-scope route too
    seen = assert_upstream(e1.get("/pub", spoof + [("x-api-key", "ak_read")]))
    assert [v for k, v in seen["header_list"] if k == "x-api-key-id"] == ["read"]


# ------------------------------------------------------------------------------------------------
# Envoy 2: xff_trusted_hops 2, site from a header, a global deny that only an XFF address hits.
# ------------------------------------------------------------------------------------------------
E2_KEYS = {
    "ak_ip2": {"allowed_ips": ["127.0.0.2"]},
    "ak_hsite": {"sites": ["s1", "s2"]},
    "ak_any": {},
}
E2_CFG = plugin_config(
    client_ip={"xff_trusted_hops": 2},
    ip_deny=["198.51.100.7/32"],
    site={"header": "x-site"},
)


@pytest.fixture(scope="module")
def e2():
    stack = _module_stack(E2_CFG, _doc(E2_KEYS))
    yield stack
    _teardown(stack)


XFF_CASES = [
    # source, X-Forwarded-For (None: absent), client IP 127.0.0.2 expected (-> allowed for ak_ip2)
    ("127.0.0.3", "127.0.0.2, 127.0.0.9", True),                  # 2nd from the right
    ("127.0.0.3", "127.0.0.3, 127.0.0.2, 127.0.0.9", True),
    ("127.0.0.3", "127.0.0.2,127.0.0.9", True),                   # no space after the comma
    ("127.0.0.3", "  127.0.0.2 ,  127.0.0.9  ", True),
    ("127.0.0.3", "::ffff:127.0.0.2, 127.0.0.9", True),           # IPv4-mapped counts as IPv4
    ("127.0.0.3", "127.0.0.2, 127.0.0.3, 127.0.0.9", False),      # the 3rd from the right is not used
    ("127.0.0.2", "127.0.0.9, 127.0.0.2", False),                 # rightmost is not the 2nd
    ("127.0.0.2", "127.0.0.3, 127.0.0.9", False),                 # XFF wins over the source
    ("127.0.0.2", "2001:db8::1, 127.0.0.9", False),
    ("127.0.0.3", "127.0.0.2", False),                            # too few entries: source
    ("127.0.0.2", "127.0.0.3", True),
    ("127.0.0.2", None, True),
    ("127.0.0.3", None, False),
    ("127.0.0.2", "not-an-ip, 127.0.0.9", True),                  # garbage: source
    ("127.0.0.3", "not-an-ip, 127.0.0.9", False),
    ("127.0.0.2", "999.0.0.1, 127.0.0.9", True),
    ("127.0.0.2", "127.0.0.3/32, 127.0.0.9", True),
    ("127.0.0.2", ", 127.0.0.9", True),
    ("127.0.0.2", "", True),
]


@pytest.mark.parametrize("source,xff,allowed", XFF_CASES)
def test_xff_trusted_hops(e2, source, xff, allowed):
    hdrs = kh("ak_ip2") if xff is None else {**kh("ak_ip2"), "x-forwarded-for": xff}
    r = e2.get("/x", hdrs, source_ip=source)
    if allowed:
        assert_upstream(r)
    else:
        assert_class(r, 403, "ip_denied")


def test_xff_client_ip_is_checked_against_global_lists(e2):
    hdrs = {**kh("ak_any"), "x-forwarded-for": "198.51.100.7, 127.0.0.9"}
    assert_class(e2.get("/x", hdrs, source_ip="127.0.0.2"), 403, "ip_denied")
    assert_class(e2.get("/x", {"x-forwarded-for": "198.51.100.7, 127.0.0.9"}, source_ip="127.0.0.2"), 403, "ip_denied")
    # neighbours and the deny address in the wrong position pass
    assert_upstream(e2.get("/x", {**kh("ak_any"), "x-forwarded-for": "198.51.100.8, 127.0.0.9"}, source_ip="127.0.0.2"))
    assert_upstream(e2.get("/x", {**kh("ak_any"), "x-forwarded-for": "127.0.0.9, 198.51.100.7"}, source_ip="127.0.0.2"))
    assert_upstream(e2.get("/x", {**kh("ak_any"), "x-forwarded-for": "198.51.100.7"}, source_ip="127.0.0.2"))


@pytest.mark.parametrize("site,allowed", [("s1", True), ("s2", True), ("s3", False), ("S1", False),
                                           ("", False), (None, False)])
def test_site_from_header(e2, site, allowed):
    hdrs = kh("ak_hsite") if site is None else {**kh("ak_hsite"), "x-site": site}
    r = e2.get("/s1/s2", hdrs)  # the path is irrelevant with a header site
    if allowed:
        assert_upstream(r)
    else:
        assert_class(r, 403, "forbidden")
    # keys without sites ignore it
    assert_upstream(e2.get("/x", kh("ak_any") if site is None else {**kh("ak_any"), "x-site": site}))


# ------------------------------------------------------------------------------------------------
# Envoy 3: global lists written in IPv4-mapped IPv6 form.
# ------------------------------------------------------------------------------------------------
E3_CFG = plugin_config(
    ip_allow=["::ffff:127.0.0.0/125"],     # 127.0.0.0 - 127.0.0.7
    ip_deny=["::ffff:127.0.0.5/128"],
    exempt=[{"path_prefix": "/swagger"}],
)


@pytest.fixture(scope="module")
def e3():
    stack = _module_stack(E3_CFG, _doc({"ak_any": {}}))
    yield stack
    _teardown(stack)


def test_ipv4_mapped_entries_in_global_lists(e3):
    for ip in ("127.0.0.2", "127.0.0.7"):
        assert_upstream(e3.get("/x", kh("ak_any"), source_ip=ip))
        assert_class(e3.get("/x", source_ip=ip), 401, "missing_key")
    for ip in ("127.0.0.5", "127.0.0.8", "127.0.0.20"):
        assert_class(e3.get("/x", kh("ak_any"), source_ip=ip), 403, "ip_denied")
        assert_class(e3.get("/swagger", source_ip=ip), 403, "ip_denied")
