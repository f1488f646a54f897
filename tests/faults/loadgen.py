"""Keep-alive load with a known answer at every instant (stdlib asyncio, raw HTTP/1.1).

    oracle = Oracle(window_s=refresh_s + timeout_ms / 1000)
    oracle.publish(state)                       # before the key service serves a new good list
    load = Load(port, probes, oracle, connections=64, sources={...})
    stats = load.stats()                        # a Tally: running totals, judged online
    await load.run(stop_event)

A *state* is what a good key list says (dict plaintext -> KeyState). Every response is judged
when it arrives against every state that may have been in force between the moment its request
was sent minus the transition window (SPEC §5: refresh_s + timeout_ms) and the moment the answer
came back: a response that matches none of them is a wrong decision. Requests of keys with a
rate limit are also counted per fixed window (the X-RateLimit-Reset of the answer names it): at
most `limit` allowed per window, and exactly `limit` in a window in which any was refused.

Nothing is stored per request: totals, a few samples of each kind of mistake, per-window counts
of limited keys (pruned as windows pass) and latencies per reporting interval.
"""
from __future__ import annotations

import asyncio
import ipaddress
import random
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Iterable

CODE_RX = re.compile(rb'"code":"([a-z_]+)"')


@dataclass(frozen=True)
class KeyState:
    """One key as a good list has it (what the oracle needs of SPEC §3)."""
    id: str
    status: str = "active"
    expires_at: int | None = None   # Unix seconds
    owner_ok: bool = True
    allowed_ips: tuple[str, ...] = ()
    limit: tuple[int, int] | None = None  # (limit, window_s) when the key has exactly one limit
    limited: bool = False                 # has any limit (answers may be rate_limited)


@dataclass(frozen=True)
class Probe:
    """One kind of request: a key (plaintext or None) sent from a source address."""
    label: str
    key: str | None
    path: str = "/r"


def expect(state: dict[str, KeyState], key: str | None, src: str, now: float) -> set:
    """The acceptable outcomes under one list: {("allowed", id)} / {"code"} / both for limits."""
    if key is None:
        return {"missing_key"}
    ks = state.get(key)
    if ks is None:
        return {"invalid_key"}
    out: set = set()
    # expiry is judged by the filter's clock in whole seconds: near the instant, both answers.
    expired = {False}
    if ks.expires_at is not None:
        expired = {now - 1.5 >= ks.expires_at, now + 1.5 >= ks.expires_at}
    for exp in expired:
        if ks.status != "active" or exp:
            out.add("expired_key")
        elif not ks.owner_ok:
            out.add("invalid_key")
        elif ks.allowed_ips and not any(ipaddress.ip_address(src) in ipaddress.ip_network(n) for n in ks.allowed_ips):
            out.add("ip_denied")
        else:
            out.add(("allowed", ks.id))
            if ks.limited:
                out.add("rate_limited")
    return out


class Oracle:
    """The good lists published so far, each with the time it was handed to the key service."""

    def __init__(self, window_s: float, keep: int = 16):
        self.window_s = window_s
        self.keep = keep
        self.history: list[tuple[float, dict[str, KeyState]]] = []

    def publish(self, state: dict[str, KeyState], at: float | None = None) -> None:
        self.history.append((time.time() if at is None else at, state))
        if len(self.history) > self.keep:
            del self.history[: len(self.history) - self.keep]

    @property
    def current(self) -> dict[str, KeyState]:
        return self.history[-1][1]

    @property
    def last_publish(self) -> float:
        return self.history[-1][0] if self.history else 0.0

    def candidates(self, t_send: float, t_recv: float) -> list[tuple[bool, dict[str, KeyState]]]:
        """(is_newest_possible, state) of every list that may have been in force."""
        h = self.history
        out = []
        for i, (t_pub, st) in enumerate(h):
            if t_pub > t_recv:
                break
            # list i can be in force from its publication until window_s after the next one
            t_next = h[i + 1][0] if i + 1 < len(h) else None
            if t_next is None or t_next + self.window_s > t_send:
                out.append(st)
        newest = out[-1] if out else None
        return [(st is newest, st) for st in out]


