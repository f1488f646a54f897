#!/usr/bin/env python3
"""keygate in nginx with Kong's ngx_wasm_module: the key scenarios against a real nginx.

Usage (stdlib only; from the repository root, after `make build`):

    KEYGATE_NGINX=/path/to/nginx python3 tests/nginx/run_nginx.py     # or: make test-nginx

KEYGATE_NGINX   an nginx binary built with ngx_wasm_module (see envoy/examples/nginx/README.md).
                Unset: the runner prints why it skips and exits 0.
KEYGATE_WASM    the filter (default target/wasm32-wasip1/release/keygate.wasm).
KEYGATE_KEEP_NGINX=1   keep each nginx's temporary prefix (nginx.conf, error.log, access.log).
KEYGATE_NGINX_START_TIMEOUT   seconds to wait for nginx to serve (default 60; each worker
                compiles the module at start, which takes a few seconds with Wasmtime).

Each nginx runs in the foreground (`daemon off`) from a temporary prefix, on 127.0.0.1 ports that
were free a moment before, with `error_log ... info` (the filter logs at info) and an access log
that records the worker pid of every request. The key service is tests/support/keyservice.py and
the upstream tests/support/echo.py, both in this process.

One nginx (master + `worker_processes 2`, `listen ... reuseport` so that fresh connections are
spread over both workers) carries two servers with two filter configurations that share one key
list: "main" (credentials, exempt rules, per-key limits) and "allow" (the same plus a global
`ip_allow`). Clients pick their source address (127.0.0.2, 127.0.0.3, ...) on loopback. The
configuration-error scenario starts nginx twice more (master on, then master off).

Every scenario prints PASS or FAIL with what was observed; lines starting with NOTE record host
behaviour that is tolerated but differs from Envoy. The last line is `N passed, M failed`; the exit
status is 1 when anything failed.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl, urlsplit

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "support"))

from echo import EchoServer  # noqa: E402
from keyservice import KeyService, sha256_hex  # noqa: E402

WASM = Path(os.environ.get("KEYGATE_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "keygate.wasm"))
KEEP = os.environ.get("KEYGATE_KEEP_NGINX") == "1"
START_TIMEOUT = float(os.environ.get("KEYGATE_NGINX_START_TIMEOUT", "60"))

# SPEC §4 default bodies and statuses.
BODIES = {
    "missing_key": '{"error":{"code":"missing_key","message":"API key is required"}}',
    "invalid_key": '{"error":{"code":"invalid_key","message":"Invalid API key"}}',
    "expired_key": '{"error":{"code":"expired_key","message":"API key expired or revoked"}}',
    "forbidden": '{"error":{"code":"forbidden","message":"API key has no access to this resource"}}',
    "ip_denied": '{"error":{"code":"ip_denied","message":"Client IP address not allowed"}}',
    "rate_limited": '{"error":{"code":"rate_limited","message":"Rate limit exceeded","retry_after":{retry_after}}}',
    "unavailable": '{"error":{"code":"unavailable","message":"API key list not loaded"}}',
}
STATUS = {"missing_key": 401, "invalid_key": 401, "expired_key": 401, "forbidden": 403,
          "ip_denied": 403, "rate_limited": 429, "unavailable": 503}

# What envoy/examples/nginx/nginx.conf puts around `proxy_wasm` (keep the two in step).
SERVER_DIRECTIVES: list[str] = [
    # keygate writes the identity into these (server level: a location-level `set` runs after
    # the filter and would reset them).
    'set $keygate_key_id "";',
    'set $keygate_key_owner "";',
]
LOCATION_DIRECTIVES: list[str] = [
    # Identity from the filter's variables; every client-sent copy is dropped.
    "proxy_set_header X-Api-Key-Id $keygate_key_id;",
    "proxy_set_header X-Api-Key-Owner $keygate_key_owner;",
    # The credential headers: the filter blanks a consumed one in place, which nginx then drops.
    'proxy_set_header X-Api-Key "";',
    "proxy_set_header Authorization $http_authorization;",
    # proxy_pass without a URI part + this rewrite: the upstream gets the filter's $uri/$args,
    # re-escaped by nginx (see the example's comments).
    "rewrite ^ $uri break;",
]

# ------------------------------------------------------------------------------------------------
# keys and configurations
# ------------------------------------------------------------------------------------------------
K = {
    "live": "ak_live_0123456789",
    "expired": "ak_expired_0123456789",
    "revoked": "ak_revoked_0123456789",
    "seq": "ak_seq_0123456789",
    "burst": "ak_burst_0123456789",
    "ip2": "ak_ip2_0123456789",
    "victim": "ak_victim_0123456789",
    "gone": "ak_gone_0123456789",
    "late": "ak_late_0123456789",  # only in the bad list
}
SEQ_LIMIT = 5
BURST_LIMIT = 20
BURST_REQUESTS = 60
WINDOW_S = 3600
REFRESH_S = 1
TIMEOUT_MS = 2000


def key(kid: str, plaintext: str, owner: str = "org-a", **fields: Any) -> dict:
    return {"id": kid, "hash": sha256_hex(plaintext), "owner": owner, **fields}


def document(version: str, victim_status: str = "active", with_gone: bool = True, extra: list | None = None) -> dict:
    keys = [
        key("key_live", K["live"], rate_limits=[]),
        key("key_expired", K["expired"], expires_at="2020-01-01T00:00:00Z"),
        key("key_revoked", K["revoked"], status="revoked"),
        key("key_seq", K["seq"], rate_limits=[{"limit": SEQ_LIMIT, "window_s": WINDOW_S}]),
        key("key_burst", K["burst"], rate_limits=[{"limit": BURST_LIMIT, "window_s": WINDOW_S}]),
        key("key_ip2", K["ip2"], allowed_ips=["127.0.0.2/32"], rate_limits=[]),
        key("key_victim", K["victim"], status=victim_status, rate_limits=[]),
    ]
    if with_gone:
        keys.append(key("key_gone", K["gone"], rate_limits=[]))
    keys += extra or []
    return {"version": version, "owners": {"org-a": {"status": "active"}}, "keys": keys}


def plugin_config(ks_port: int, **top: Any) -> dict:
    addr = f"127.0.0.1:{ks_port}"  # ngx_wasm_module: dispatch_http_call takes host:port
    return {
        "key_list": {"cluster": addr, "authority": addr, "path": "/v1/keys",
                     "refresh_s": REFRESH_S, "timeout_ms": TIMEOUT_MS},
        "credentials": [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"},
                        {"query": "api_key"}],
        "key_prefixes": ["ak_"],
        "exempt": [{"path_prefix": "/swagger"}, {"method": "GET", "path_exact": "/healthz"}],
        "rate_limit": {"headers": "x-ratelimit"},
        **top,
    }


# ------------------------------------------------------------------------------------------------
# HTTP client (fresh connection per request, chosen source address, raw header list)
# ------------------------------------------------------------------------------------------------
class Response:
    def __init__(self, status: int, header_list: list[tuple[str, str]], body: bytes):
        self.status = status
        self.header_list = [(k.lower(), v) for k, v in header_list]
        self.body = body

    def header(self, name: str) -> str | None:
        for k, v in self.header_list:
            if k == name:
                return v
        return None

    def headers_named(self, name: str) -> list[str]:
        return [v for k, v in self.header_list if k == name]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def echo(self) -> dict:
        """The echo upstream's document (asserts the request reached it)."""
        assert self.status == 200, f"expected the upstream's 200, got {self.describe()}"
        try:
            d = json.loads(self.body)
        except ValueError:
            raise AssertionError(f"not an echo answer: {self.describe()}") from None
        assert isinstance(d, dict) and "header_list" in d, f"not an echo answer: {self.describe()}"
        return d

    def describe(self) -> str:
        return f"{self.status} {self.body[:240]!r}"


