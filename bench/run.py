#!/usr/bin/env python3
"""keygate in real Envoy under load, side by side with the alternatives (`make bench`).

    .venv/bin/python bench/run.py [--rounds N] [--duration S] [--quick] [--sections main,attribution,phases,scale]

One command, one run. Everything listens on 127.0.0.1; every process started here is stopped
(Envoys by PID through tests/integration/harness.py, wrk by PID, the key service is a thread of
this process). With two or more CPUs, Envoy is pinned to the first and wrk, this runner and the
key service to the second (`taskset`).

1  throughput, latency and Envoy CPU per request, `--concurrency 1`, a fresh Envoy per run,
   configurations interleaved round by round (A B C T S D E G R, A B C T S D E G R, ...; default 5
   rounds of 5 s after a 2 s warm-up, wrk -t1 -c32); every route answers with a direct_response
   on the proxy itself (no upstream hop), except R's (see below):
     A  router only
     T  a trivial wasm filter (bench/trivial): SHA-256 of x-api-key, a HashMap of 1,000 hashes,
        one shared-data get + CAS, three x-ratelimit-* response headers (issue 13's yardstick)
     S  T plus every host call SPEC.md asks of keygate on this request (whole header map, source
        address, clock, credential removed, key id and owner set, response headers replaced):
        the cheapest filter that keeps the contract; D − S is keygate's own logic
     B  Envoy's native api_key_auth (1,000 credentials) + local_ratelimit (x-ratelimit headers)
     C  a wasm filter that does nothing (bench/noop): the floor of any wasm filter
     D  keygate, realistic: 1,000 keys, x-api-key + Bearer, 100 CIDRs in ip_allow, 20 route
        rules, per-key limits (two windows, never reached), identity headers, credential stripping
     E  D with 1,000,000 keys
     G  D in global mode (`rate_limit.global`): every request asks the project's Rate Limit Service
        (tests/support/ratelimit_service.py, threads of this runner) over a real Redis
        (redis-server), both on the load generator's CPU; reported against D (G−D)
     R  the reference for G: Envoy's own envoy.filters.http.ratelimit against the same service
        (over an upstream hop); G and R are skipped with a note without redis-server or grpcio
   R's upstream: a second listener of the *same* Envoy answering with a direct_response
   (UPSTREAM_NOTE).
1b attribution: D without ip_allow / routes / rate limits / identity+strip, and bare.
1c phases: wall time of each step inside the filter (diagnostic build, `make wasm-timing`).
2  key-list scale (`--concurrency 2`): time to live and Envoy RSS for 1k/10k/100k/1M keys;
   2b: p99 while a 1M-key list is replaced by another 1M-key list under load.

A run during which other processes use more than 10% of the two CPUs is repeated (--retries).
Results go to stdout and bench/results.md; progress to stderr.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "tests" / "integration"))
sys.path.insert(0, str(REPO / "tests" / "support"))
import harness  # noqa: E402  (the integration tests' Envoy launcher; used as is)

NOOP_MANIFEST = HERE / "noop" / "Cargo.toml"
NOOP_WASM = HERE / "noop" / "target" / "wasm32-wasip1" / "release" / "keygate_bench_noop.wasm"
TRIVIAL_MANIFEST = HERE / "trivial" / "Cargo.toml"
TRIVIAL_WASM = HERE / "trivial" / "target" / "wasm32-wasip1" / "release" / "keygate_bench_trivial.wasm"
KEYGATE_WASM = harness.WASM_PATH
TIMING_DIR = REPO / "target" / "timing"
TIMING_WASM = TIMING_DIR / "wasm32-wasip1" / "release" / "keygate.wasm"
RESULTS = HERE / "results.md"

BENCH_PATH = "/v1/svc9/items/42"   # matches the 20th (last) route rule of D
BENCH_KEY_INDEX = 777              # position of the benchmark key in every generated list
BIG = 536_870_912                  # 512 MiB: http.async_response_buffer_limit and key_list.max_bytes
HUGE_LIMIT = 4_000_000_000         # per-key limit (u32 max is the filter's ceiling), never reached
SWAP_AT_S = 3.0                    # the new list is put in place this long into the swap run
OTHER_LOAD_MAX = 0.10              # a run during which other processes used more is run again
AUTOGROUP_NICE = -20               # every session of the benchmark (runner, Envoy, wrk)
LEASE_QUIET_S = 6.0                # keygate's fetch lease is 5 s; no full fetch for this long = settled
GLOBAL_TIMEOUT_MS = 1000           # G: rate_limit.global.timeout_ms (the Python service under load)
GLOBAL_NOTE = (
    "G's Rate Limit Service (tests/support/ratelimit_service.py: Python grpcio, threads of this "
    "runner) and its Redis (Debian redis-server) run on the load generator's CPU, not Envoy's: their "
    "CPU is not Envoy's cost and is not in G's Envoy CPU µs/request (it is given apart below, per "
    "request). `failure_mode` is `deny`, so a failed call would show as a non-2xx response, and every "
    "run checks that the service answered at least one call per request (its call count, "
    "`keygate_global_calls_total{result=\"ok\"}` and the day-window counter in Redis): G cannot silently measure local mode. "
    "The service is single-process Python and bounds G's throughput; with wrk's fixed 32 connections "
    "the latency under load is mostly waiting for it (a production service such as "
    "envoyproxy/ratelimit in Go answers faster), and a less busy Envoy also batches less per "
    "event-loop wake-up, which G's Envoy CPU per request includes.")

UPSTREAM_NOTE = (
    "Route: every configuration's route answers with a `direct_response` (200, body `ok`) on the "
    "proxy itself, so there is no upstream hop and Envoy's CPU per request is the proxy's own: the "
    "HTTP/1.1 codec, connection manager, filter chain and router. The benchmark runs in a session of "
    "its own (`setsid`) at autogroup nice −20, and so do Envoy and wrk (each in its own session, "
    "each autogroup niced −20), so other sessions on the machine cannot share their CPUs fairly.")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------
# key lists
# ------------------------------------------------------------------------------------------------
N_OWNERS = 1000


def key_text(seed: str, i: int) -> str:
    return "kg_" + hashlib.sha256(f"{seed}/{i}".encode()).hexdigest()[:40]


BENCH_KEY = key_text("bench", 0)       # the key wrk sends; present in every list
BAD_KEY = key_text("nowhere", 0)       # in no list


def make_document(n: int, seed: str, plan_limits: list | None = None) -> bytes:
    """A SPEC §2 document of n keys (the benchmark key at BENCH_KEY_INDEX, the others derived
    from `seed`): 1,000 active owners, one plan with two never-reached windows, two scopes per key."""
    if plan_limits is None:
        plan_limits = [{"limit": HUGE_LIMIT, "window_s": 1}, {"limit": HUGE_LIMIT, "window_s": 86400}]
    sha = hashlib.sha256
    head = json.dumps({
        "version": f"bench-{seed}-{n}",
        "owners": {f"org-{o:04d}": {"status": "active"} for o in range(N_OWNERS)},
        "plans": {"bench": {"rate_limits": plan_limits}},
    })[:-1]
    parts = []
    for i in range(n):
        if i == BENCH_KEY_INDEX:
            parts.append('{"id":"bench-key","hash":"%s","owner":"org-0007","plan":"bench",'
                         '"scopes":["svc9:read","svc3:*"]}' % sha(BENCH_KEY.encode()).hexdigest())
            continue
        h = sha(f"{seed}/{i}".encode()).hexdigest()
        # keys derived from the seed: kg_ + first 40 hex of sha256(seed/i); the list holds the
        # SHA-256 of that text.
        kh = sha(("kg_" + h[:40]).encode()).hexdigest()
        parts.append('{"id":"%s-%07d","hash":"%s","owner":"org-%04d","plan":"bench","scopes":["svc%d:read","svc%d:*"]}'
                     % (seed, i, kh, i % N_OWNERS, i % 10, (i // 10) % 10))
    return (head + ',"keys":[' + ",".join(parts) + "]}").encode()


# ------------------------------------------------------------------------------------------------
# key service: a small threaded HTTP server with ETag/304, a gate and timing of each answer
# ------------------------------------------------------------------------------------------------
class KeyServer:
    """GET /v1/keys -> the current document (strong ETag, 304 on If-None-Match).

    `hold()` makes requests wait (not fail) until `release()`; the time at which a 200 starts
    being written and the time its last byte was written are recorded in `answers`."""

    def __init__(self, body: bytes):
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self.answers: list[dict] = []
        self.requests = 0
        self.set_document(body)
        ks = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # noqa: D401
                pass

            def do_GET(self):  # noqa: N802
                with ks._lock:
                    ks.requests += 1
                ks._gate.wait(300)
                with ks._lock:
                    body, etag = ks._body, ks._etag
                if self.path.split("?")[0] != "/v1/keys":
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                t0 = time.monotonic()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("ETag", etag)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                    self.wfile.flush()
                except OSError:
                    return
                with ks._lock:
                    ks.answers.append({"etag": etag, "start": t0, "sent": time.monotonic(), "bytes": len(body)})

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    def set_document(self, body: bytes) -> None:
        etag = '"' + hashlib.sha256(body).hexdigest() + '"'
        with self._lock:
            self._body, self._etag = body, etag

    @property
    def etag(self) -> str:
        return self._etag

    def hold(self) -> None:
        self._gate.clear()

    def release(self) -> float:
        t = time.monotonic()
        self._gate.set()
        return t

    def answer_for(self, etag: str, after: float = 0.0) -> dict | None:
        """The first 200 answer with this ETag that started at or after `after` (monotonic)."""
        with self._lock:
            for a in self.answers:
                if a["etag"] == etag and a["start"] >= after:
                    return a
        return None

    def last_full_answer(self) -> float:
        with self._lock:
            return max((a["sent"] for a in self.answers), default=0.0)

    def stop(self) -> None:
        self._gate.set()
        self._server.shutdown()
        self._server.server_close()


# ------------------------------------------------------------------------------------------------
# Envoy configurations
# ------------------------------------------------------------------------------------------------
def routes(n: int = 20) -> list[dict]:
    out = []
    for s in range(n // 2):
        out.append({"path_prefix": f"/v1/svc{s}", "methods": ["POST", "PUT", "PATCH", "DELETE"], "scope": f"svc{s}:write"})
        out.append({"path_prefix": f"/v1/svc{s}", "scope": f"svc{s}:read"})
    return out


def cidrs(n: int = 100) -> list[str]:
    out = [f"10.{i}.0.0/16" for i in range(60)]
    out += [f"192.0.{i}.0/24" for i in range(20)]
    out += [f"2001:db8:{i:x}::/48" for i in range(n - len(out) - 1)]
    out.append("127.0.0.0/8")
    assert len(out) == n
    return out


def keygate_config(*, ip_allow: bool = True, routes_on: bool = True, ratelimit: bool = True,
                   identity: bool = True, extras: bool = True, failure_limit: bool = False, refresh_s: int = 3600,
                   envoy_route: bool = False, global_rl: bool = False,
                   timeout_ms: int = 120_000) -> dict:
    cfg: dict[str, Any] = {
        "key_list": {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": refresh_s,
                     "timeout_ms": timeout_ms, "max_bytes": BIG},
        "credentials": [{"header": "x-api-key"}, {"header": "authorization", "scheme": "Bearer"}],
    }
    if extras:
        cfg["key_prefixes"] = ["kg_"]
        cfg["exempt"] = [{"preflight": True}, {"method": "GET", "path_exact": "/healthz"}]
        cfg["client_ip"] = {"xff_trusted_hops": 0}
    if failure_limit:
        # Not part of D as the issue defines it: one more shared-data read on every request
        # (the client IP's failure count is checked before the lookup), shown in section 1b.
        cfg["invalid_key_limit"] = {"limit": 1000, "window_s": 60}
    if ip_allow:
        cfg["ip_allow"] = cidrs()
    if routes_on:
        cfg["routes"] = routes()
    if ratelimit:
        cfg["rate_limit"] = {"default": [{"limit": HUGE_LIMIT, "window_s": 60}], "headers": "x-ratelimit"}
        if global_rl:
            # the domain is made unique per Envoy by Bench.start (one day-window counter per run)
            cfg["rate_limit"]["global"] = {"cluster": "rls", "domain": "keygate-bench",
                                           "timeout_ms": GLOBAL_TIMEOUT_MS, "failure_mode": "deny"}
    cfg["upstream"] = ({"strip_credential": True, "key_id_header": "x-api-key-id", "owner_header": "x-api-key-owner"}
                       if identity else {"strip_credential": False, "key_id_header": None, "owner_header": None})
    if envoy_route:
        cfg["upstream"]["edits"] = "envoy_route"
    return cfg


def native_filters(n_keys: int = 1000) -> list[dict]:
    creds = [{"key": BENCH_KEY, "client": "bench-key"}]
    creds += [{"key": key_text("native", i), "client": f"client-{i:04d}"} for i in range(1, n_keys)]
    return [
        {"name": "envoy.filters.http.api_key_auth",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.api_key_auth.v3.ApiKeyAuth",
                          "credentials": creds,
                          "key_sources": [{"header": "x-api-key"}, {"header": "authorization"}],
                          "forwarding": {"header": "x-api-key-owner", "hide_credentials": True}}},
        {"name": "envoy.filters.http.local_ratelimit",
         "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
                          "stat_prefix": "bench_rl",
                          "token_bucket": {"max_tokens": HUGE_LIMIT, "tokens_per_fill": HUGE_LIMIT, "fill_interval": "1s"},
                          "filter_enabled": {"runtime_key": "bench_rl_enabled",
                                             "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                          "filter_enforced": {"runtime_key": "bench_rl_enforced",
                                              "default_value": {"numerator": 100, "denominator": "HUNDRED"}},
                          "enable_x_ratelimit_headers": "DRAFT_VERSION_03"}},
    ]


def native_ratelimit_filter(domain: str) -> dict:
    """Envoy's own global rate limiting (configuration R): one descriptor per request, no limit
    override (the service answers OK without touching Redis), failures refuse (500)."""
    return {"name": "envoy.filters.http.ratelimit",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.ratelimit.v3.RateLimit",
                             "domain": domain, "timeout": f"{GLOBAL_TIMEOUT_MS / 1000:g}s", "failure_mode_deny": True,
                             "rate_limit_service": {"transport_api_version": "V3",
                                                    "grpc_service": {"envoy_grpc": {"cluster_name": "rls"}}}}}


NATIVE_RL_ACTIONS = [{"actions": [{"generic_key": {"descriptor_value": "bench"}}]}]

DIRECT_ROUTE = {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}


def trivial_config(spec_io: bool = False) -> str:
    """Configuration T: the accepted keys' SHA-256, one hex digest a line (the benchmark key and
    999 others); S (`spec_io`): the same after a first line `spec-io` (bench/trivial/src/lib.rs)."""
    sha = hashlib.sha256
    lines = ["spec-io"] if spec_io else []
    lines += [sha(BENCH_KEY.encode()).hexdigest()]
    lines += [sha(key_text("trivial", i).encode()).hexdigest() for i in range(1, 1000)]
    return "\n".join(lines)


def upstream_listener(port: int) -> dict:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "fake_upstream",
        "codec_type": "AUTO",
        "route_config": {"name": "fake_upstream", "virtual_hosts": [{
            "name": "all", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router",
                          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {"name": "fake_upstream",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


class Spec:
    """One Envoy configuration to benchmark. `hop`: the route goes to the upstream listener (a
    second listener of the same Envoy) instead of answering with a direct_response; `route_extra`
    is merged into the route (request_headers_to_add ...); `versus`: the configuration this one adds
    one thing to (G: D, R: A), against which its per-round differences in CPU, p50 and p99 are
    reported."""

    def __init__(self, name: str, title: str, kind: str, *, plugin: dict | None = None,
                 doc: str | None = None, keys: int = 0, target: str = "main", wasm: Path | None = None,
                 hop: bool = False, route_extra: dict | None = None, versus: str | None = None):
        self.name, self.title, self.kind = name, title, kind
        self.plugin, self.doc, self.keys, self.target, self.wasm = plugin, doc, keys, target, wasm
        self.hop = hop or target == "upstream"
        self.route_extra = route_extra
        self.versus = versus

    @property
    def uses_rls(self) -> bool:
        """keygate in global mode, or Envoy's own ratelimit filter: the Envoy needs the Rate Limit
        Service's cluster."""
        return self.kind == "native-rl" or bool(((self.plugin or {}).get("rate_limit") or {}).get("global"))


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, cpus: tuple[int, int] | None):
        self.args = args
        self.workdir = workdir
        self.cpus = cpus
        self.docs: dict[str, bytes] = {}
        self.ks: KeyServer | None = None
        self.redis: Any = None   # ratelimit_service.RedisServer, started for the first G run
        self.rls: Any = None     # ratelimit_service.RateLimitService (threads of this process)
        self.domains = 0

    # ---- documents ------------------------------------------------------------------------
    def doc(self, name: str) -> bytes:
        if name not in self.docs:
            n, seed, variant = {
                "1k": (1_000, "a", None), "1k-nolimits": (1_000, "a", "nolimits"),
                "10k": (10_000, "a", None), "100k": (100_000, "a", None),
                "1m": (1_000_000, "a", None), "1m-b": (1_000_000, "b", None),
            }[name]
            t = time.monotonic()
            self.docs[name] = make_document(n, seed, [] if variant == "nolimits" else None)
            log(f"generated key list {name}: {n:,} keys, {len(self.docs[name]) / 1e6:.1f} MB "
                f"in {time.monotonic() - t:.1f}s")
        return self.docs[name]

    def keyserver(self, doc: str) -> KeyServer:
        body = self.doc(doc)
        if self.ks is None:
            self.ks = KeyServer(body)
        else:
            self.ks.set_document(body)
        return self.ks

    def rls_service(self) -> Any:
        """The Rate Limit Service (threads of this runner) over a Redis (a child process), started
        once and kept for the section; both inherit the runner's CPU, the load generator's."""
        if self.rls is None:
            from ratelimit_service import RateLimitService, RedisServer
            self.redis = RedisServer().start()
            self.rls = RateLimitService(self.redis.port).start()
            where = "unpinned"
            if self.cpus:
                where = "CPUs " + next((line.split(":")[1].strip() for line in Path(
                    f"/proc/{self.redis.proc.pid}/status").read_text().splitlines()
                    if line.startswith("Cpus_allowed_list")), "?")
            log(f"Rate Limit Service on 127.0.0.1:{self.rls.port}, Redis on 127.0.0.1:{self.redis.port} ({where})")
        return self.rls

    def stop_rls(self) -> None:
        if self.rls is not None:
            self.rls.close()
        if self.redis is not None:
            self.redis.stop()
        self.rls = self.redis = None

    def redis_day_hits(self, domain: str) -> int:
        """Hits Redis counted in the day windows of this domain (one per call: every request's
        descriptors include the benchmark key's 86400 s limit)."""
        keys = [k for k in self.rls.redis.keys(f"{domain}_*") if b"_window_s_86400_" in k]
        return sum(int(v or 0) for v in self.rls.redis.mget(keys)) if keys else 0

    # ---- Envoy ----------------------------------------------------------------------------
    def start(self, spec: Spec, concurrency: int = 1, **kw: Any) -> harness.Envoy:
        """A fresh Envoy for `spec`. Its route answers with a `direct_response` on the proxy itself
        (no upstream hop) unless the spec targets the upstream listener (`spec.hop`)."""
        up_port = harness.free_port()
        domain = None
        if spec.uses_rls:
            self.domains += 1
            domain = f"keygate-bench-{os.getpid()}-{self.domains}"  # fresh counters for each Envoy

        def hook(boot: dict) -> None:
            hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
            if spec.hop:
                boot["static_resources"]["listeners"].append(upstream_listener(up_port))
            else:
                hcm["route_config"]["virtual_hosts"][0]["routes"] = [DIRECT_ROUTE]
            if spec.route_extra:
                hcm["route_config"]["virtual_hosts"][0]["routes"][0].update(spec.route_extra)
            if spec.kind == "native":
                hcm["http_filters"][:0] = native_filters()
            if spec.kind == "native-rl":
                hcm["http_filters"][:0] = [native_ratelimit_filter(domain or "")]
                hcm["route_config"]["virtual_hosts"][0]["rate_limits"] = NATIVE_RL_ACTIONS

        common = dict(concurrency=concurrency, bootstrap_hook=hook, log_level="info",
                      ready_timeout=60, **kw)
        if spec.uses_rls:
            from ratelimit_service import envoy_cluster
            common["extra_clusters"] = [envoy_cluster(self.rls_service().port)]
        if spec.kind in ("router", "native", "native-rl"):
            env = harness.start_envoy(None, None, up_port, wasm=False, **common)
        elif spec.kind == "noop":
            env = harness.start_envoy("", None, up_port, wasm_path=NOOP_WASM, vm_id="noop", **common)
        elif spec.kind in ("trivial", "trivial-spec"):
            env = harness.start_envoy(trivial_config(spec.kind == "trivial-spec"), None, up_port, wasm_path=TRIVIAL_WASM, vm_id="trivial",
                                      **common)
        else:
            ks = self.keyserver(spec.doc)
            if spec.wasm:
                common["wasm_path"] = spec.wasm
            plugin = spec.plugin
            if domain:
                plugin = json.loads(json.dumps(plugin))
                plugin["rate_limit"]["global"]["domain"] = domain
            env = harness.start_envoy(plugin, ks.port, up_port,
                                      runtime={"http.async_response_buffer_limit": BIG}, **common)
        env.rls_domain = domain  # type: ignore[attr-defined]
        env.upstream_port = up_port  # type: ignore[attr-defined]
        return env

    def wait_loaded(self, env: harness.Envoy, keys: int, timeout: float = 300) -> float:
        """Until the list is published and the benchmark key accepted, and no VM has fetched the
        full list for LEASE_QUIET_S (with a big list, a second VM takes the 5 s lease over while the
        first one is still parsing and fetches and parses it again: wait that out too)."""
        t = time.monotonic()
        while True:
            harness.wait_until(lambda: env.stat("keygate_keys_loaded") == keys, timeout, 0.1,
                               f"keygate_keys_loaded == {keys}")
            harness.wait_until(lambda: all(self.probe(env, BENCH_KEY) == 200 for _ in range(4)), 120, 0.05,
                               "the benchmark key accepted")
            quiet_for = time.monotonic() - self.ks.last_full_answer() if self.ks else 1e9
            if keys < 500_000 or quiet_for >= LEASE_QUIET_S:
                return time.monotonic() - t
            if time.monotonic() - t > timeout:
                raise RuntimeError("the key list keeps being fetched")
            time.sleep(LEASE_QUIET_S - quiet_for + 0.1)

    @staticmethod
    def probe(env: harness.Envoy, key: str | None, port: int | None = None, timeout: float = 30) -> int:
        hdrs = {"x-api-key": key} if key else {}
        return harness.http_request("127.0.0.1", port or env.port, "GET", BENCH_PATH, hdrs, timeout=timeout).status

    def sanity(self, spec: Spec, env: harness.Envoy) -> None:
        calls = self.rls.calls if spec.uses_rls else 0
        r = harness.http_request("127.0.0.1", env.port, "GET", BENCH_PATH, {"x-api-key": BENCH_KEY}, timeout=5)
        if r.status != 200 or r.body != b"ok":
            raise RuntimeError(f"{spec.name}: the benchmark request got {r.status} {r.body[:200]!r}")
        if spec.uses_rls and self.rls.calls <= calls:
            raise RuntimeError(f"{spec.name}: the benchmark request did not reach the Rate Limit Service "
                               "(global mode not in effect?)")
        if spec.kind in ("native", "keygate", "trivial", "trivial-spec"):
            bad = self.probe(env, BAD_KEY)
            if bad != 401:
                raise RuntimeError(f"{spec.name}: an unknown key got {bad}, expected 401 (filter not active?)")
            want = "x-ratelimit-limit"
            if (spec.kind in ("native", "trivial", "trivial-spec") or (spec.plugin or {}).get("rate_limit")) and want not in r.headers:
                raise RuntimeError(f"{spec.name}: no {want} header on an allowed response: {r.headers}")
        if spec.kind == "keygate":
            fails = env.wasm_failures()
            if fails:
                raise RuntimeError(f"{spec.name}: wasm failures: {fails[:3]}")

    # ---- load -----------------------------------------------------------------------------
    def lua(self) -> Path:
        p = self.workdir / "bench.lua"
        if not p.exists():
            p.write_text(f"""
wrk.method = "GET"
wrk.path = "{BENCH_PATH}"
wrk.headers["x-api-key"] = "{BENCH_KEY}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('KEYGATE_BENCH {{"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d,"max":%d,"mean":%.1f}}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    latency.max, latency.mean))
end
""")
        return p

    def wrk(self, port: int, duration: float, timeout_s: int = 5) -> dict:
        cmd = ["wrk", "-t", "1", "-c", str(self.args.connections), "-d", f"{max(1, round(duration))}s",
               "--latency", "--timeout", f"{timeout_s}s", "-s", str(self.lua()), f"http://127.0.0.1:{port}"]
        if self.cpus:
            cmd = ["taskset", "-c", str(self.cpus[1])] + cmd
        # its own session (start_new_session), hence its own autogroup, niced like the runner's
        cmd = ["sh", "-c", f'echo {AUTOGROUP_NICE} > /proc/self/autogroup 2>/dev/null; exec "$@"', "wrk"] + cmd
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=duration + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError("wrk did not finish in time")
        m = re.search(r"KEYGATE_BENCH (\{.*\})", out)
        if proc.returncode != 0 or not m:
            raise RuntimeError(f"wrk failed (rc {proc.returncode}):\n{out[-2000:]}")
        res = json.loads(m.group(1))
        res["errors"] = res["connect"] + res["read"] + res["write"] + res["timeout"]
        res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
        return res

    @staticmethod
    def thread_cpu_ns(pid: int) -> dict[str, int]:
        """CPU ns per Envoy thread group: 'main' (the main thread, where the admin endpoint and the
        main thread's wasm VM run), 'workers' (wrk:worker_N), 'other'."""
        out = {"main": 0, "workers": 0, "other": 0}
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                ns = int((task / "schedstat").read_text().split()[0])
                comm = (task / "comm").read_text().strip()
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            kind = "main" if task.name == str(pid) else "workers" if comm.startswith("wrk:worker") else "other"
            out[kind] += ns
        return out

    @staticmethod
    def cpu_delta(a: dict[str, int], b: dict[str, int]) -> dict[str, float]:
        return {k: (b[k] - a[k]) / 1e9 for k in a}

    @staticmethod
    def cpu_ns(pid: int) -> int:
        total = 0
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
        return total

    def busy_s(self, steal: bool = False) -> float:
        """CPU seconds the two benchmark CPUs (or all, unpinned) spent busy, from /proc/stat; with
        steal=True, the time the hypervisor gave them to someone else instead."""
        want = {f"cpu{c}" for c in self.cpus} if self.cpus else {"cpu"}
        total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            f = line.split()
            if f and f[0] in want:
                user, nice, system, _idle, _iowait, irq, softirq, st = map(int, f[1:9])
                total += st if steal else user + nice + system + irq + softirq
        return total / os.sysconf("SC_CLK_TCK")

    @staticmethod
    def own_s() -> tuple[float, float]:
        """(this process, its reaped children) CPU seconds: the runner and the key service, wrk."""
        s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return s.ru_utime + s.ru_stime, c.ru_utime + c.ru_stime

    def quiet(self, wait: float) -> float:
        """Share of the benchmark CPUs used by processes that are not ours over half a second; waits
        (up to `wait` seconds) for it to fall under 10%. Returns the last sample."""
        start = time.monotonic()
        deadline = start + wait
        said = -1e9
        while True:
            b0, (s0, _), t0 = self.busy_s(), self.own_s(), time.monotonic()
            time.sleep(0.5)
            b1, (s1, _), t1 = self.busy_s(), self.own_s(), time.monotonic()
            n = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
            other = max(0.0, (b1 - b0) - (s1 - s0)) / ((t1 - t0) * n)
            if other < OTHER_LOAD_MAX or time.monotonic() >= deadline:
                if said > -1e9:
                    log(f"waited {time.monotonic() - start:.0f}s for a quiet machine (other load now {other * 100:.0f}%)")
                return other
            if time.monotonic() - said >= 15:
                said = time.monotonic()
                log(f"other processes use {other * 100:.0f}% of the benchmark CPUs; waiting for a quiet machine")

    def measure(self, env: harness.Envoy, port: int | None = None, duration: float | None = None) -> dict:
        port = port or env.port
        if self.args.warmup > 0:
            self.wrk(port, self.args.warmup)
        pid = env.proc.pid
        # Redis (G's, a child of this runner not reaped yet) is ours, not other load
        redis_pid = self.redis.proc.pid if self.redis is not None and self.redis.proc is not None else None
        r0 = self.cpu_ns(redis_pid) if redis_pid else 0
        b0, (s0, w0), st0 = self.busy_s(), self.own_s(), self.busy_s(steal=True)
        tc0 = self.thread_cpu_ns(pid)
        c0, t0 = self.cpu_ns(pid), time.monotonic()
        res = self.wrk(port, duration or self.args.duration)
        c1, t1 = self.cpu_ns(pid), time.monotonic()
        res["thread_cpu"] = self.cpu_delta(tc0, self.thread_cpu_ns(pid))
        b1, (s1, w1), st1 = self.busy_s(), self.own_s(), self.busy_s(steal=True)
        redis_s = (self.cpu_ns(redis_pid) - r0) / 1e9 if redis_pid else 0.0
        # the runner's CPU during the run: its RLS threads when G runs (else next to nothing)
        res["rls_us_per_req"] = (s1 - s0 + redis_s) * 1e6 / max(1, res["requests"])
        res["cpu_us_per_req"] = (c1 - c0) / 1e3 / max(1, res["requests"])
        res["cpu_util"] = (c1 - c0) / 1e9 / (t1 - t0)
        res["steal"] = (st1 - st0) / ((t1 - t0) * (len(self.cpus) if self.cpus else (os.cpu_count() or 1)))
        res["wrk_util"] = (w1 - w0) / (t1 - t0)
        n = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        other = (b1 - b0) - (c1 - c0) / 1e9 - (w1 - w0) - (s1 - s0) - redis_s
        res["other_load"] = max(0.0, other) / ((t1 - t0) * n)
        return res

    def run_one(self, spec: Spec) -> dict:
        if self.args.wait_quiet > 0:
            self.quiet(self.args.wait_quiet)
        env = self.start(spec)
        try:
            if spec.kind == "keygate":
                spec_load = self.wait_loaded(env, spec.keys)
            else:
                spec_load = 0.0
            self.sanity(spec, env)
            port = env.upstream_port if spec.target == "upstream" else env.port  # type: ignore[attr-defined]
            calls0 = self.rls.calls if spec.uses_rls else 0
            res = self.measure(env, port)
            res["load_s"] = spec_load
            if spec.uses_rls:
                self.check_global(spec, env, res, self.rls.calls - calls0)
            if spec.kind == "keygate":
                ks = env.keygate_stats()
                res["keygate_allowed"] = ks.get('keygate_requests_total{decision="allowed"}', 0)
                refused = sum(v for k, v in ks.items() if k in {
                    f'keygate_requests_total{{decision="{c}"}}' for c in (
                        "missing_key", "invalid_key", "expired_key", "forbidden",
                        "ip_denied", "rate_limited", "unavailable")})
                res["keygate_refused"] = refused
                res["publishers"] = [who for _, who in self.publishers(env)]
                fails = env.wasm_failures()
                if fails:
                    raise RuntimeError(f"{spec.name}: wasm failures during load: {fails[:3]}")
            return res
        finally:
            env.stop()

    def check_global(self, spec: Spec, env: harness.Envoy, res: dict, calls: int) -> None:
        """After a run against the Rate Limit Service (G, R): the service answered at least one
        call per request wrk completed (warm-up and measured run); for keygate (G), Envoy counted
        them as answered (`keygate_global_calls_total{result="ok"}`) and Redis counted every call of this Envoy in the
        benchmark key's day window. Anything else stops the run."""
        res["rls_calls"] = calls
        self.rls.requests.clear()  # the service keeps every request it answered: not needed here
        res["rls_calls_per_req"] = calls / max(1, res["requests"])
        g: dict[str, int] = {}
        redis_hits = failed = 0
        if spec.kind == "keygate":
            st = env.keygate_stats()
            # keygate_global_calls_total{result="ok"} -> "ok", ..._fallbacks_total{failure_mode="deny"}
            # -> "fallback_deny" (the harness's bootstrap carries envoy/prometheus/stats_tags.yaml).
            g = {("fallback_" if "fallbacks" in k else "") + k.split('"')[1]: int(v)
                 for k, v in st.items() if k.startswith("keygate_global_") and '"' in k}
            env_calls = sum(v for k, v in g.items() if not k.startswith("fallback_"))
            redis_hits = self.redis_day_hits(env.rls_domain)  # type: ignore[attr-defined]
            failed = env_calls - g.get("ok", 0)
        res["global"] = g
        res["redis_hits"] = redis_hits
        if calls < res["requests"] or (spec.kind == "keygate" and (
                g.get("ok", 0) < res["requests"] or redis_hits < g.get("ok", 0))):
            raise RuntimeError(
                f"{spec.name}: {res['requests']} requests measured but the Rate Limit Service answered {calls} "
                f"calls, keygate counted {g}, Redis {redis_hits} day-window hits: not global mode")
        log(f"{spec.name}: Rate Limit Service calls during warm-up + run {calls:,} for {res['requests']:,} "
            "measured requests" + (f"; keygate global calls {g}; Redis day-window hits for this Envoy {redis_hits:,}"
                                   if spec.kind == "keygate" else "")
            + (f"; {failed} FAILED calls" if failed else ""))

    def phases(self, windows: int = 5, limit_s: float = 90) -> list[dict[str, tuple[float, float]]]:
        """D with the diagnostic build (`make wasm-timing`): every 20,000 requests the filter logs
        the mean wall time of each step and how many times per request it ran. Load runs until
        `windows` such lines are logged (or `limit_s`)."""
        spec = Spec("D", "", "keygate", plugin=keygate_config(), doc="1k", keys=1_000, wasm=TIMING_WASM)
        env = self.start(spec)
        try:
            self.wait_loaded(env, spec.keys)
            t = time.monotonic()
            out: list[dict[str, tuple[float, float]]] = []
            while len(out) < windows and time.monotonic() - t < limit_s:
                self.wrk(env.port, 5)
                out = []
                for line in env.log().splitlines():
                    m = re.search(r"keygate phases over \d+ requests: (.*)$", line)
                    if not m:
                        continue
                    steps = {}
                    for part in m.group(1).split(", "):
                        pm = re.match(r"(.+) ([\d.]+)us x([\d.]+)$", part.strip())
                        if pm:
                            steps[pm.group(1)] = (float(pm.group(2)), float(pm.group(3)))
                    out.append(steps)
            return out
        finally:
            env.stop()

    def profile(self, spec: Spec, duration: float, freq: int = 4999) -> dict:
        """`perf record -e cpu-clock` of the Envoy process (perf itself on the load generator's CPU)
        during one wrk run after the warm-up; samples grouped by where the code lives: Envoy's own
        binary (Envoy C++ and V8's runtime and builtins: the host side), anonymous executable memory
        (code V8 compiled from the wasm module: inside the VM), the kernel, and shared libraries."""
        env = self.start(spec)
        data = self.workdir / f"perf-{spec.name}.data"
        try:
            if spec.kind == "keygate":
                self.wait_loaded(env, spec.keys)
            self.sanity(spec, env)
            if self.args.warmup > 0:
                self.wrk(env.port, self.args.warmup)
            cmd = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(freq), "-p", str(env.proc.pid), "-o", str(data)]
            if self.cpus:
                cmd = ["taskset", "-c", str(self.cpus[1])] + cmd
            perf = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
            time.sleep(0.3)
            c0 = self.cpu_ns(env.proc.pid)
            res = self.wrk(env.port, duration)
            c1 = self.cpu_ns(env.proc.pid)
            perf.send_signal(2)
            try:
                perf.wait(30)
            except subprocess.TimeoutExpired:
                perf.kill()
                perf.wait()
        finally:
            env.stop()
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", "dso", "-n",
                              "--percent-limit", "0"], capture_output=True, text=True, timeout=120)
        groups: dict[str, int] = {}
        raw: dict[str, int] = {}
        for line in rep.stdout.splitlines():
            m = re.match(r"\s*([\d.]+)%\s+(\d+)\s+(.+?)\s*$", line)
            if not m:
                continue
            dso, n = m.group(3), int(m.group(2))
            raw[dso] = raw.get(dso, 0) + n
            g = ("envoy (host: Envoy C++, V8 runtime)" if dso == "envoy" else
                 "kernel" if "kernel" in dso else
                 "wasm JIT code (in the VM)" if dso == "[unknown]" or dso.startswith(("[JIT]", "//anon", "[anon", "perf-", "memfd")) else
                 "shared libraries")
            groups[g] = groups.get(g, 0) + n
        total = sum(groups.values())
        data.unlink(missing_ok=True)
        log(f"profile {spec.name}: samples by DSO: " + ", ".join(f"{k} {v}" for k, v in sorted(raw.items(), key=lambda x: -x[1])[:10]))
        cpu_req = (c1 - c0) / 1e3 / max(1, res["requests"])
        return {"groups": {g: n / max(1, total) * cpu_req for g, n in groups.items()}, "samples": total,
                "raw": raw,
                "cpu_us_per_req": cpu_req, "rps": res["rps"]}

    def rounds(self, specs: list[Spec], n: int, label: str) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {s.name: [] for s in specs}
        for r in range(n):
            for s in specs:
                for attempt in range(self.args.retries + 1):
                    res = self.run_one(s)
                    if res["other_load"] <= OTHER_LOAD_MAX or attempt == self.args.retries:
                        break
                    log(f"{label} round {r + 1}/{n} {s.name:>10}: other processes used "
                        f"{res['other_load'] * 100:.0f}% of the benchmark CPUs during the run; running it again")
                res["attempts"] = attempt + 1
                out[s.name].append(res)
                bad = res["status"] + res["errors"]
                log(f"{label} round {r + 1}/{n} {s.name:>10}: {res['rps']:9.0f} req/s  p50 {res['p50'] / 1e3:6.3f} ms  "
                    f"p99 {res['p99'] / 1e3:6.3f} ms  CPU {res['cpu_us_per_req']:6.2f} us/req  "
                    f"Envoy {res['cpu_util'] * 100:3.0f}% wrk {res['wrk_util'] * 100:3.0f}% other {res['other_load'] * 100:3.0f}% "
                    f"steal {res['steal'] * 100:3.0f}%  Envoy CPU s main/workers/other "
                    f"{res['thread_cpu']['main']:.2f}/{res['thread_cpu']['workers']:.2f}/{res['thread_cpu']['other']:.2f}"
                    + (f"  NON-2xx/ERRORS {bad}" if bad else "")
                    + (f"  (list loaded in {res['load_s']:.1f}s)" if res.get("load_s") else ""))
        return out

    # ---- part 2: key-list scale -----------------------------------------------------------
    def vm_kb(self, pid: int, field: str) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        return 0

    def scale_one(self, docname: str, keys: int) -> dict:
        ks = self.keyserver(docname)
        etag = ks.etag
        ks.hold()
        spec = Spec("scale", "", "keygate", plugin=keygate_config(), doc=docname, keys=keys)
        env = self.start(spec, concurrency=2)
        try:
            pid = env.proc.pid
            # the first fetch waits on the held key service; idle a moment for a clean baseline
            harness.wait_until(lambda: ks.requests > 0, 20, 0.05, "the first key-list request")
            time.sleep(0.5)
            rss_before = self.vm_kb(pid, "VmRSS")
            cpu_before = self.thread_cpu_ns(pid)
            answers_before = len(ks.answers)
            wall_answer = time.time()
            t_answer = ks.release()
            live = None
            slowest = 0.0
            while time.monotonic() < t_answer + 300 and live is None:
                t0 = time.monotonic()
                try:
                    ok = self.probe(env, BENCH_KEY) == 200
                except Exception:  # noqa: BLE001
                    ok = False
                t1 = time.monotonic()
                slowest = max(slowest, t1 - t0)
                if ok:
                    live = t1
                time.sleep(0.02)
            if live is None:
                raise RuntimeError(f"{docname}: list not live within 300s")
            # keep probing a while: a request that hangs shows a worker blocked by a fetch
            while time.monotonic() < t_answer + 20 and keys >= 1_000_000:
                t0 = time.monotonic()
                try:
                    self.probe(env, BENCH_KEY)
                except Exception:  # noqa: BLE001
                    pass
                slowest = max(slowest, time.monotonic() - t0)
                time.sleep(0.02)
            harness.wait_until(lambda: env.stat("keygate_keys_loaded") == keys, 60, 0.1, "keygate_keys_loaded")
            ans = ks.answer_for(etag, after=t_answer - 0.5) or {}
            # RSS once things settled: 1.5 s after live and no full fetch for LEASE_QUIET_S
            time.sleep(1.5)
            harness.wait_until(lambda: time.monotonic() - ks.last_full_answer() >= LEASE_QUIET_S, 120, 0.2,
                               "no more fetches of the list")
            pubs = [(t - wall_answer, who) for t, who in self.publishers(env)]
            res = {
                "keys": keys, "bytes": len(self.doc(docname)),
                "sent_s": ans.get("sent", t_answer) - t_answer,
                "published": pubs, "live_s": live - t_answer,
                "rss_before_kb": rss_before, "rss_kb": self.vm_kb(pid, "VmRSS"), "hwm_kb": self.vm_kb(pid, "VmHWM"),
                "answers_200": len(ks.answers) - answers_before,
                "slowest_probe_s": slowest,
                "load_cpu": self.cpu_delta(cpu_before, self.thread_cpu_ns(pid)),
            }
            if env.wasm_failures():
                raise RuntimeError(f"{docname}: wasm failures: {env.wasm_failures()[:3]}")
            return res
        finally:
            env.stop()

    @staticmethod
    def publishers(env: harness.Envoy) -> list[tuple[float, str]]:
        """(wall-clock time, 'main' or 'worker') of each 'key list ... published' log line: when,
        and on which Envoy thread, a VM finished publishing a list."""
        out = []
        for line in env.log().splitlines():
            if "published" in line and "keygate" in line:
                m = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+)\]\[(\d+)\]", line)
                if m:
                    t = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S.%f").timestamp()
                    out.append((t, "main" if int(m.group(2)) == env.proc.pid else "worker"))
        return out

    def swap(self) -> dict:
        """p99 under load while the 1M-key list is replaced by another 1M-key list."""
        ks = self.keyserver("1m")
        self.doc("1m-b")
        spec = Spec("swap", "", "keygate", plugin=keygate_config(refresh_s=1), doc="1m", keys=1_000_000)
        if self.args.wait_quiet > 0:
            self.quiet(self.args.wait_quiet)
        env = self.start(spec, concurrency=2)
        out: dict[str, Any] = {}
        try:
            self.wait_loaded(env, 1_000_000)
            # only in list b / only in list a; i % 10 == 9 holds the scope svc9:read the path needs
            probe_new, probe_old = key_text("b", 9), key_text("a", 9)
            if self.probe(env, probe_new) != 401:
                raise RuntimeError("swap: a key of the second list is accepted before the swap")
            n_pub_before = len(self.publishers(env))
            out["before"] = self.measure(env)
            # the swap run: the new document is served SWAP_AT_S into it; keygate asks within 1 s
            dur = self.args.swap_duration
            answers_before = len(ks.answers)
            result: dict = {}

            def load():
                try:
                    result["r"] = self.measure_nowarm(env, dur, timeout_s=60)
                except Exception as e:  # noqa: BLE001
                    result["error"] = e

            th = threading.Thread(target=load)
            tc0 = self.thread_cpu_ns(env.proc.pid)
            th.start()
            time.sleep(SWAP_AT_S)
            t_swap = time.monotonic()
            ks.set_document(self.doc("1m-b"))
            wall_swap = time.time()
            etag_b = ks.etag
            live = None
            slowest = 0.0
            while th.is_alive() or live is None:
                if time.monotonic() > t_swap + dur + 120:
                    break
                t0 = time.monotonic()
                try:
                    ok = self.probe(env, probe_new, timeout=60) == 200
                except Exception:  # noqa: BLE001
                    ok = False
                t1 = time.monotonic()
                if t1 < t_swap + dur:
                    slowest = max(slowest, t1 - t0)
                if ok and live is None:
                    live = t1
                time.sleep(0.05)
            th.join(dur + 120)
            if "error" in result:
                raise result["error"]
            res = result["r"]
            res["thread_cpu"] = self.cpu_delta(tc0, self.thread_cpu_ns(env.proc.pid))
            ans = ks.answer_for(etag_b) or {}
            res["swap_asked_s"] = (ans["start"] - t_swap) if ans else None
            res["swap_live_s"] = (live - ans["start"]) if (live and ans) else None
            res["swap_inside_window"] = bool(live) and live < res["t_end"]
            res["slowest_probe_s"] = slowest
            out["during"] = res
            harness.wait_until(lambda: time.monotonic() - ks.last_full_answer() >= LEASE_QUIET_S, 120, 0.2,
                               "no more fetches of the new list")
            harness.wait_until(lambda: all(self.probe(env, BENCH_KEY) == 200 for _ in range(4)), 120, 0.1)
            if self.probe(env, probe_old) != 401:
                raise RuntimeError("swap: a key of the old list is still accepted after the swap")
            out["after"] = self.measure(env)
            out["answers_200"] = len(ks.answers) - answers_before
            wall_answer = wall_swap + (res["swap_asked_s"] or 0.0)
            out["publishers"] = [(t - wall_answer, who) for t, who in self.publishers(env)[n_pub_before:]]
            out["publishers_before"] = n_pub_before
            out["rss_kb"] = self.vm_kb(env.proc.pid, "VmRSS")
            out["hwm_kb"] = self.vm_kb(env.proc.pid, "VmHWM")
            if env.wasm_failures():
                raise RuntimeError(f"swap: wasm failures: {env.wasm_failures()[:3]}")
            return out
        finally:
            env.stop()

    def measure_nowarm(self, env: harness.Envoy, duration: float, timeout_s: int) -> dict:
        pid = env.proc.pid
        b0, (s0, w0) = self.busy_s(), self.own_s()
        c0, t0 = self.cpu_ns(pid), time.monotonic()
        res = self.wrk(env.port, duration, timeout_s=timeout_s)
        c1, t1 = self.cpu_ns(pid), time.monotonic()
        b1, (s1, w1) = self.busy_s(), self.own_s()
        res["cpu_us_per_req"] = (c1 - c0) / 1e3 / max(1, res["requests"])
        n = len(self.cpus) if self.cpus else (os.cpu_count() or 1)
        res["other_load"] = max(0.0, (b1 - b0) - (c1 - c0) / 1e9 - (w1 - w0) - (s1 - s0)) / ((t1 - t0) * n)
        res["t_end"] = t1
        return res