@dataclass
class Tally:
    requests: int = 0
    wrong: int = 0
    in_window: int = 0           # matched only an older list, inside the transition window
    errors: int = 0              # transport failures (connection reset, timeout, bad framing)
    status_5xx: int = 0
    unavailable: int = 0
    outcomes: Counter = field(default_factory=Counter)
    samples: list = field(default_factory=list)
    limit_over: int = 0          # windows with more than `limit` allowed
    limit_short: int = 0         # windows with a refusal yet fewer than `limit` allowed
    limit_windows: int = 0       # windows judged
    latencies: list = field(default_factory=list)
    _kinds: dict = field(default_factory=dict)

    def sample(self, what: str, kind: str = "") -> None:
        """Keeps a few examples of each kind of mistake (at most 3 a kind, 40 in all)."""
        n = self._kinds.get(kind, 0)
        if n < 3 and len(self.samples) < 40:
            self._kinds[kind] = n + 1
            self.samples.append(what)

    def snapshot(self) -> dict:
        return {"requests": self.requests, "wrong": self.wrong, "in_window": self.in_window,
                "errors": self.errors, "status_5xx": self.status_5xx, "unavailable": self.unavailable,
                "limit_over": self.limit_over, "limit_short": self.limit_short,
                "limit_windows": self.limit_windows, "outcomes": dict(self.outcomes)}


def diff(after: dict, before: dict) -> dict:
    out = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)}
    out["outcomes"] = {k: v - before.get("outcomes", {}).get(k, 0) for k, v in after["outcomes"].items()
                       if v - before.get("outcomes", {}).get(k, 0)}
    return out