def request(port: int, path: str, headers: list[tuple[str, str]] | dict | None = None, method: str = "GET",
            source: str = "127.0.0.1", timeout: float = 10.0) -> Response:
    items = list(headers.items()) if isinstance(headers, dict) else list(headers or [])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout, source_address=(source, 0))
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in items:
            conn.putheader(k, v)
        conn.putheader("Connection", "close")
        conn.endheaders()
        r = conn.getresponse()
        return Response(r.status, r.getheaders(), r.read())
    finally:
        conn.close()


def echo_values(d: dict, name: str) -> list[str]:
    return [v for k, v in d["header_list"] if k == name]


def wrong_identity(d: dict) -> str | None:
    """What the upstream saw, when it is not key_live's identity exactly once."""
    ids, owners = echo_values(d, "x-api-key-id"), echo_values(d, "x-api-key-owner")
    return None if (ids, owners) == (["key_live"], ["org-a"]) else f"id={ids} owner={owners}"


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = pred()
            if last:
                return last
        except Exception as e:  # noqa: BLE001 - polled condition
            last = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout}s (last: {last!r:.300})")
        time.sleep(interval)


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ------------------------------------------------------------------------------------------------
# nginx
# ------------------------------------------------------------------------------------------------
class Nginx:
    """One nginx (foreground, temporary prefix). servers: list of (port, plugin config dict)."""

    def __init__(self, binary: str, servers: list[tuple[int, dict]], echo_port: int,
                 workers: int = 2, master: bool = True, name: str = "nginx"):
        self.binary = binary
        self.servers = servers
        self.prefix = Path(tempfile.mkdtemp(prefix=f"keygate-{name}-"))
        os.chmod(self.prefix, 0o755)  # workers run as `nobody` when nginx starts as root
        self.wasm = self.prefix / "keygate.wasm"
        shutil.copyfile(WASM, self.wasm)
        os.chmod(self.wasm, 0o644)
        self.error_log = self.prefix / "error.log"
        self.access_log = self.prefix / "access.log"
        self.conf = self.prefix / "nginx.conf"
        self.conf.write_text(self._conf(echo_port, workers, master))
        self.proc: subprocess.Popen | None = None

    def _conf(self, echo_port: int, workers: int, master: bool) -> str:
        blocks = []
        for port, cfg in self.servers:
            raw = json.dumps(cfg, separators=(",", ":"))
            assert "'" not in raw and "\\" not in raw, "config must not need nginx escaping"
            server_extra = "".join(f"\n        {d}" for d in SERVER_DIRECTIVES)
            location_extra = "".join(f"\n            {d}" for d in LOCATION_DIRECTIVES)
            blocks.append(f"""
    server {{
        listen 127.0.0.1:{port} reuseport;{server_extra}
        location = /__ready {{ return 204; }}
        location / {{
            proxy_wasm keygate '{raw}';{location_extra}
            proxy_pass http://keygate_echo;
        }}
    }}""")
        return f"""# written by tests/nginx/run_nginx.py
daemon off;
master_process {'on' if master else 'off'};
worker_processes {workers};
pid {self.prefix}/nginx.pid;
error_log {self.error_log} info;
events {{ worker_connections 1024; }}

wasm {{
    module keygate {self.wasm};
    shm_kv * 64m eviction=none;
}}

http {{
    log_format keygate '$pid $remote_addr "$request" $status';
    access_log {self.access_log} keygate;
    client_body_temp_path {self.prefix}/client_body_temp;
    proxy_temp_path {self.prefix}/proxy_temp;
    upstream keygate_echo {{ server 127.0.0.1:{echo_port}; }}
{''.join(blocks)}
}}
"""

    def start(self) -> "Nginx":
        self.proc = subprocess.Popen(
            [self.binary, "-p", str(self.prefix), "-c", str(self.conf), "-e", str(self.error_log)],
            stdout=subprocess.DEVNULL, stderr=open(self.prefix / "stderr.log", "wb"),
            start_new_session=True)
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        port = self.servers[0][0]
        deadline = time.monotonic() + timeout
        while True:
            if self.proc and self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if request(port, "/__ready", timeout=2).status == 204:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"nginx not serving within {timeout}s:\n{self.tail()}")
            time.sleep(0.2)

    def log(self) -> str:
        try:
            return self.error_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, n: int = 40) -> str:
        err = (self.prefix / "stderr.log")
        extra = err.read_text(errors="replace") if err.exists() else ""
        return "\n".join((self.log() + extra).splitlines()[-n:])

    def access_pids(self) -> list[tuple[str, str]]:
        """(pid, request line) of every logged request."""
        try:
            text = self.access_log.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            m = re.match(r'(\d+) \S+ "([^"]*)" (\d+)', line)
            if m:
                out.append((m.group(1), m.group(2)))
        return out

    def worker_pids(self) -> set[int]:
        if not self.proc:
            return set()
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True).stdout
        except FileNotFoundError:
            return set()
        return {int(x) for x in out.split()}

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if not KEEP:
            shutil.rmtree(self.prefix, ignore_errors=True)
        else:
            print(f"    (kept {self.prefix})")