# ------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------
def pubs_text(pubs: list[tuple[float, str]]) -> str:
    return ", ".join(f"{t:.2f} ({who})" for t, who in pubs) or "?"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def med(rs: list[dict], k: str) -> float:
    return statistics.median(r[k] for r in rs)


def spread(rs: list[dict], k: str) -> str:
    vals = [r[k] for r in rs]
    return f"{min(vals):.2f}–{max(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def fmt_ratio(x: float) -> str:
    return f"{x:.2f}×"


def paired(res: dict[str, list[dict]], x: str, y: str, k: str, scale: float = 1.0) -> list[float]:
    """Per-round differences x − y of measure k (divided by scale), over the rounds both ran."""
    return [(a[k] - b[k]) / scale for a, b in zip(res[x], res[y])]


def versus_specs(specs: list[Spec], res: dict[str, list[dict]]) -> list[Spec]:
    """The configurations measured against another one of the same run (G against D)."""
    return [s for s in specs if s.versus and s.versus in res and res.get(s.name)]


def main_table(specs: list[Spec], res: dict[str, list[dict]], base: str = "A") -> list[str]:
    a = res[base]
    vs = versus_specs(specs, res)
    lines = ["| config | req/s | p50 ms | p99 ms | Envoy CPU µs/req (min–max) | req/s ÷ A | p50 ÷ A | p99 ÷ A | CPU ÷ A | Envoy CPU use | other load (max) | non-2xx/errors |"
             + (" added over its base (per-round medians): CPU µs, p50 ms, p99 ms |" if vs else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if vs else "")]
    for s in specs:
        r = res[s.name]
        bad = sum(x["status"] + x["errors"] for x in r)
        extra = ""
        if vs:
            extra = (f" {s.name}−{s.versus}: {statistics.median(paired(res, s.name, s.versus, 'cpu_us_per_req')):+.2f} µs, "
                     f"{statistics.median(paired(res, s.name, s.versus, 'p50', 1e3)):+.3f} ms, "
                     f"{statistics.median(paired(res, s.name, s.versus, 'p99', 1e3)):+.3f} ms |" if s in vs else " |")
        lines.append(
            f"| **{s.name}** {s.title} | {med(r, 'rps'):,.0f} | {med(r, 'p50') / 1e3:.3f} | {med(r, 'p99') / 1e3:.3f} | "
            f"{med(r, 'cpu_us_per_req'):.2f} ({spread(r, 'cpu_us_per_req')}) | "
            f"{fmt_ratio(med(r, 'rps') / med(a, 'rps'))} | {fmt_ratio(med(r, 'p50') / med(a, 'p50'))} | "
            f"{fmt_ratio(med(r, 'p99') / med(a, 'p99'))} | {fmt_ratio(med(r, 'cpu_us_per_req') / med(a, 'cpu_us_per_req'))} | "
            f"{med(r, 'cpu_util') * 100:.0f}% | {max(x['other_load'] for x in r) * 100:.0f}% | {bad} |" + extra)
    return lines