class Load:
    """`connections` keep-alive connections, each cycling through its probes as fast as answered."""

    def __init__(self, port: int, probes_by_source: dict[str, list[Probe]], oracle: Oracle,
                 connections: int = 64, host: str = "127.0.0.1", timeout: float = 10.0,
                 allow_unavailable: bool = False, seed: int = 17, rate_check: bool = True,
                 tolerate: Iterable[str] = ()):
        self.port = port
        self.host = host
        self.probes = probes_by_source
        self.oracle = oracle
        self.connections = connections
        self.timeout = timeout
        self.allow_unavailable = allow_unavailable
        self.rng = random.Random(seed)
        self.rate_check = rate_check
        self.tally = Tally()
        # (key id, window end) -> [allowed, refused, limit]
        self.windows: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0, 0])
        self.paused = False
        self.tolerate = set(tolerate)

    # ---- judging ---------------------------------------------------------------------------
    def judge(self, probe: Probe, src: str, t_send: float, t_recv: float, status: int,
              headers: dict[bytes, bytes], body: bytes) -> None:
        t = self.tally
        t.requests += 1
        t.latencies.append(t_recv - t_send)
        code = None
        if status >= 500:
            t.status_5xx += 1
        m = CODE_RX.search(body) if status != 200 else None
        if m:
            code = m.group(1).decode()
        if status == 200:
            outcome = "allowed"
        elif code and code in ("missing_key", "invalid_key", "expired_key", "forbidden", "ip_denied",
                               "rate_limited", "unavailable"):
            outcome = code
        else:
            outcome = f"status {status}"
        if outcome == "unavailable":
            t.unavailable += 1
        t.outcomes[outcome] += 1
        seen_id = None
        if outcome == "allowed":
            mm = re.search(rb'\["x-api-key-id", "([^"]*)"\]', body)
            seen_id = mm.group(1).decode() if mm else None
        got: object = ("allowed", seen_id) if outcome == "allowed" else outcome
        cands = self.oracle.candidates(t_send, t_recv)
        ok_newest = ok_any = False
        for newest, st in cands:
            exp = expect(st, probe.key, src, t_send) | expect(st, probe.key, src, t_recv)
            if got in exp:
                ok_any = True
                ok_newest = ok_newest or newest
        if outcome == "unavailable" and self.allow_unavailable:
            ok_any = True
        if outcome in self.tolerate:
            ok_any = True
        if not ok_any:
            t.wrong += 1
            exp_now = sorted(map(str, expect(self.oracle.current, probe.key, src, t_recv))) if cands else []
            extra = f" body {body[:120]!r}" if outcome.startswith("status") else ""
            t.sample(f"{time.strftime('%H:%M:%S', time.localtime(t_recv))} {probe.label} from {src}: "
                     f"got {got}, expected {exp_now} (lists considered: {len(cands)}){extra}",
                     kind=f"{probe.label.split(':')[0]}/{outcome}/{'/'.join(exp_now)}")
        elif not ok_newest:
            t.in_window += 1
        # exact counting per window (rate-limited keys: the answer names the window)
        if self.rate_check and probe.key is not None and outcome in ("allowed", "rate_limited"):
            ks = self.oracle.current.get(probe.key)
            if ks is not None and ks.limit is not None:
                reset = headers.get(b"x-ratelimit-reset")
                lim = headers.get(b"x-ratelimit-limit")
                if reset is not None and lim is not None:
                    w = self.windows[(ks.id, int(reset))]
                    w[0 if outcome == "allowed" else 1] += 1
                    w[2] = ks.limit[0]  # the good list's limit, whatever the answer claims

    def settle_windows(self, before: float | None = None) -> None:
        """Judge the windows that have ended (before `before`, Unix s; default now - 2)."""
        cutoff = (time.time() - 2) if before is None else before
        done = [k for k in self.windows if k[1] < cutoff]
        for k in done:
            allowed, refused, limit = self.windows.pop(k)
            self.tally.limit_windows += 1
            if allowed > limit:
                self.tally.limit_over += 1
                self.tally.sample(f"key {k[0]} window ending {k[1]}: {allowed} allowed > limit {limit}", kind="over")
            elif refused and allowed < limit:
                self.tally.limit_short += 1
                self.tally.sample(f"key {k[0]} window ending {k[1]}: {allowed} allowed < limit {limit} "
                                  f"with {refused} refused", kind="short")

    # ---- traffic ---------------------------------------------------------------------------
    async def _conn(self, n: int, src: str, stop: asyncio.Event) -> None:
        probes = list(self.probes[src])
        rng = random.Random(n * 7919)
        rng.shuffle(probes)
        i = 0
        reader = writer = None
        while not stop.is_set():
            if self.paused:
                await asyncio.sleep(0.05)
                continue
            probe = probes[i % len(probes)]
            i += 1
            try:
                if writer is None:
                    reader, writer = await asyncio.wait_for(
                        asyncio.open_connection(self.host, self.port, local_addr=(src, 0)), self.timeout)
                req = (f"GET {probe.path} HTTP/1.1\r\nHost: gw\r\n"
                       + (f"x-api-key: {probe.key}\r\n" if probe.key is not None else "")
                       + "\r\n").encode()
                t_send = time.time()
                writer.write(req)
                status, headers, body = await asyncio.wait_for(read_response(reader), self.timeout)
                t_recv = time.time()
                self.judge(probe, src, t_send, t_recv, status, headers, body)
                if headers.get(b"connection", b"").lower() == b"close":
                    writer.close()
                    reader = writer = None
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError) as e:
                self.tally.errors += 1
                self.tally.sample(f"transport error on connection {n} from {src}: {e!r}", kind=f"transport/{type(e).__name__}")
                if writer is not None:
                    writer.close()
                reader = writer = None
                await asyncio.sleep(0.05)
        if writer is not None:
            writer.close()

    async def run(self, stop: asyncio.Event) -> None:
        sources = list(self.probes)
        tasks = [asyncio.create_task(self._conn(n, sources[n % len(sources)], stop)) for n in range(self.connections)]
        await asyncio.gather(*tasks)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ValueError(f"bad status line {lines[0][:80]!r}")
    status = int(parts[1])
    headers: dict[bytes, bytes] = {}
    for ln in lines[1:]:
        if not ln:
            continue
        k, _, v = ln.partition(b":")
        headers[k.strip().lower()] = v.strip()
    if b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        chunks = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                break
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(chunks)
    elif status in (204, 304) or status < 200:
        body = b""
    else:
        raise ValueError("response without length")
    return status, headers, body


def percentiles(values: list[float], ps: Iterable[float] = (50, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p:g}": 0.0 for p in ps}
    v = sorted(values)
    return {f"p{p:g}": v[min(len(v) - 1, int(len(v) * p / 100))] for p in ps}
