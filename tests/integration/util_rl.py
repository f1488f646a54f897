"""Helpers shared by test_access.py and test_ratelimit.py: one Envoy + echo + key service per
module (Envoy takes ~2 s to start, so a module reuses a few instances), keys, window timing."""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import harness
from echo import EchoServer
from keyservice import KeyService, sha256_hex

# SPEC §4 default bodies, byte for byte.
BODY = {
    "missing_key": b'{"error":{"code":"missing_key","message":"API key is required"}}',
    "invalid_key": b'{"error":{"code":"invalid_key","message":"Invalid API key"}}',
    "expired_key": b'{"error":{"code":"expired_key","message":"API key expired or revoked"}}',
    "forbidden": b'{"error":{"code":"forbidden","message":"API key has no access to this resource"}}',
    "ip_denied": b'{"error":{"code":"ip_denied","message":"Client IP address not allowed"}}',
    "unavailable": b'{"error":{"code":"unavailable","message":"API key list not loaded"}}',
}


def rate_limited_body(retry_after: int | str) -> bytes:
    return ('{"error":{"code":"rate_limited","message":"Rate limit exceeded","retry_after":%s}}' % retry_after).encode()


def key(kid: str, secret: str, owner: str = "org-1", **extra: Any) -> dict:
    """A key-list entry for the clear key `secret` (the list only holds its SHA-256)."""
    return {"id": kid, "hash": sha256_hex(secret), "owner": owner, **extra}


def kh(secret: str) -> dict[str, str]:
    """Request headers that present `secret` as the API key."""
    return {"x-api-key": secret}


def plugin_config(**fields: Any) -> dict:
    cfg: dict[str, Any] = {"key_list": {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": 1}}
    cfg.update(fields)
    return cfg


@dataclass
class Stack:
    env: harness.Envoy
    echo: EchoServer
    ks: KeyService
    doc: dict = field(default_factory=dict)

    def req(self, method: str, path: str, headers: Any = None, source_ip: str = "127.0.0.1", **kw: Any) -> harness.Response:
        return self.env.request(method, path, headers, source_ip=source_ip, **kw)

    def get(self, path: str, headers: Any = None, source_ip: str = "127.0.0.1", **kw: Any) -> harness.Response:
        return self.env.request("GET", path, headers, source_ip=source_ip, **kw)

    def publish(self, doc: dict) -> None:
        """Serve a new document; the caller waits for the filter to pick it up."""
        self.doc = copy.deepcopy(doc)
        self.ks.set_document(self.doc)

    def stop(self) -> list[str]:
        self.env.stop()
        failures = self.env.wasm_failures()
        self.echo.stop()
        self.ks.stop()
        return failures


def start_stack(cfg: dict, doc: dict, concurrency: int = 2, probe_ip: str = "127.0.0.1",
                attempts: int = 3, envoy_kw: dict | None = None) -> Stack:
    """Echo + key service (serving `doc`) + Envoy with keygate configured by `cfg`; returns once
    the filter has loaded the list on every worker (key-less requests stop answering 503
    `unavailable`; workers pick the list up a few hundred ms apart, so this waits for a stable run).
    Must run on the main thread (Envoy dies with the thread that started it).

    Envoy start is retried: the harness picks its ports from the ephemeral range, and on a busy
    machine another connection can take one before Envoy binds it ("Address already in use")."""
    last: BaseException | None = None
    for _ in range(attempts):
        echo = EchoServer().start()
        ks = KeyService(copy.deepcopy(doc)).start()
        try:
            env = harness.start_envoy(cfg, ks.port, echo.port, concurrency=concurrency, **(envoy_kw or {}))
        except Exception as e:  # noqa: BLE001 - EnvoyStartError, or a self-connected /ready poll
            echo.stop()
            ks.stop()
            last = e
            if "Address already in use" in str(e) or "GET /ready" in str(e):
                continue
            raise
        stack = Stack(env, echo, ks, copy.deepcopy(doc))
        try:
            wait_loaded(env, probe_ip)
        except Exception:
            stack.stop()
            raise
        return stack
    raise AssertionError(f"envoy did not start in {attempts} attempts: {last}")


def wait_loaded(env: harness.Envoy, probe_ip: str = "127.0.0.1", timeout: float = 10.0) -> None:
    def loaded() -> bool:
        return env.request("GET", "/__probe", source_ip=probe_ip).status != 503

    harness.wait_until(loaded, timeout=timeout, message="key list loaded")
    time.sleep(0.6)
    harness.wait_until(lambda: all(loaded() for _ in range(12)), timeout=timeout,
                       message="key list loaded on every worker")


# ---- fixed windows -----------------------------------------------------------------------------
def window_end(window_s: int, t: float | None = None) -> int:
    """Unix second at which the fixed window (aligned to multiples of window_s) containing t ends."""
    t = time.time() if t is None else t
    return (int(t) // window_s + 1) * window_s


def window_left(window_s: int) -> float:
    return window_s - (time.time() % window_s)


def ensure_window(window_s: int, need_s: float) -> None:
    """If fewer than need_s seconds remain in the current window, sleep into the next one."""
    left = window_left(window_s)
    if left < need_s:
        time.sleep(left + 0.05)


def align_to_second(offset: float = 0.02) -> None:
    """Sleep until just after the next whole second (so a 1 s window is fresh)."""
    now = time.time()
    time.sleep(math.floor(now) + 1 + offset - now)


def header_count(resp: harness.Response, name: str) -> int:
    return sum(1 for k, _ in resp.header_list if k == name.lower())