# ------------------------------------------------------------------------------------------------
# scenario bookkeeping
# ------------------------------------------------------------------------------------------------
RESULTS: list[tuple[str, bool, str]] = []
NOTES: list[str] = []


def note(msg: str) -> None:
    if msg not in NOTES:
        NOTES.append(msg)
        print(f"  NOTE {msg}", flush=True)


def scenario(name: str, fn: Callable[[], Any]) -> bool:
    t0 = time.monotonic()
    try:
        detail = fn() or ""
        ok = True
    except AssertionError as e:
        ok, detail = False, str(e)
    except Exception as e:  # noqa: BLE001 - report and go on
        ok, detail = False, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
    RESULTS.append((name, ok, detail))
    dt = time.monotonic() - t0
    print(f"{'PASS' if ok else 'FAIL'} {name} ({dt:.1f}s){': ' + detail if detail else ''}", flush=True)
    return ok


def refusal(r: Response, cls: str, what: str, **subst: Any) -> None:
    """r is keygate's default refusal of class cls (status, JSON body, content type)."""
    expected = BODIES[cls]
    for k, v in subst.items():
        expected = expected.replace("{" + k + "}", str(v))
    assert r.status == STATUS[cls], f"{what}: expected {cls} {STATUS[cls]}, got {r.describe()}"
    body = r.text
    if body == expected + "\n":
        note("local response bodies get a trailing newline from ngx_wasm_module "
             "(body is the SPEC body + '\\n')")
        body = body[:-1]
    assert body == expected, f"{what}: body {body!r}, expected {expected!r}"
    ct = r.header("content-type")
    assert ct == "application/json", f"{what}: content-type {ct!r}"


def summarize(lines: list[str], limit: int) -> list[str]:
    """Log lines without their timestamp/pid/connection prefix, each once with a count."""
    counts: dict[str, int] = {}
    for ln in lines:
        key_ = re.sub(r"^\S+ \S+ \[(\w+)\] \d+#\d+: (\*\d+ )?", r"[\1] ", ln)
        counts[key_] = counts.get(key_, 0) + 1
    out = [f"{n:5d} x {k}" for k, n in counts.items()]
    return out[-limit:]