def rounds_table(specs: list[Spec], res: dict[str, list[dict]]) -> list[str]:
    n = max(len(v) for v in res.values())
    lines = ["| config | " + " | ".join(f"round {i + 1}" for i in range(n)) + " |",
             "|---|" + "---|" * n]
    for s in specs:
        cells = [f"{r['rps']:,.0f}, {r['p99'] / 1e3:.3f}, {r['cpu_us_per_req']:.2f}, {r['other_load'] * 100:.0f}%"
                 + (f" (attempt {r['attempts']})" if r.get("attempts", 1) > 1 else "")
                 for r in res[s.name]]
        lines.append(f"| {s.name} | " + " | ".join(cells) + " |")
    for s in versus_specs(specs, res):
        cells = [f"p50 {p50:+.3f}, p99 {p99:+.3f}, CPU {cpu:+.2f}" for p50, p99, cpu in zip(
            paired(res, s.name, s.versus, "p50", 1e3), paired(res, s.name, s.versus, "p99", 1e3),
            paired(res, s.name, s.versus, "cpu_us_per_req"))]
        lines.append(f"| {s.name}−{s.versus} | " + " | ".join(cells) + " |")
    return lines


def global_notes(specs: list[Spec], res: dict[str, list[dict]]) -> list[str]:
    """The bullets on global mode's cost (G against D in the same rounds, and Envoy's own ratelimit
    filter R against A as the reference) and how their runs were checked to be global."""
    out = []
    for s in versus_specs(specs, res):
        if not s.uses_rls:
            continue
        r = res[s.name]
        cpu_v = paired(res, s.name, s.versus, "cpu_us_per_req")
        p50, p99 = paired(res, s.name, s.versus, "p50", 1e3), paired(res, s.name, s.versus, "p99", 1e3)
        calls = [x["rls_calls_per_req"] for x in r]
        bad = sum(x["status"] + x["errors"] for x in r)
        off_cpu = _stats([x["rls_us_per_req"] for x in r])
        if s.kind == "keygate":
            failed = sum(v for x in r for k, v in x["global"].items() if k != "ok" and not k.startswith("fallback_"))
            out.append(
                f"- **Global mode ({s.name}−{s.versus})**: Envoy CPU **{_stats(cpu_v)} µs/request** more than local "
                f"mode ({s.name}−A {_stats(paired(res, s.name, 'A', 'cpu_us_per_req'))} µs); latency under load p50 "
                f"{_stats(p50)} ms, p99 {_stats(p99)} ms more (medians of per-round differences, min–max); throughput "
                f"{med(r, 'rps') / med(res[s.versus], 'rps') * 100:.0f}% of {s.versus}'s. Off Envoy's CPU, the Rate Limit "
                f"Service and Redis used {off_cpu} µs per request on the load generator's CPU. Checked every run: "
                f"{min(calls):.2f}–{max(calls):.2f} service calls per measured request (warm-up included), every "
                f"request's day window counted in Redis, {failed} failed calls, {bad} non-2xx/errors.")
        else:
            out.append(
                f"- Reference, Envoy's own `envoy.filters.http.ratelimit` against the same service ({s.name}−{s.versus}, "
                f"over one upstream hop, one descriptor without a limit, so the service does not touch Redis): "
                f"Envoy CPU {_stats(cpu_v)} µs/request, p50 {_stats(p50)} ms, p99 {_stats(p99)} ms more; the service "
                f"{off_cpu} µs per request off Envoy's CPU; {min(calls):.2f}–{max(calls):.2f} calls per measured "
                f"request, {bad} non-2xx/errors. What any Envoy pays for a gRPC exchange with this service at this "
                f"rate, keygate or not.")
    return out


