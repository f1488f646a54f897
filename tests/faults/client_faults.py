"""Client faults (issue 17, item 3): clients that disconnect mid-request, send their headers byte
by byte, pipeline requests, speak HTTP/1.0, HTTP/2 without TLS (h2c, prior knowledge) or send
very large header sets, in rounds, next to a steady judged load (loadgen.Load, 16 connections).

    python3 tests/faults/client_faults.py [--rounds N] [--nginx]     (make test-faults)
    tests/integration/test_faults.py::test_client_faults runs a short form

Every answer that comes back is judged like the load's (the list never changes here, so the
expected answer is exact); Envoy must keep its PID and log no panic/trap/critical line, and its
RSS and keygate_shared_entries must not grow between the first round (the warm-up) and the last
(RSS within 5%), nor any VM's keygate_vm_memory_bytes past the largest VM's after the first round.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenario  # noqa: E402
from loadgen import Load, Oracle, expect, read_response  # noqa: E402

STATE = scenario.state_of(scenario.good_doc(1))
VALID = scenario.VALID[0]
REVOKED_LATER = scenario.REVOCABLE[0]   # active in list 1
UNKNOWN = scenario.UNKNOWN[0]
IPKEY = scenario.IPKEYS[0]


class Checker:
    def __init__(self):
        self.checked = 0
        self.wrong: list[str] = []
        self.counts: dict[str, int] = {}

    def judge(self, what: str, key: str | None, src: str, status: int, body: bytes) -> None:
        self.checked += 1
        self.counts[what] = self.counts.get(what, 0) + 1
        import re

        if status == 200:
            m = re.search(rb'\["x-api-key-id", "([^"]*)"\]', body)
            got: object = ("allowed", m.group(1).decode() if m else None)
        else:
            m = re.search(rb'"code":"([a-z_]+)"', body)
            got = m.group(1).decode() if m else f"status {status}"
        exp = expect(STATE, key, src, time.time())
        if got not in exp:
            self.wrong.append(f"{what}: key {key and key[:14]} from {src}: got {got}, expected {sorted(map(str, exp))}")


def req(key: str | None, path: str = "/r", version: str = "HTTP/1.1", extra: str = "") -> bytes:
    host = "Host: gw\r\n" if version == "HTTP/1.1" else ""
    k = f"x-api-key: {key}\r\n" if key is not None else ""
    return f"GET {path} {version}\r\n{host}{k}{extra}\r\n".encode()


async def _open(port: int, src: str = "127.0.0.1"):
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)), 5)


async def disconnect_mid_headers(port: int, c: Checker) -> None:
    r, w = await _open(port)
    w.write(b"GET /r HTTP/1.1\r\nHost: gw\r\nx-api-key: " + VALID.encode()[:8])
    await w.drain()
    w.close()
    c.counts["disconnect mid-headers"] = c.counts.get("disconnect mid-headers", 0) + 1


async def disconnect_mid_body(port: int, c: Checker) -> None:
    r, w = await _open(port)
    w.write(f"POST /r HTTP/1.1\r\nHost: gw\r\nx-api-key: {VALID}\r\ncontent-length: 100000\r\n\r\n".encode() + b"x" * 100)
    await w.drain()
    await asyncio.sleep(0.01)
    w.close()
    c.counts["disconnect mid-body"] = c.counts.get("disconnect mid-body", 0) + 1


async def disconnect_before_answer(port: int, c: Checker) -> None:
    r, w = await _open(port)
    w.write(req(VALID) + req(UNKNOWN))
    await w.drain()
    w.transport.abort()  # RST
    c.counts["reset before the answer"] = c.counts.get("reset before the answer", 0) + 1


async def byte_by_byte(port: int, c: Checker) -> None:
    for key, src in ((VALID, "127.0.0.1"), (REVOKED_LATER, "127.0.0.1"), (IPKEY, "127.0.0.2"), (IPKEY, "127.0.0.1")):
        r, w = await _open(port, src)
        for b in req(key, extra="x-filler: " + "f" * 40 + "\r\n"):
            w.write(bytes([b]))
            await w.drain()
            await asyncio.sleep(0.0005)
        status, _, body = await asyncio.wait_for(read_response(r), 10)
        c.judge("headers byte by byte", key, src, status, body)
        w.close()


async def pipelined(port: int, c: Checker, n: int = 24) -> None:
    """n requests in one write. Envoy closes the connection after a local reply (keygate's 401
    here) when more requests are pipelined behind it, without `Connection: close` (host
    behaviour, counted as `pipeline cut after a local reply`): like a real client, the
    unanswered rest is sent again on a new connection. Every answer is judged."""
    keys = ([VALID, scenario.VALID[1], REVOKED_LATER, scenario.VALID[2], VALID] * (n // 5))[:n] + [UNKNOWN, VALID, None]
    while keys:
        r, w = await _open(port)
        w.write(b"".join(req(k) for k in keys))
        await w.drain()
        answered = 0
        try:
            for k in list(keys):
                status, _, body = await asyncio.wait_for(read_response(r), 10)
                c.judge("pipelined", k, "127.0.0.1", status, body)
                answered += 1
        except (OSError, asyncio.IncompleteReadError):
            if answered == 0:
                raise
            c.counts["pipeline cut after a local reply"] = c.counts.get("pipeline cut after a local reply", 0) + 1
        keys = keys[answered:]
        w.close()


async def http10(port: int, c: Checker) -> None:
    for key, extra in ((VALID, ""), (UNKNOWN, ""), (VALID, "Connection: keep-alive\r\n")):
        r, w = await _open(port)
        w.write(req(key, version="HTTP/1.0", extra=extra))
        await w.drain()
        status, _, body = await asyncio.wait_for(read_response(r), 10)
        c.judge("HTTP/1.0", key, "127.0.0.1", status, body)
        w.close()


async def large_headers(port: int, c: Checker) -> None:
    # Envoy's defaults: 100 headers, 60 KiB in all. Just inside, with the key last.
    extra = "".join(f"x-big-{i}: {'v' * 500}\r\n" for i in range(90))
    r, w = await _open(port)
    for key in (VALID, UNKNOWN):
        w.write(f"GET /r HTTP/1.1\r\nHost: gw\r\n{extra}x-api-key: {key}\r\n\r\n".encode())
        await w.drain()
        status, _, body = await asyncio.wait_for(read_response(r), 10)
        c.judge("large header set", key, "127.0.0.1", status, body)
    w.close()
    # Over the proxy's limit: refused by the proxy before the filter (431 or a reset): never a 200.
    r, w = await _open(port)
    big = "".join(f"x-big-{i}: {'v' * 1000}\r\n" for i in range(95))
    w.write(f"GET /r HTTP/1.1\r\nHost: gw\r\nx-api-key: {VALID}\r\n{big}\r\n".encode())
    try:
        await w.drain()
        status, _, body = await asyncio.wait_for(read_response(r), 10)
        c.counts["over the header limit"] = c.counts.get("over the header limit", 0) + 1
        if status < 400:
            c.wrong.append(f"over the header limit: answered {status}")
    except (OSError, asyncio.IncompleteReadError, ValueError):
        c.counts["over the header limit"] = c.counts.get("over the header limit", 0) + 1
    w.close()


def h2c(port: int, c: Checker) -> None:
    """HTTP/2 with prior knowledge on the cleartext listener: several streams on one connection."""
    import h2.config
    import h2.connection
    import h2.events

    keys = [VALID, UNKNOWN, None, REVOKED_LATER, IPKEY, scenario.VALID[2]] * 3
    s = socket.create_connection(("127.0.0.1", port), 5)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sids = {}
        for k in keys:
            sid = conn.get_next_available_stream_id()
            hdrs = [(":method", "GET"), (":path", "/r"), (":scheme", "http"), (":authority", "gw")]
            if k is not None:
                hdrs.append(("x-api-key", k))
            conn.send_headers(sid, hdrs, end_stream=True)
            sids[sid] = [k, None, b""]
        s.sendall(conn.data_to_send())
        done = 0
        s.settimeout(10)
        while done < len(sids):
            data = s.recv(65536)
            if not data:
                break
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.ResponseReceived):
                    sids[ev.stream_id][1] = int(dict(ev.headers)[":status"])
                elif isinstance(ev, h2.events.DataReceived):
                    sids[ev.stream_id][2] += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    done += 1
                elif isinstance(ev, h2.events.StreamReset):
                    done += 1
                    c.wrong.append(f"h2c: stream {ev.stream_id} reset ({ev.error_code})")
            s.sendall(conn.data_to_send())
        for sid, (k, status, body) in sids.items():
            if status is None:
                c.wrong.append(f"h2c: no answer on stream {sid}")
                continue
            c.judge("HTTP/2 (h2c)", k, "127.0.0.1", status, body)
    finally:
        s.close()


FAULTS = [disconnect_mid_headers, disconnect_mid_body, disconnect_before_answer, byte_by_byte,
          http10, large_headers]


async def run(stack: scenario.Stack, rounds: int, per_round: int, h2: bool = True) -> tuple[Checker, dict, list[str]]:
    oracle = Oracle(scenario.WINDOW_S)
    oracle.publish(STATE, at=0.0)
    load = Load(stack.port, scenario.probes(), oracle, connections=16)
    stop = asyncio.Event()
    traffic = asyncio.create_task(load.run(stop))
    c = Checker()
    figures: dict = {}
    problems: list[str] = []
    try:
        for rnd in range(rounds):
            # once a round: each cut pipeline costs Envoy's delayed close (1 s)
            await pipelined(stack.port, c)
            for _ in range(per_round):
                await asyncio.gather(*(f(stack.port, c) for f in FAULTS), return_exceptions=False)
                if h2:
                    await asyncio.to_thread(h2c, stack.port, c)
            await asyncio.sleep(0.5)
            m = await asyncio.to_thread(stack.metrics)
            snap = {"rss_kb": stack.rss_kb(), "shared": m.get("keygate_shared_entries", 0),
                    "vm": {k: v for k, v in m.items() if k.startswith("keygate_vm_memory_bytes")}}
            figures.setdefault("rounds", []).append(snap)
    finally:
        stop.set()
        await traffic
    load.settle_windows(before=time.time() + 10)
    t = load.tally
    figures["load"] = t.snapshot()
    if t.wrong or t.status_5xx or t.errors or t.limit_over or t.limit_short:
        problems.append(f"background load: {t.snapshot()} samples {t.samples[:5]}")
    rs = figures["rounds"]
    if len(rs) >= 2:
        first, last = rs[0], rs[-1]
        growth = (last["rss_kb"] - first["rss_kb"]) / max(1, first["rss_kb"]) * 100
        figures["rss_growth_pct"] = growth
        if growth > 5:
            problems.append(f"RSS grew {growth:.1f}% from the first round to the last")
        if last["shared"] > first["shared"]:
            problems.append(f"shared entries grew: {first['shared']} -> {last['shared']}")
        # Linear memory is a high-water mark: a worker that meets its largest request (a large
        # header set lands on one worker or the other) only in a later round rises to what another
        # worker reached in the first. Growth past every VM's first-round size is what leaks.
        high = max(first["vm"].values(), default=0)
        for k, v in last["vm"].items():
            if v > max(high, first["vm"].get(k, 0)):
                problems.append(f"{k} grew past the first round's largest VM ({high:.0f}): {first['vm'].get(k)} -> {v}")
    problems += [f"wrong: {w}" for w in c.wrong[:20]]
    problems += stack.health()
    return c, figures, problems


def summary(c: Checker, figures: dict, problems: list[str], name: str) -> str:
    rs = figures.get("rounds", [])
    lines = [f"client faults on {name}: {c.checked} answers judged, {len(c.wrong)} wrong; per kind {c.counts}",
             f"background load: {figures.get('load', {}).get('requests', 0)} requests, "
             f"{figures.get('load', {}).get('wrong', 0)} wrong, {figures.get('load', {}).get('status_5xx', 0)} 5xx"]
    if rs:
        lines.append(f"RSS first/last round {rs[0]['rss_kb'] / 1024:.1f}/{rs[-1]['rss_kb'] / 1024:.1f} MiB "
                     f"({figures.get('rss_growth_pct', 0):+.1f}%), shared entries {rs[0]['shared']:.0f}/{rs[-1]['shared']:.0f}, "
                     f"VM memory {rs[0]['vm']} / {rs[-1]['vm']}")
    lines += [f"! {p}" for p in problems]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--per-round", type=int, default=40)
    ap.add_argument("--nginx", action="store_true")
    a = ap.parse_args(argv)
    if a.nginx and not os.environ.get("KEYGATE_NGINX"):
        print("SKIP: KEYGATE_NGINX is not set (an nginx built with ngx_wasm_module); nothing to run")
        return 0
    stack = scenario.start_stack(a.nginx, hcm_extra=scenario.HCM_HTTP10)
    try:
        # nginx's listener in run_nginx.py's configuration is HTTP/1 only
        c, figures, problems = asyncio.run(run(stack, a.rounds, a.per_round, h2=not a.nginx))
    finally:
        stack.stop()
    print(summary(c, figures, problems, stack.name))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