def window_end(now: float, w: int = WINDOW_S) -> int:
    return (int(now) // w + 1) * w


def avoid_window_edge(margin: float = 15.0, w: int = WINDOW_S) -> None:
    left = window_end(time.time(), w) - time.time()
    if left < margin:
        print(f"    (waiting {left + 1:.0f}s for the next {w}s window)", flush=True)
        time.sleep(left + 1)


# ------------------------------------------------------------------------------------------------
# the scenarios
# ------------------------------------------------------------------------------------------------
class Env:
    def __init__(self, nginx_bin: str):
        self.nginx_bin = nginx_bin
        self.ks = KeyService(document("v1")).start()
        self.echo = EchoServer().start()
        self.main_port, self.allow_port = free_ports(2)
        self.main_cfg = plugin_config(self.ks.port)
        self.allow_cfg = plugin_config(self.ks.port, ip_allow=["127.0.0.1/32", "127.0.0.2/32"])
        self.nginx: Nginx | None = None

    def get(self, path: str = "/r", headers=None, method: str = "GET", source: str = "127.0.0.1",
            port: int | None = None) -> Response:
        return request(port or self.main_port, path, headers, method, source)

    def stop(self) -> None:
        if self.nginx:
            self.nginx.stop()
        self.echo.stop()
        self.ks.stop()


def s_unavailable_then_loaded(env: Env) -> str:
    env.ks.status = 500  # the key service fails until we let it answer
    env.nginx = Nginx(env.nginx_bin, [(env.main_port, env.main_cfg), (env.allow_port, env.allow_cfg)],
                      env.echo.port, workers=2, master=True, name="main").start()
    env.nginx.wait_ready()
    wait_until(lambda: env.ks.count >= 1, 10, "a first key-list fetch")
    for i in range(4):  # fresh connections: both workers
        refusal(env.get("/r", {"x-api-key": K["live"]}), "unavailable", f"before the first list (#{i})")
    refusal(env.get("/r"), "unavailable", "no key, no list (step 4 comes before step 5)")
    env.ks.reset()
    t0 = time.monotonic()
    wait_until(lambda: env.get("/r", {"x-api-key": K["live"]}).status == 200, 10, "allowed once the list loads")
    dt = time.monotonic() - t0
    for i in range(6):
        r = env.get("/r", {"x-api-key": K["live"]})
        assert r.status == 200, f"request {i} after loading: {r.describe()}"
    return f"503 unavailable while the key service answered 500; allowed {dt:.1f}s after it recovered"


def s_allowed_identity_and_strip(env: Env) -> str:
    def identity(d: dict, what: str) -> None:
        got = (echo_values(d, "x-api-key-id"), echo_values(d, "x-api-key-owner"))
        assert got == (["key_live"], ["org-a"]), (
            f"{what}: upstream got x-api-key-id={got[0]} x-api-key-owner={got[1]} "
            f"(expected ['key_live'] ['org-a']); upstream headers {d['header_list']}")

    d = env.get("/items?x=1", [("x-api-key", K["live"]), ("x-other", "kept")]).echo()
    identity(d, "x-api-key")
    assert echo_values(d, "x-api-key") == [], f"x-api-key credential reached the upstream: {d['header_list']}"
    assert echo_values(d, "x-other") == ["kept"], d["header_list"]
    assert echo_values(d, "host") == ["keygate_echo"], f"Host sent {echo_values(d, 'host')} (nginx sets it once)"
    assert d["path"] == "/items?x=1", d["path"]
    for value in (f"Bearer {K['live']}", f"bearer {K['live']}"):
        d = env.get("/b", {"authorization": value}).echo()
        identity(d, f"authorization {value[:7]}")
        assert echo_values(d, "authorization") == [], f"{value!r}: authorization reached the upstream: {d['header_list']}"
    d = env.get("/b", {"authorization": "Basic dXNlcjpwYXNz", "x-api-key": K["live"]}).echo()
    assert echo_values(d, "authorization") == ["Basic dXNlcjpwYXNz"], f"an unused Authorization must stay: {d['header_list']}"
    d = env.get("/dup", [("x-api-key", K["live"]), ("x-api-key", K["live"])]).echo()
    assert echo_values(d, "x-api-key") == [], f"a credential sent twice reached the upstream: {d['header_list']}"
    r = env.get("/items", {"x-api-key": K["live"]})
    assert r.header("x-ratelimit-limit") is None, "a key without limits gets no rate-limit headers"
    return ("x-api-key-id/x-api-key-owner set; x-api-key (also sent twice) and Authorization: Bearer removed, "
            "Authorization: Basic kept")


def s_refusals(env: Env) -> str:
    refusal(env.get("/items"), "missing_key", "no credential")
    refusal(env.get("/items", {"authorization": "Basic dXNlcjpwYXNz"}), "missing_key", "other scheme")
    refusal(env.get("/items", {"x-api-key": ""}), "missing_key", "empty x-api-key")
    refusal(env.get("/items", {"x-api-key": "ak_unknown_key"}), "invalid_key", "unknown key")
    refusal(env.get("/items", {"x-api-key": "zz_no_prefix"}), "invalid_key", "wrong prefix")
    refusal(env.get("/items", {"x-api-key": "ak_" + "x" * 1030}), "invalid_key", "over 1024 bytes")
    refusal(env.get("/items", {"x-api-key": K["expired"]}), "expired_key", "expired key")
    refusal(env.get("/items", {"x-api-key": K["revoked"]}), "expired_key", "revoked key")
    refusal(env.get("/items", {"authorization": f"Bearer {K['expired']}"}), "expired_key", "expired Bearer key")
    return "missing 401, invalid 401, expired/revoked 401 with the SPEC bodies"


def s_identity_headers_never_forwarded(env: Env) -> str:
    spoof = [("x-api-key-id", "spoofed"), ("x-api-key-owner", "spoofed-owner")]
    problems = []
    d = env.get("/a", [("x-api-key", K["live"])] + spoof).echo()
    if echo_values(d, "x-api-key-id") != ["key_live"] or echo_values(d, "x-api-key-owner") != ["org-a"]:
        problems.append(f"allowed request: upstream saw id={echo_values(d, 'x-api-key-id')} "
                        f"owner={echo_values(d, 'x-api-key-owner')}")
    d = env.get("/a", [("x-api-key", K["live"])] + spoof + [("x-api-key-id", "spoofed-2")]).echo()
    if echo_values(d, "x-api-key-id") != ["key_live"]:
        problems.append(f"allowed request, two client copies: upstream saw id={echo_values(d, 'x-api-key-id')}")
    d = env.get("/swagger/ui", spoof).echo()
    if echo_values(d, "x-api-key-id") or echo_values(d, "x-api-key-owner"):
        problems.append(f"exempt request: upstream saw id={echo_values(d, 'x-api-key-id')} "
                        f"owner={echo_values(d, 'x-api-key-owner')}")
    d = env.get("/a?api_key=" + K["live"], spoof).echo()  # one edit more: the path
    if wrong := wrong_identity(d):
        problems.append(f"allowed query-key request: upstream saw {wrong}")
    assert not problems, "; ".join(problems)
    return "client-sent x-api-key-id/x-api-key-owner replaced (allowed) or dropped (exempt)"


def s_header_name_case(env: Env) -> str:
    """nginx hands the filter the header names as the client wrote them (Envoy lowercases)."""
    problems = []
    for headers in ([("X-API-Key", K["live"])], [("X-Api-Key", K["live"])],
                    [("Authorization", f"Bearer {K['live']}")], [("AUTHORIZATION", f"Bearer {K['live']}")]):
        r = env.get("/case", headers)
        if r.status != 200:
            problems.append(f"{headers[0][0]}: {r.describe()}")
            continue
        d = r.echo()
        if echo_values(d, "x-api-key-id") != ["key_live"]:
            problems.append(f"{headers[0][0]}: upstream id {echo_values(d, 'x-api-key-id')}")
        if echo_values(d, headers[0][0].lower()):
            problems.append(f"{headers[0][0]}: credential reached the upstream")
    r = env.get("/case", [("X-API-Key", "ak_unknown_key")])
    if r.status != 401 or b"invalid_key" not in r.body:
        problems.append(f"X-API-Key with an unknown key: {r.describe()} (expected invalid_key)")
    r = env.get("/case", [("x-api-key", K["live"]), ("X-Api-Key-Id", "spoofed"), ("X-API-KEY-OWNER", "spoofed")])
    if r.status == 200:
        d = r.echo()
        if wrong := wrong_identity(d):
            problems.append(f"mixed-case spoofed identity: upstream saw {wrong}")
    assert not problems, "; ".join(problems)
    return "X-API-Key / Authorization in any case accepted and stripped; mixed-case spoofs replaced"


def s_encoded_paths(env: Env) -> str:
    """What the upstream gets for percent-encoded paths (the proxy_pass form matters in nginx)."""
    live = K["live"]
    cases = [
        ("/p/a%20b?x=%20y", {"x-api-key": live}, "/p/a%20b", [("x", " y")]),
        ("/p/a%3Fb?x=1", {"x-api-key": live}, "/p/a%3Fb", [("x", "1")]),
        ("/p/a%23b", {"x-api-key": live}, "/p/a%23b", []),
        ("/p/%C3%A9?q=%C3%A9", {"x-api-key": live}, "/p/%C3%A9", [("q", "é")]),
        (f"/p/a%20b?api_key={live}&z=1", {}, "/p/a%20b", [("z", "1")]),
    ]
    problems = []
    for sent, headers, want_path, want_params in cases:
        r = env.get(sent, headers)
        if r.status != 200:
            problems.append(f"{sent}: {r.describe()}")
            continue
        got = r.echo()["path"]
        u = urlsplit(got)
        if u.path != want_path or parse_qsl(u.query, keep_blank_values=True) != want_params:
            problems.append(f"{sent} reached the upstream as {got!r}")
    assert not problems, "; ".join(problems)
    return "encoded spaces, ?, #, UTF-8 reach the upstream still encoded"


def s_large_list(env: Env) -> str:
    assert env.nginx
    n = 20000
    extra = [key(f"key_bulk_{i}", f"ak_bulk_{i:08d}", rate_limits=[]) for i in range(n)]
    doc = document("v4-large", victim_status="revoked", with_gone=False, extra=extra)
    body = json.dumps(doc).encode()
    env.ks.set_document(body)
    t0 = time.monotonic()
    wait_until(lambda: env.get("/big", {"x-api-key": f"ak_bulk_{n - 1:08d}"}).status == 200, 20,
               f"a key from a {len(body) // 1024} KiB list allowed")
    dt = time.monotonic() - t0
    for i in (0, 1234, n // 2):
        r = env.get("/big", {"x-api-key": f"ak_bulk_{i:08d}"})
        assert r.status == 200, f"bulk key {i}: {r.describe()}"
    assert env.get("/big", {"x-api-key": K["live"]}).status == 200
    return f"{n + 7} keys ({len(body) // 1024} KiB) loaded and served {dt:.1f}s after publication"


def s_exempt(env: Env) -> str:
    for path, method in (("/swagger", "GET"), ("/swagger/ui/index.html", "GET"), ("/healthz", "GET")):
        r = env.get(path, method=method)
        d = r.echo()
        assert not echo_values(d, "x-api-key-id"), f"{method} {path}: identity on an exempt request"
        assert r.header("x-ratelimit-limit") is None, f"{method} {path}: rate-limit headers on an exempt request"
    refusal(env.get("/healthz", method="POST"), "missing_key", "POST /healthz is not exempt")
    refusal(env.get("/swaggerx"), "missing_key", "/swaggerx is not under /swagger")
    refusal(env.get("/swagger/../private"), "missing_key", "/swagger/../private resolves to /private")
    return "/swagger, /swagger/ui/..., GET /healthz pass without a key; POST /healthz, /swaggerx refused"


def s_query_credential_stripped(env: Env) -> str:
    live = K["live"]
    cases = [
        (f"/items?a=1&api_key={live}&b=two%20x&c=", "/items", [("a", "1"), ("b", "two x"), ("c", "")]),
        (f"/items?api_key={live}&z=9", "/items", [("z", "9")]),
        (f"/items?api_key={live}", "/items", []),
        ("/items?z=9&api_key=%61k_live_0123456789", "/items", [("z", "9")]),
    ]
    problems = []
    for sent, want_path, want_params in cases:
        d = env.get(sent).echo()
        if echo_values(d, "x-api-key-id") != ["key_live"]:
            problems.append(f"{sent}: no identity")
        u = urlsplit(d["path"])
        params = parse_qsl(u.query, keep_blank_values=True)
        if u.path != want_path or params != want_params:
            problems.append(f"sent {sent!r}: upstream got {d['path']!r}")
        elif d["path"].endswith("?"):
            note("an emptied query reaches the upstream as a trailing '?'")
    assert not problems, "; ".join(problems)
    return "api_key removed from the upstream path, other parameters kept"


def s_rate_limit_sequence(env: Env) -> str:
    avoid_window_edge()
    seen = []
    for i in range(1, SEQ_LIMIT + 1):
        r = env.get("/rl", {"x-api-key": K["seq"]})
        now = time.time()
        r.echo()
        got = (r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining"), r.header("x-ratelimit-reset"))
        seen.append(got)
        assert got[0] == str(SEQ_LIMIT) and got[1] == str(SEQ_LIMIT - i), f"request {i}: X-RateLimit-* {got}; all {r.header_list}"
        assert got[2] is not None and abs(int(got[2]) - window_end(now)) <= 1, f"request {i}: reset {got[2]} vs window end {window_end(now)}"
        for name in ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"):
            assert len(r.headers_named(name)) == 1, f"request {i}: {name} appears {len(r.headers_named(name))} times"
        assert r.header("content-type") == "application/json", f"upstream content-type lost: {r.header_list}"
    r = env.get("/rl", {"x-api-key": K["seq"]})
    now = time.time()
    ra = r.header("retry-after")
    assert r.status == 429, f"request {SEQ_LIMIT + 1}: {r.describe()}"
    assert ra is not None and ra.isdigit(), f"Retry-After {ra!r}"
    expect_ra = window_end(now) - int(now)
    assert abs(int(ra) - expect_ra) <= 2 and int(ra) >= 1, f"Retry-After {ra}, expected about {expect_ra}"
    refusal(r, "rate_limited", "over the limit", retry_after=ra)
    got = (r.header("x-ratelimit-limit"), r.header("x-ratelimit-remaining"), r.header("x-ratelimit-reset"))
    assert got[0] == str(SEQ_LIMIT) and got[1] == "0" and got[2] == str(window_end(now)), f"429 X-RateLimit-* {got}"
    for name in ("x-ratelimit-limit", "retry-after"):
        assert len(r.headers_named(name)) == 1, f"429: {name} appears {len(r.headers_named(name))} times: {r.header_list}"
    return f"remaining {[s[1] for s in seen]}, then 429 Retry-After {ra}"


def s_burst(env: Env) -> str:
    avoid_window_edge()
    assert env.nginx
    before = len(env.nginx.access_pids())
    barrier = threading.Barrier(BURST_REQUESTS)
    results: list[int | str] = [0] * BURST_REQUESTS

    def one(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", env.main_port, timeout=30)
        try:
            conn.connect()
            barrier.wait(10)
            conn.request("GET", f"/burst/{i}", headers={"x-api-key": K["burst"], "Connection": "close"})
            r = conn.getresponse()
            r.read()
            results[i] = r.status
        except Exception as e:  # noqa: BLE001
            results[i] = repr(e)
        finally:
            conn.close()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST_REQUESTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ok = results.count(200)
    limited = results.count(429)
    time.sleep(0.3)
    pids = {pid for pid, line in env.nginx.access_pids()[before:] if "/burst/" in line}
    assert ok == BURST_LIMIT and limited == BURST_REQUESTS - BURST_LIMIT, (
        f"{BURST_REQUESTS} concurrent requests, limit {BURST_LIMIT}: {ok} allowed, {limited} limited, "
        f"others {[x for x in results if x not in (200, 429)][:5]}; workers {sorted(pids)}")
    assert len(pids) >= 2, f"the burst was served by one worker only ({pids}); cannot show cross-worker exactness"
    r = env.get("/burst/after", {"x-api-key": K["burst"]})
    assert r.status == 429, f"after the burst: {r.describe()}"
    return f"{ok} allowed, {limited} × 429 out of {BURST_REQUESTS}, served by workers {sorted(pids)}"


def s_ip_allow(env: Env) -> str:
    live = K["live"]
    # global ip_allow on the "allow" server: 127.0.0.1/32 and 127.0.0.2/32
    env.get("/g", {"x-api-key": live}, source="127.0.0.2", port=env.allow_port).echo()
    refusal(env.get("/g", {"x-api-key": live}, source="127.0.0.3", port=env.allow_port), "ip_denied",
            "global ip_allow, source 127.0.0.3")
    refusal(env.get("/swagger", source="127.0.0.3", port=env.allow_port), "ip_denied",
            "global ip_allow applies to exempt requests (127.0.0.3)")
    refusal(env.get("/g", source="127.0.0.3", port=env.allow_port), "ip_denied",
            "global ip_allow comes before the credential (127.0.0.3, no key)")
    env.get("/swagger", source="127.0.0.2", port=env.allow_port).echo()
    # per-key allowed_ips on the main server: key_ip2 only from 127.0.0.2
    env.get("/k", {"x-api-key": K["ip2"]}, source="127.0.0.2").echo()
    refusal(env.get("/k", {"x-api-key": K["ip2"]}, source="127.0.0.3"), "ip_denied", "key allowed_ips, source 127.0.0.3")
    refusal(env.get("/k", {"x-api-key": K["ip2"]}, source="127.0.0.1"), "ip_denied", "key allowed_ips, source 127.0.0.1")
    # X-Forwarded-For is ignored without xff_trusted_hops
    refusal(env.get("/k", {"x-api-key": K["ip2"], "x-forwarded-for": "127.0.0.2"}, source="127.0.0.3"),
            "ip_denied", "X-Forwarded-For must not count with xff_trusted_hops 0")
    return "127.0.0.2 allowed, 127.0.0.3 ip_denied (global list, exempt too, and per-key allowed_ips)"


def s_fetch_once_per_instance(env: Env) -> str:
    env.ks.clear_requests()
    time.sleep(6.0)
    reqs = env.ks.requests
    n = len(reqs)
    # 2 workers × 2 filter configurations = 4 root contexts; one lease holder fetches every refresh_s
    assert 2 <= n <= 8, f"{n} key-list requests in 6 s with refresh_s {REFRESH_S} (one fetcher expected: ~6)"
    inm = sum(1 for r in reqs if "if-none-match" in r.headers)
    assert inm >= n - 1, f"only {inm} of {n} fetches carried If-None-Match"
    hosts = {r.headers.get("host") for r in reqs}
    assert hosts == {f"127.0.0.1:{env.ks.port}"}, f"Host of the fetches: {hosts}"
    return f"{n} fetches in 6 s (refresh_s {REFRESH_S}), {inm} with If-None-Match, Host {hosts.pop()}"


def s_revocation(env: Env) -> str:
    for i in range(4):
        assert env.get("/v", {"x-api-key": K["victim"]}).status == 200, "victim allowed before the revocation"
        assert env.get("/v", {"x-api-key": K["gone"]}).status == 200, "gone allowed before the removal"
    env.ks.set_document(document("v2-revoked", victim_status="revoked", with_gone=False))
    t0 = time.monotonic()
    limit = REFRESH_S + TIMEOUT_MS / 1000 + 1.0
    wait_until(lambda: env.get("/v", {"x-api-key": K["victim"]}).status == 401, limit + 2,
               "the revoked key refused")
    dt = time.monotonic() - t0
    time.sleep(0.6)  # every worker's view refreshes on its next tick (250 ms)
    for i in range(8):  # fresh connections: both workers
        refusal(env.get("/v", {"x-api-key": K["victim"]}), "expired_key", f"revoked key, request {i}")
        refusal(env.get("/v", {"x-api-key": K["gone"]}), "invalid_key", f"removed key, request {i}")
    assert env.get("/v", {"x-api-key": K["live"]}).status == 200, "other keys stay allowed"
    assert dt <= limit, f"revocation took {dt:.1f}s, SPEC bound refresh_s + timeout = {limit - 1.0:.1f}s"
    return f"revoked key refused after {dt:.1f}s (bound {limit - 1.0:.0f}s) on every worker; removed key invalid"


def s_bad_list_keeps_last_good(env: Env) -> str:
    assert env.nginx
    good = document("v3-good", victim_status="revoked", with_gone=False)
    env.ks.set_document(good)
    wait_until(lambda: "v3-good" in env.nginx.log(), 10, "v3-good published (info log)")
    bad_docs = [
        ("bad JSON", b'{"version": "bad-1", "keys": [' + json.dumps(key("key_late", K["late"])).encode()),
        ("duplicate id", json.dumps(document("bad-2", extra=[key("key_live", K["late"])])).encode()),
        ("bad CIDR", json.dumps(document("bad-3", extra=[key("key_late", K["late"], allowed_ips=["10.0.0.0/33"])])).encode()),
    ]
    for what, body in bad_docs:
        log_before = len(env.nginx.log())
        n = env.ks.count
        env.ks.body_override = body
        env.ks.wait_for_requests(n + 2, timeout=10)
        time.sleep(0.5)
        for i in range(4):
            r = env.get("/l", {"x-api-key": K["live"]})
            assert r.status == 200, f"{what}: live key lost ({i}): {r.describe()}"
            refusal(env.get("/l", {"x-api-key": K["late"]}), "invalid_key", f"{what}: key only in the bad list")
            refusal(env.get("/l", {"x-api-key": K["victim"]}), "expired_key", f"{what}: revoked in the last good list")
        assert "rejected" in env.nginx.log()[log_before:], f"{what}: no 'rejected' log line"
    env.ks.body_override = None
    return "bad JSON, duplicate id, bad CIDR each rejected whole; the last good list stayed in force"


def s_error_log_clean(env: Env) -> str:
    assert env.nginx
    log = env.nginx.log()
    bad = [ln for ln in log.splitlines()
           if re.search(r"panicked|trap|\[emerg\]|\[alert\]|exited on signal|\[error\].*\[wasm\]", ln)]
    assert not bad, f"{len(bad)} wasm error lines, e.g.:\n" + "\n".join(summarize(bad, 8))
    leaked = [name for name, k in K.items() if k in log or sha256_hex(k) in log]
    assert not leaked, f"key material in the error log: {leaked}"
    pids = env.nginx.worker_pids()
    assert len(pids) == 2, f"expected 2 live workers, found {sorted(pids)}"
    return f"no panic/trap/emerg/alert, no key or hash in the log; workers {sorted(pids)} alive"


def s_config_error(env: Env) -> str:
    bad = plugin_config(env.ks.port)
    bad["key_list"]["refresh_s"] = "soon"
    port = free_ports(1)[0]
    out = []
    # master on: the workers exit, the master keeps the listening socket
    ng = Nginx(env.nginx_bin, [(port, bad)], env.echo.port, workers=2, master=True, name="badconf").start()
    try:
        wait_until(lambda: "configuration rejected" in ng.log(), 30, "the filter's rejection logged")
        line = next(ln for ln in ng.log().splitlines() if "configuration rejected" in ln)
        assert "refresh_s" in line, f"the log line does not name the field: {line}"
        time.sleep(1.0)
        alive = ng.proc is not None and ng.proc.poll() is None
        try:
            r = request(port, "/__ready", timeout=2)
            served = f"answered {r.status}"
        except (OSError, http.client.HTTPException) as e:
            served = f"no answer ({type(e).__name__})"
        out.append(f"master_process on: master {'running' if alive else 'exited ' + str(ng.proc.returncode if ng.proc else '?')}, "
                   f"workers {sorted(ng.worker_pids()) or 'none'}, port {served}")
        if alive and not served.startswith("answered"):
            note("a failed on_configure makes every worker exit while the master keeps running and holds "
                 "the port: connections are accepted into the backlog and never answered")
    finally:
        ng.stop()
    # master off: the single process fails to start
    ng = Nginx(env.nginx_bin, [(port, bad)], env.echo.port, workers=1, master=False, name="badconf1").start()
    try:
        try:
            assert ng.proc is not None
            rc = ng.proc.wait(30)
            out.append(f"master_process off: nginx exited with {rc}")
        except subprocess.TimeoutExpired:
            out.append("master_process off: nginx still running after 30 s")
        assert "configuration rejected" in ng.log(), "master_process off: no rejection logged"
    finally:
        ng.stop()
    return "; ".join(out) + f"; log: {line.split('keygate: ', 1)[-1][:160]}"


def main() -> int:
    nginx_bin = os.environ.get("KEYGATE_NGINX")
    if not nginx_bin:
        print("SKIP tests/nginx/run_nginx.py: KEYGATE_NGINX is not set (point it at an nginx binary built "
              "with Kong's ngx_wasm_module; see envoy/examples/nginx/README.md). Nothing was run.")
        return 0
    if not Path(nginx_bin).exists():
        print(f"KEYGATE_NGINX={nginx_bin}: no such file", file=sys.stderr)
        return 2
    if not WASM.exists():
        print(f"{WASM} is missing: run `make build` first", file=sys.stderr)
        return 2
    v = subprocess.run([nginx_bin, "-V"], capture_output=True, text=True)
    info = (v.stdout + v.stderr).strip()
    print(f"nginx: {nginx_bin}\n  " + "\n  ".join(ln[:300] for ln in info.splitlines()))
    if "wasm" not in info:
        print("warning: `nginx -V` does not mention a wasm module", file=sys.stderr)
    print(f"filter: {WASM} ({WASM.stat().st_size} bytes)", flush=True)

    env = Env(nginx_bin)
    try:
        started = scenario("503 unavailable before the first key list, then allowed", lambda: s_unavailable_then_loaded(env))
        if started or (env.nginx and env.nginx.proc and env.nginx.proc.poll() is None):
            for name, fn in [
                ("allowed: identity headers upstream, credential stripped", s_allowed_identity_and_strip),
                ("missing / invalid / expired keys: SPEC statuses and bodies", s_refusals),
                ("client-sent identity headers never reach the upstream", s_identity_headers_never_forwarded),
                ("header names in any case (nginx keeps the client's case)", s_header_name_case),
                ("exempt paths", s_exempt),
                ("query credential stripped from the upstream path", s_query_credential_stripped),
                ("rate limit: exact sequence, X-RateLimit-*, 429 + Retry-After", s_rate_limit_sequence),
                (f"burst: {BURST_REQUESTS} concurrent connections, 2 workers, exactly {BURST_LIMIT} allowed", s_burst),
                ("ip_allow / allowed_ips with sources 127.0.0.2 and 127.0.0.3", s_ip_allow),
                ("key list fetched once per refresh per instance, with If-None-Match", s_fetch_once_per_instance),
                ("revocation after refresh, on every worker", s_revocation),
                ("a bad list keeps the last good one", s_bad_list_keeps_last_good),
                ("percent-encoded paths reach the upstream encoded", s_encoded_paths),
                ("a 20 000-key list (about 2.5 MiB) through dispatch_http_call", s_large_list),
                ("error log: no panic or trap, no key material", s_error_log_clean),
            ]:
                scenario(name, lambda fn=fn: fn(env))
        if env.nginx and RESULTS and not all(ok for _, ok, _ in RESULTS):
            lines = [ln for ln in env.nginx.log().splitlines() if "closed keepalive connection" not in ln]
            print("---- main nginx error log, distinct lines (last 40) ----\n" + "\n".join(summarize(lines, 40)))
        if env.nginx:
            env.nginx.stop()
            env.nginx = None
        scenario("configuration error: logged with the field; workers exit, master keeps the port",
                 lambda: s_config_error(env))
    finally:
        env.stop()

    passed = sum(1 for _, ok, _ in RESULTS if ok)
    failed = len(RESULTS) - passed
    if NOTES:
        print("notes:\n  " + "\n  ".join(NOTES))
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