def global_missing() -> str | None:
    """Why configuration G cannot run here (None: it can): Redis's server, or the service's Python
    packages (tests/requirements.txt in .venv)."""
    if not shutil.which("redis-server"):
        return "redis-server is not installed (`make deps` installs it with apt-get)"
    try:
        import ratelimit_service  # noqa: F401  (grpcio, envoy-data-plane, redis)
    except ImportError as e:
        return f"the Rate Limit Service's Python packages are missing ({e}; `make deps` installs them in .venv)"
    return None


def envoy_mode_specs() -> list[Spec]:
    """keygate's opt-in Envoy mode in the main section, when this build has it (see README)."""
    return []


def profile_extra_specs() -> list[Spec]:
    return []


# `upstream.edits: "envoy_route"`: the route removes the credential and identity headers and adds
# the identity from keygate's filter state (README, Envoy route mode).
ROUTE_EDITS = {
    "request_headers_to_remove": ["x-api-key-id", "x-api-key-owner", "x-api-key", "authorization"],
    "request_headers_to_add": [
        {"header": {"key": "x-api-key-id", "value": "%FILTER_STATE(wasm.keygate_key_id:PLAIN)%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
        {"header": {"key": "x-api-key-owner", "value": "%FILTER_STATE(wasm.keygate_owner:PLAIN)%"},
         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
    ],
}


def attribution_extra_specs() -> list[Spec]:
    """The Envoy route mode against the default, both over an upstream hop: a `direct_response`
    route never applies `request_headers_to_add`, so only a forwarded request pays for the route's
    edits."""
    return [
        Spec("A-hop", "A, routed to the upstream listener (a second listener of the same Envoy)", "router", hop=True),
        Spec("D-hop", "D, routed to the upstream listener", "keygate", plugin=keygate_config(), doc="1k", keys=1_000,
             hop=True),
        Spec("Dx-hop", "D in Envoy route mode (`upstream.edits: envoy_route`, the route edits the headers), "
             "routed to the upstream listener", "keygate", plugin=keygate_config(envoy_route=True), doc="1k",
             keys=1_000, hop=True, route_extra=ROUTE_EDITS),
    ]


def attribution_extra_notes(pmed: Callable[[str, str], float], names: list[str]) -> list[str]:
    if not {"A-hop", "D-hop", "Dx-hop"} <= set(names):
        return []
    return [f"- Envoy route mode, over an upstream hop (the hop costs the same in both): keygate adds "
            f"{pmed('D-hop', 'A-hop'):+.2f} µs when it edits the headers itself (default) and "
            f"{pmed('Dx-hop', 'A-hop'):+.2f} µs when it writes filter state and the route edits the headers: "
            f"the mode saves {pmed('D-hop', 'Dx-hop'):+.2f} µs per request (median of per-round differences)."]


def _stats(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def paired_section(specs: list[Spec], res: dict[str, list[dict]], rounds: int) -> list[str]:
    """Per-round differences to A and ratios between them, with their medians over the rounds and
    the spread (min–max) of A and of the floor C−A beside every ratio."""
    names = [s.name for s in specs]
    cpu = {n: [r["cpu_us_per_req"] for r in res[n]] for n in names}
    n_r = min(len(v) for v in cpu.values())
    diff = {n: [cpu[n][i] - cpu["A"][i] for i in range(n_r)] for n in names if n != "A"}

    def ratio(num: str, den: str) -> list[float]:
        return [diff[num][i] / diff[den][i] if diff[den][i] > 0 else float("nan") for i in range(n_r)]

    a_spread = f"A {min(cpu['A']):.2f}–{max(cpu['A']):.2f} µs"
    floor_spread = f"C−A {min(diff['C']):.2f}–{max(diff['C']):.2f} µs"
    keygate = [n for n in names if n.startswith("D")] + (["E"] if "E" in names else [])
    # S: the trivial filter making the host calls the contract asks for; over it, keygate's logic
    rs = {n: ratio(n, "S") for n in keygate} if "S" in names else {}
    vs = [s for s in versus_specs(specs, res) if s.versus != "A"]  # X−A is a column already
    out = ["### Paired within each round (same minute: slow drift cancels)", "",
           "| round | A µs | " + " | ".join(f"{n}−A" for n in names if n != "A") + " | "
           + " | ".join(f"({n}−A)/(T−A)" for n in keygate) + " | "
           + "".join(f"({n}−A)/(S−A) | " for n in rs)
           + " | ".join(f"({n}−A)/(C−A)" for n in keygate if n != "E") + " |"
           + (" (E−A)/(D−A) |" if "E" in names else "")
           + "".join(f" {s.name}−{s.versus} |" for s in vs),
           # ratio columns: one over T−A per keygate row, one over C−A per row but E, and (E−A)/(D−A)
           "|---:|---:|" + "---:|" * (len(names) - 1) + "---:|" * (2 * len(keygate) + len(rs) + len(vs))]
    rt = {n: ratio(n, "T") for n in keygate}
    rc = {n: ratio(n, "C") for n in keygate if n != "E"}
    red = ratio("E", "D") if "E" in names else [float("nan")] * n_r
    vdiff = {s.name: paired(res, s.name, s.versus, "cpu_us_per_req") for s in vs}
    for i in range(n_r):
        out.append(f"| {i + 1} | {cpu['A'][i]:.2f} | " + " | ".join(f"{diff[n][i]:+.2f}" for n in names if n != "A")
                   + " | " + " | ".join(f"{rt[n][i]:.2f}" for n in keygate) + " | "
                   + "".join(f"{rs[n][i]:.2f} | " for n in rs)
                   + " | ".join(f"{rc[n][i]:.2f}" for n in rc) + " |" + (f" {red[i]:.3f} |" if "E" in names else "")
                   + "".join(f" {vdiff[n][i]:+.2f} |" for n in vdiff))
    out.append("| **median (min–max)** | " + _stats(cpu["A"]) + " | "
               + " | ".join(_stats(diff[n]) for n in names if n != "A") + " | "
               + " | ".join(_stats(rt[n]) for n in keygate) + " | "
               + "".join(f"{_stats(rs[n])} | " for n in rs)
               + " | ".join(_stats(rc[n]) for n in rc) + " |" + (f" {_stats(red)} |" if "E" in names else "")
               + "".join(f" {_stats(vdiff[n])} |" for n in vdiff))
    out += ["", "Medians of the per-round ratios; beside each, the spread of A and of the floor C−A over the "
            "same rounds (a ratio is no better resolved than its denominator):", ""]
    for n in keygate:
        out.append(f"- **({n}−A)/(T−A) = {statistics.median(rt[n]):.2f}** (rounds {min(rt[n]):.2f}–{max(rt[n]):.2f}; "
                   f"T−A {_stats(diff['T'])} µs; {a_spread}; {floor_spread}) — target ≤ 1.0 (issue 13)")
    for n in rs:
        out.append(f"- **({n}−A)/(S−A) = {statistics.median(rs[n]):.2f}** (rounds {min(rs[n]):.2f}–{max(rs[n]):.2f}; "
                   f"S−A {_stats(diff['S'])} µs): keygate against the cheapest filter that makes the host calls "
                   f"the contract asks for on this request")
    if rs:
        st = [diff["S"][i] - diff["T"][i] for i in range(n_r)]
        out.append(f"- **S−T = {statistics.median(st):+.2f} µs** ({min(st):+.2f} to {max(st):+.2f}): what those "
                   f"host calls (whole header map, source address, clock, three request-header edits, response "
                   f"headers replaced rather than added) cost any filter")
    for n in rc:
        out.append(f"- **({n}−A)/(C−A) = {statistics.median(rc[n]):.2f}** (rounds {min(rc[n]):.2f}–{max(rc[n]):.2f}; "
                   f"{a_spread}; {floor_spread}) — target ≤ 2.5 where the floor is steady")
    if "E" in names:
        out.append(f"- **(E−A)/(D−A) = {statistics.median(red):.3f}** (rounds {min(red):.3f}–{max(red):.3f}; "
                   f"{a_spread}) — target ≤ 1.05")
    out.append(f"- Added CPU over A, µs/request (median of per-round differences): "
               + ", ".join(f"{n} {statistics.median(diff[n]):+.2f}" for n in names if n != "A") + ".")
    out += global_notes(specs, res)
    if "E" in names:
        out.append(f"- E: the 1M-key list took {statistics.median(r['load_s'] for r in res['E']):.1f} s (median) "
                   f"from Envoy ready to the benchmark key being accepted and no VM fetching it any more, before "
                   f"each run's warm-up (two VMs with `--concurrency 1`: the main thread's and the worker's).")
    return out


def run(args: argparse.Namespace) -> int:
    started = time.monotonic()
    for tool in ("wrk", "cargo"):
        if not shutil.which(tool):
            log(f"{tool} not found (make bench installs wrk with apt-get)")
            return 2
    if not KEYGATE_WASM.exists():
        log(f"{KEYGATE_WASM} is missing: run `make build`")
        return 2
    log("building bench/noop and bench/trivial (wasm32-wasip1, release)")
    for manifest in (NOOP_MANIFEST, TRIVIAL_MANIFEST):
        subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1",
                        "--manifest-path", str(manifest)], check=True, cwd=REPO)

    # Pinning: Envoy on the first CPU we may use, wrk (and this runner, the key service) on the second.
    allowed = sorted(os.sched_getaffinity(0))
    cpus = (allowed[0], allowed[1]) if len(allowed) >= 2 else None
    workdir = Path(tempfile.mkdtemp(prefix="keygate-bench-"))
    real_envoy = harness.envoy_binary()
    if cpus:
        wrapper = workdir / "envoy-pinned"
        # harness starts Envoy in a session of its own (so its own autogroup): nice that one too
        wrapper.write_text(f'#!/bin/sh\necho {AUTOGROUP_NICE} > /proc/self/autogroup 2>/dev/null\n'
                           f'exec taskset -c {cpus[0]} "{real_envoy}" "$@"\n')
        wrapper.chmod(0o755)
        os.environ["KEYGATE_ENVOY"] = str(wrapper)
        os.sched_setaffinity(0, {cpus[1]})
    else:
        log("only one CPU available: nothing is pinned, figures will be noisy")
    envoy_version = subprocess.run([real_envoy, "--version"], capture_output=True, text=True).stdout.strip().split("version:")[-1].strip()

    bench = Bench(args, workdir, cpus)
    sections = args.sections
    md: list[str] = []

    def emit(sec: list[str]) -> None:
        """A finished section: to stdout now, to bench/results.md at the end."""
        print("\n".join(sec), flush=True)
        md.extend(sec)
    try:
        initial_other = bench.quiet(args.wait_quiet)
        if initial_other > 0.10:
            log(f"WARNING: other processes use {initial_other * 100:.0f}% of the benchmark CPUs; figures will be inflated")
        md += [f"# keygate benchmark results", "",
               f"Generated by `bench/run.py` ({'quick smoke run' if args.quick else 'full run'}, sections "
               f"{', '.join(sections)}) on {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}: Envoy {envoy_version}, "
               f"{cpu_model()}, {os.cpu_count()} CPUs, Envoy pinned to CPU {cpus[0] if cpus else '-'}, wrk (and "
               f"the runner with its key service) to CPU {cpus[1] if cpus else '-'}. "
               f"{args.duration:g} s per run after a {args.warmup:g} s warm-up, `wrk -t1 -c{args.connections} --latency`, "
               f"one key (`x-api-key`) on `GET {BENCH_PATH}`; a fresh Envoy per run. Runner session autogroup: "
               f"`{args.autogroup}`.", "",
               UPSTREAM_NOTE, "",
               "*Other load* is the share of the two benchmark CPUs used during a measured run by processes "
               "other than Envoy, wrk and the runner (and G's Redis) (from `/proc/stat`); anything above a few "
               "percent means "
               f"the machine was shared and the figures are inflated. Each run waits (up to {args.wait_quiet:g} s) for "
               f"a quiet machine first, and a run with more than {OTHER_LOAD_MAX * 100:.0f}% other load is run "
               f"again (up to {args.retries} times; the per-round tables mark such runs with their attempt count).", ""]
        if initial_other > 0.10:
            md += [f"**Warning:** before the run, other processes used {initial_other * 100:.0f}% of the benchmark CPUs.", ""]

        if "main" in sections:
            specs = [
                Spec("A", "router only", "router"),
                Spec("B", "native api_key_auth (1k) + local_ratelimit", "native"),
                Spec("C", "noop wasm (the floor)", "noop"),
                Spec("T", "trivial wasm: SHA-256, HashMap 1k, shared get+CAS, 3 response headers", "trivial"),
                Spec("S", "T plus the host calls SPEC.md asks of keygate here: whole header map, source "
                     "address, clock, credential removed, key id and owner set, response headers replaced",
                     "trivial-spec"),
                Spec("D", "keygate, 1k keys", "keygate", plugin=keygate_config(), doc="1k", keys=1_000),
                Spec("E", "keygate, 1M keys", "keygate", plugin=keygate_config(), doc="1m", keys=1_000_000),
                Spec("G", "D in global mode: Rate Limit Service (Python) over Redis on loopback, on wrk's CPU",
                     "keygate", plugin=keygate_config(global_rl=True), doc="1k", keys=1_000, versus="D"),
                Spec("R", "reference for G: Envoy's own ratelimit filter, same service (one upstream hop)",
                     "native-rl", hop=True, versus="A"),
            ] + envoy_mode_specs()
            if args.configs:
                specs = [s_ for s_ in specs if s_.name in args.configs]
            skipped = []
            why = global_missing() if any(s_.uses_rls for s_ in specs) else None
            if why:
                skipped = [f"- **G and R skipped** (global mode): {why}.", ""]
                log(f"configurations G and R skipped: {why}")
                specs = [s_ for s_ in specs if not s_.uses_rls]
            for name, path_ in args.variant:
                specs.append(Spec(f"D@{name}", f"D with the module {path_}", "keygate", plugin=keygate_config(),
                                  doc="1k", keys=1_000, wasm=Path(path_).resolve()))
            for s_ in specs:
                if s_.doc:
                    bench.doc(s_.doc)
            log(f"part 1: {len(specs)} configurations x {args.rounds} rounds, {args.duration}s each "
                f"(+{args.warmup}s warm-up), wrk -t1 -c{args.connections}")
            res = bench.rounds(specs, args.rounds, "main")
            bench.stop_rls()
            sec = [f"## 1. Per-request cost (`--concurrency 1`, {args.rounds} interleaved rounds)", ""]
            sec += main_table(specs, res)
            sec += ["",
                    "- CPU per request = Δ(sum of the first field of `/proc/<envoy>/task/*/schedstat`) over the "
                    "measured wrk run ÷ requests wrk completed (all Envoy threads, idle ones included). "
                    "*Envoy CPU use*: the same Δ ÷ wall time (100% = the pinned core). Every route answers with "
                    "a `direct_response` on the proxy itself: no upstream hop. The key service (a thread of the "
                    "runner, on the load generator's CPU) serves the list before the measured window only "
                    "(`refresh_s` 3600)."]
            if any(s_.uses_rls for s_ in specs):
                sec.append("- " + GLOBAL_NOTE + (
                    " R, Envoy's own `envoy.filters.http.ratelimit` against the same service, shows what that "
                    "exchange costs any Envoy (its route goes to a second listener of the same Envoy, as the filter "
                    "only acts on routed requests: one hop more than A)." if "R" in res else ""))
            sec += [""] + skipped
            sec += paired_section(specs, res, args.rounds)
            sec += ["", "Per round (req/s, p99 ms, CPU µs/req, other load"
                    + ("; rows X−Y: that round's differences in p50 ms, p99 ms and CPU µs/req"
                       if versus_specs(specs, res) else "") + "):", ""]
            sec += rounds_table(specs, res)
            sec.append("")
            emit(sec)

        if "attribution" in sections:
            att = [
                Spec("A", "router only", "router"),
                Spec("C", "noop wasm", "noop"),
                Spec("D", "keygate as in D", "keygate", plugin=keygate_config(), doc="1k", keys=1_000),
                Spec("D-ip", "D without ip_allow", "keygate", plugin=keygate_config(ip_allow=False), doc="1k", keys=1_000),
                Spec("D-routes", "D without routes", "keygate", plugin=keygate_config(routes_on=False), doc="1k", keys=1_000),
                Spec("D-rl", "D without rate limits (none in config or list)", "keygate",
                     plugin=keygate_config(ratelimit=False), doc="1k-nolimits", keys=1_000),
                Spec("D-ident", "D without identity headers and stripping (no request-header edits)", "keygate",
                     plugin=keygate_config(identity=False), doc="1k", keys=1_000),
                Spec("D+fail", "D with invalid_key_limit", "keygate",
                     plugin=keygate_config(failure_limit=True), doc="1k", keys=1_000),
                Spec("D-bare", "keys only: x-api-key/Bearer lookup, nothing else", "keygate",
                     plugin=keygate_config(ip_allow=False, routes_on=False, ratelimit=False, identity=False, extras=False),
                     doc="1k-nolimits", keys=1_000),
            ] + attribution_extra_specs()
            log(f"part 1b: attribution, {len(att)} configurations x {args.attribution_rounds} rounds")
            ares = bench.rounds(att, args.attribution_rounds, "attribution")
            n_r = min(len(v) for v in ares.values())
            cpu = {s_.name: [r["cpu_us_per_req"] for r in ares[s_.name]] for s_ in att}

            def pmed(x: str, y: str) -> float:
                """Median over rounds of x − y (same round)."""
                return statistics.median(cpu[x][i] - cpu[y][i] for i in range(n_r))

            sec = [f"## 1b. Where keygate's time goes (attribution, {args.attribution_rounds} interleaved rounds)", "",
                   "Each row removes one feature from D (same 1k-key list, same request), A and C run in the same "
                   "rounds. \"Saved\" is the median over rounds of D minus the row (same round): the cost of that "
                   "feature on this request; \"− A\" likewise the row minus A.", "",
                   "| config | req/s | p99 ms | CPU µs/req (min–max) | saved vs D µs | − A µs | other load (max) | non-2xx/errors |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for s_ in att:
                r = ares[s_.name]
                c = med(r, "cpu_us_per_req")
                bad = sum(x["status"] + x["errors"] for x in r)
                sec.append(f"| **{s_.name}** {s_.title} | {med(r, 'rps'):,.0f} | {med(r, 'p99') / 1e3:.3f} | "
                           f"{c:.2f} ({spread(r, 'cpu_us_per_req')}) | {pmed('D', s_.name):+.2f} | "
                           f"{pmed(s_.name, 'A') if s_.name != 'A' else 0.0:+.2f} | "
                           f"{max(x['other_load'] for x in r) * 100:.0f}% | {bad} |")
            sec += ["",
                    f"- D-bare (one header read, one list lookup, nothing else configured) costs {pmed('D-bare', 'C'):+.2f} µs "
                    f"over the noop filter C; everything else D configures adds {pmed('D', 'D-bare'):+.2f} µs on top.",
                    f"- Request-header edits (identity headers set, credential removed: D − D-ident) cost "
                    f"{pmed('D', 'D-ident'):+.2f} µs of Envoy CPU per request; inside the VM those calls take a few "
                    f"hundred ns each (section 1c), so the rest is host-side.",
                    ] + attribution_extra_notes(pmed, [s_.name for s_ in att]) + [
                    "", "Per round (req/s, p99 ms, CPU µs/req, other load):", ""]
            sec += rounds_table(att, ares)
            sec.append("")
            emit(sec)

        if "profile" in sections and shutil.which("perf"):
            prof_specs = [
                Spec("A", "router only", "router"),
                Spec("C", "noop wasm", "noop"),
                Spec("T", "trivial wasm", "trivial"),
                Spec("D", "keygate, 1k keys", "keygate", plugin=keygate_config(), doc="1k", keys=1_000),
                Spec("D-ident", "D without request-header edits", "keygate", plugin=keygate_config(identity=False),
                     doc="1k", keys=1_000),
                Spec("E", "keygate, 1M keys", "keygate", plugin=keygate_config(), doc="1m", keys=1_000_000),
            ] + profile_extra_specs()
            log(f"part 1d: perf profile of Envoy, {len(prof_specs)} configurations")
            prof = {s_.name: bench.profile(s_, args.duration) for s_ in prof_specs}
            gnames = ["envoy (host: Envoy C++, V8 runtime)", "wasm JIT code (in the VM)", "kernel", "shared libraries"]
            pa = prof["A"]["groups"]
            sec = ["## 1d. Host side or inside the VM: a CPU profile of Envoy (`perf record -e cpu-clock`)", "",
                   "One extra run per configuration (not one of the measured rounds), `perf record -e cpu-clock "
                   "-F 4999 -p <envoy>` for the whole wrk run, perf itself on the load generator's CPU. Envoy's "
                   "binary is stripped, so samples are grouped by where the code lives: Envoy's binary (Envoy's "
                   "C++ — codec, header maps, router, the wasm host ABI — and V8's runtime and builtins, including "
                   "the wasm↔host call wrappers), anonymous executable memory (machine code V8 compiled from the "
                   "wasm module: the filter's own work), the kernel (sockets, loopback) and shared libraries "
                   "(libc, libstdc++). Each group's share of the samples × the run's CPU µs/request; then the "
                   "difference to A of each group.", "",
                   "| config | CPU µs/req | samples | " + " | ".join(gnames) + " | " + " | ".join(f"{g.split(' (')[0]} − A" for g in gnames) + " |",
                   "|---|---:|---:|" + "---:|" * (2 * len(gnames))]
            for s_ in prof_specs:
                r = prof[s_.name]
                g = r["groups"]
                sec.append(f"| **{s_.name}** {s_.title} | {r['cpu_us_per_req']:.2f} | {r['samples']:,} | "
                           + " | ".join(f"{g.get(x, 0.0):.2f}" for x in gnames) + " | "
                           + " | ".join(f"{g.get(x, 0.0) - pa.get(x, 0.0):+.2f}" for x in gnames) + " |")
            d, di, t = prof["D"]["groups"], prof["D-ident"]["groups"], prof["T"]["groups"]
            h, j = gnames[0], gnames[1]
            sec += ["",
                    f"- D over A: host side (Envoy binary) {d.get(h, 0) - pa.get(h, 0):+.2f} µs, in the VM "
                    f"{d.get(j, 0) - pa.get(j, 0):+.2f} µs, kernel {d.get('kernel', 0) - pa.get('kernel', 0):+.2f} µs. "
                    f"T over A: host {t.get(h, 0) - pa.get(h, 0):+.2f} µs, VM {t.get(j, 0) - pa.get(j, 0):+.2f} µs.",
                    f"- The request-header edits (D − D-ident): host side {d.get(h, 0) - di.get(h, 0):+.2f} µs, in the VM "
                    f"{d.get(j, 0) - di.get(j, 0):+.2f} µs.",
                    f"- 1M keys against 1k (E − D): host side {prof['E']['groups'].get(h, 0) - d.get(h, 0):+.2f} µs, in the VM "
                    f"{prof['E']['groups'].get(j, 0) - d.get(j, 0):+.2f} µs, kernel "
                    f"{prof['E']['groups'].get('kernel', 0) - d.get('kernel', 0):+.2f} µs.", ""]
            emit(sec)

        if "phases" in sections:
            log("part 1c: where a request's time goes inside the filter (diagnostic build)")
            subprocess.run(["cargo", "build", "--quiet", "--release", "--target", "wasm32-wasip1", "-p", "keygate-filter",
                            "--features", "phase-timing", "--target-dir", str(TIMING_DIR)],
                           check=True, cwd=REPO)
            windows = bench.phases()[1:]  # the first window includes the warm-up
            sec = ["## 1c. Inside the filter: wall time per step of an allowed D request (diagnostic build)", "",
                   "`make wasm-timing` builds keygate with `--features phase-timing`: the filter reads the host's "
                   "nanosecond clock around each step and logs the means every 20,000 requests. Each reading is "
                   "itself a host call (the *clock* row: one empty pair), so every row is inflated by about that "
                   "much. *shared get/set* are inside *decide*. Medians over the logged windows of one D run "
                   f"({len(windows)} windows).", "",
                   "| step | µs per call | calls per request | µs per request |", "|---|---:|---:|---:|"]
            if windows:
                for name in windows[0]:
                    per_call = statistics.median(w[name][0] for w in windows if name in w)
                    per_req = statistics.median(w[name][1] for w in windows if name in w)
                    sec.append(f"| {name} | {per_call:.2f} | {per_req:.2f} | {per_call * per_req:.2f} |")
            else:
                sec.append("| (no window logged: too few requests) | | | |")
            sec.append("")
            emit(sec)

        if "scale" in sections:
            sizes = [("1k", 1_000), ("10k", 10_000), ("100k", 100_000), ("1m", 1_000_000)]
            log("part 2: key-list scale (--concurrency 2)")
            sc = []
            for name, n in sizes:
                if args.wait_quiet > 0:
                    bench.quiet(args.wait_quiet)
                r = bench.scale_one(name, n)
                sc.append(r)
                log(f"scale {n:>9,} keys: body sent {r['sent_s']:.2f}s, published {pubs_text(r['published'])}, "
                    f"live {r['live_s']:.2f}s, RSS {r['rss_kb'] / 1024:.0f} MiB (peak {r['hwm_kb'] / 1024:.0f} MiB, "
                    f"before {r['rss_before_kb'] / 1024:.0f} MiB), full fetches {r['answers_200']}")
            sec = ["## 2. Key-list scale (`--concurrency 2`, Envoy pinned to one CPU)", "",
                   "The key service holds the first fetch until Envoy is ready and idle, then answers; times "
                   "are from the moment it starts answering. *Live*: the first probe request with a key of the "
                   "list answered 200 (time of the answer; probes every 20 ms on fresh connections, continued for "
                   "20 s for the 1M list; *slowest probe*: the longest any of them waited, i.e. a worker blocked). "
                   "*Published*: the timestamp of each `key list ... published` line in Envoy's log and the thread "
                   "(main or worker) whose VM fetched, parsed and published. *Full fetches*: 200 answers of the key "
                   "service for this list (the design is one per instance). *Envoy CPU s*: CPU time of Envoy's main "
                   "thread and of its workers from the answer until the list is settled (the load's cost; a few probe "
                   "requests included). RSS is `VmRSS` of the Envoy process at "
                   "least 1.5 s after the list is live and once no VM has fetched it for 6 s; peak is `VmHWM`.", "",
                   "| keys | JSON MB | body sent s | live s | published s (by) | full fetches | Envoy CPU s: main / workers | slowest probe s | RSS before MiB | RSS after MiB | peak RSS MiB |",
                   "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
            for r in sc:
                sec.append(f"| {r['keys']:,} | {r['bytes'] / 1e6:.1f} | {r['sent_s']:.2f} | {r['live_s']:.2f} | "
                           f"{pubs_text(r['published'])} | {r['answers_200']} | {r['load_cpu']['main']:.2f} / {r['load_cpu']['workers']:.2f} | "
                           f"{r['slowest_probe_s']:.2f} | {r['rss_before_kb'] / 1024:.0f} | "
                           f"{r['rss_kb'] / 1024:.0f} | {r['hwm_kb'] / 1024:.0f} |")
            by = {r["keys"]: r for r in sc}
            if 1_000 in by and 1_000_000 in by:
                d = (by[1_000_000]["rss_kb"] - by[1_000]["rss_kb"]) / 1024
                dp = (by[1_000_000]["hwm_kb"] - by[1_000]["hwm_kb"]) / 1024
                sec += ["", f"- RSS 1M − 1k = **{d:.0f} MiB** ({d * 1024 * 1024 / 999_000:.0f} bytes per extra key); "
                            f"peak 1M − 1k = {dp:.0f} MiB."]
            sec.append("")
            emit(sec)

            log("part 2b: replacing a 1M-key list by another 1M-key list under load")
            sw = bench.swap()
            b, d_, a_ = sw["before"], sw["during"], sw["after"]
            sec = ["## 2b. Replacing a 1M-key list under load (`--concurrency 2`, refresh_s 1)", "",
                   f"Every key's id and hash change except the benchmark key's (so traffic keeps being allowed; "
                   f"its bucket is rewritten anyway, as are all others). Steady state before and after: "
                   f"{args.duration:g} s runs on the same Envoy; the swap run lasts {args.swap_duration:g} s, the new "
                   f"document is served {SWAP_AT_S:g} s into it (wrk timeout 60 s). wrk only records requests that complete "
                   f"inside its run, and a connection stuck behind a blocked worker makes one slow request while the "
                   f"others go on (coordinated omission), so the table also gives the slowest of the probe requests "
                   f"(fresh connections, every 50 ms) sent during the swap run.", "",
                   "| run | req/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | CPU µs/req | Envoy CPU s: main / workers | other load | non-2xx/errors |",
                   "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for label, r in (("steady, before", b), ("during the swap", d_), ("steady, after", a_)):
                sec.append(f"| {label} | {r['rps']:,.0f} | {r['p50'] / 1e3:.3f} | {r['p90'] / 1e3:.3f} | "
                           f"{r['p99'] / 1e3:.3f} | {r['p999'] / 1e3:.3f} | {r['max'] / 1e3:.1f} | "
                           f"{r['cpu_us_per_req']:.2f} | {r['thread_cpu']['main']:.2f} / {r['thread_cpu']['workers']:.2f} | "
                           f"{r['other_load'] * 100:.0f}% | {r['status'] + r['errors']} |")
            fmt = lambda x: "n/a" if x is None else f"{x:.2f} s"  # noqa: E731
            sec += ["", f"- The new list was asked for {fmt(d_['swap_asked_s'])} after it was put in place and was "
                        f"live (a key only in the new list accepted) {fmt(d_['swap_live_s'])} after the key service "
                        f"started answering; inside the measured window: {'yes' if d_['swap_inside_window'] else 'NO'}.",
                    f"- Full fetches of the new list: {sw['answers_200']}; published (s after the key service "
                    f"answered, by): {pubs_text(sw['publishers'])} (the first list: {sw['publishers_before']} publishes). "
                    f"RSS after: {sw['rss_kb'] / 1024:.0f} MiB (peak {sw['hwm_kb'] / 1024:.0f} MiB).",
                    f"- p99 during the swap ÷ steady p99 before = **{d_['p99'] / b['p99']:.2f}×**; max "
                    f"{d_['max'] / 1e3:.1f} ms vs {b['max'] / 1e3:.1f} ms; slowest probe during the swap run "
                    f"{d_['slowest_probe_s'] * 1e3:.0f} ms; throughput {d_['rps'] / b['rps'] * 100:.0f}% of steady state.", ""]
            emit(sec)

        md.append(f"_Total run time {(time.monotonic() - started) / 60:.1f} min._")
        if args.append and RESULTS.exists():
            # a further pass of some sections, kept after the results it adds to
            md[0] = "# Further pass"
            RESULTS.write_text(RESULTS.read_text().rstrip("\n") + "\n\n" + "\n".join(md) + "\n")
        else:
            RESULTS.write_text("\n".join(md) + "\n")
        log(f"wrote {RESULTS.relative_to(REPO)} ({(time.monotonic() - started) / 60:.1f} min)")
        return 0
    finally:
        if bench.ks:
            bench.ks.stop()
        bench.stop_rls()
        harness._stop_all()
        shutil.rmtree(workdir, ignore_errors=True)


def own_session() -> str:
    """Runs the benchmark in a session of its own (re-executing under `setsid` once) and sets that
    session's autogroup nice to AUTOGROUP_NICE. Returns /proc/self/autogroup as it then reads."""
    if os.getsid(0) != os.getpid() and os.environ.get("KEYGATE_BENCH_SETSID") != "1" and shutil.which("setsid"):
        os.environ["KEYGATE_BENCH_SETSID"] = "1"
        os.execvp("setsid", ["setsid", "--wait", sys.executable, *sys.argv])
    ag = Path("/proc/self/autogroup")
    try:
        ag.write_text(str(AUTOGROUP_NICE))
    except OSError as e:
        log(f"could not set the autogroup nice ({e}); the benchmark runs at the default")
    try:
        return ag.read_text().strip()
    except OSError:
        return "no autogroup"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="rounds of A B C T D E G R (default 5)")
    p.add_argument("--duration", type=float, default=5, help="seconds of measured load per run (default 5)")
    p.add_argument("--warmup", type=float, default=2, help="seconds of unmeasured load before each run (default 2)")
    p.add_argument("--connections", type=int, default=32, help="wrk connections (default 32, one wrk thread)")
    p.add_argument("--attribution-rounds", type=int, default=4, help="rounds of the attribution section (default 4)")
    p.add_argument("--swap-duration", type=float, default=35,
                   help="length of the run during which the 1M-key list is replaced (default 35, --quick 20)")
    p.add_argument("--sections", default="main,attribution,profile,phases,scale",
                   help="comma-separated subset of main (1), attribution (1b), profile (1d), phases (1c), "
                        "scale (2 and 2b)")
    p.add_argument("--no-attribution", action="store_true", help="skip section 1b")
    p.add_argument("--no-scale", action="store_true", help="skip sections 2 and 2b")
    p.add_argument("--wait-quiet", type=float, default=120,
                   help="before each run, wait up to this many seconds for other processes to leave the "
                        "benchmark CPUs (<10%% busy); 0: don't wait (default 120, --quick 0)")
    p.add_argument("--retries", type=int, default=2,
                   help="run a configuration again (up to this many times) when other processes used more "
                        "than 10%% of the benchmark CPUs during its run (default 2, --quick 0)")
    p.add_argument("--configs", default="",
                   help="comma-separated subset of section 1's configurations (A, B, C, T, D, E, G, R, ...); A, C "
                        "and T are always kept (every ratio needs them), and D with G (G is measured against it)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=WASM",
                   help="also measure D with another build of the module (section 1), e.g. "
                        "--variant base=/tmp/keygate-before.wasm, to compare a change side by side")
    p.add_argument("--append", action="store_true",
                   help="append this run's sections to bench/results.md instead of replacing it")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 round of 3 s, 1 s warm-up")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup, args.swap_duration, args.wait_quiet, args.retries = 1, 3, 1, 20, 0, 0
        args.attribution_rounds = 1
    args.sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    args.configs = ({"A", "T", "C"} | {x.strip() for x in args.configs.split(",") if x.strip()}) if args.configs else set()
    if "G" in args.configs:
        args.configs.add("D")
    try:
        args.variant = [tuple(v.split("=", 1)) for v in args.variant]
        assert all(len(v) == 2 for v in args.variant)
    except AssertionError:
        p.error("--variant: NAME=PATH")
    bad = [x for x in args.sections if x not in ("main", "attribution", "profile", "phases", "scale")]
    if bad:
        p.error(f"--sections: unknown {bad}")
    if args.no_attribution and "attribution" in args.sections:
        args.sections.remove("attribution")
    if args.no_scale and "scale" in args.sections:
        args.sections.remove("scale")
    args.autogroup = own_session()
    try:
        return run(args)
    except KeyboardInterrupt:
        log("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
