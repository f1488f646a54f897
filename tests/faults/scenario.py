"""Faults under load (issue 17, item 1): the key service misbehaves in every way while 64
keep-alive connections send traffic whose correct answer is known at every instant.

    python3 tests/faults/scenario.py [--long] [--phase-s S] [--rounds N] [--nginx]   (make test-faults)
    tests/integration/test_faults.py runs the short form under pytest (make test)

The stack: the built keygate.wasm in a real Envoy (--concurrency 2; or nginx with
ngx_wasm_module when KEYGATE_NGINX is set and --nginx is given), tests/support/echo.py as the
upstream (a subprocess), tests/support/keyservice.py in this process.

Traffic (loadgen.Load): valid keys, keys a later good list revokes, keys a later good list adds,
unknown keys, keys with a small exact limit (5 per 1 s window), keys restricted to 127.0.0.2
(sent from 127.0.0.1 and 127.0.0.2), and requests without a key. Every bad document the key
service sends is an *evil* list (it unrevokes the revoked keys, revokes a valid one, adds the
unknown keys, lifts the IP restrictions and raises the limits) plus the defect that must reject
it, so a document that is wrongly accepted shows in decisions.

Per phase: requests, wrong decisions (outside the transition window refresh_s + timeout_ms after a
good publish), 5xx, transport errors, windows over/under their limit, and the keygate_list_fetches_total
deltas (each failure kind must move its metric). Over the run: the same Envoy PID, alive, no
panic/trap/critical line in its log.
"""
from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for p in (HERE, REPO / "tests" / "support", REPO / "tests" / "integration", REPO / "tests" / "nginx"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import loadgen  # noqa: E402
from keyservice import KeyService, sha256_hex  # noqa: E402
from loadgen import KeyState, Load, Oracle, Probe  # noqa: E402

REFRESH_S = 1
TIMEOUT_MS = 500
MAX_BYTES = 256 * 1024
LIMIT = (5, 1)          # the limited keys: 5 per 1 s window
# SPEC §5: a change is in force on every worker within refresh_s + timeout_ms. The filter's
# tick (100 ms, when a worker looks at the published list) and the 1 s backoff after a failed
# fetch are inside that budget; 0.3 s covers the oracle's clock being read before the key service
# swaps its document and the client-side timestamping.
WINDOW_S = REFRESH_S + TIMEOUT_MS / 1000 + 0.3
HOSTILE_HOLD_S = 1.3
SHORT_PHASE_S = 3.0
def fetch_metric(result: str) -> str:
    """The tagged Prometheus name of one fetch result (envoy/prometheus/stats_tags.yaml)."""
    return f'keygate_list_fetches_total{{result="{result}"}}'


FETCH = [fetch_metric(r) for r in ("ok", "not_modified", "failed", "rejected")]


# =================================================================================================
# keys and lists
# =================================================================================================
def _keys(prefix: str, n: int) -> list[str]:
    return [f"ak_{prefix}_{i:02d}_{sha256_hex(prefix + str(i))[:10]}" for i in range(n)]


VALID = _keys("valid", 6)
REVOCABLE = _keys("revocable", 12)   # active until a good publish revokes them, one more each time
ADDABLE = _keys("addable", 12)       # absent until a good publish adds them, one more each time
UNKNOWN = _keys("unknown", 3)        # never in a good list
LIMITED = _keys("limited", 3)
IPKEYS = _keys("ip2", 2)             # allowed_ips 127.0.0.2/32
SOURCES = ("127.0.0.1", "127.0.0.2")


def kid(plain: str) -> str:
    return "id_" + plain[3:].rsplit("_", 1)[0]


def good_doc(gen: int) -> dict:
    """The gen-th good list: REVOCABLE[:gen] revoked, ADDABLE[:gen] present."""
    keys = [{"id": kid(k), "hash": sha256_hex(k), "owner": "org-a"} for k in VALID]
    keys += [{"id": kid(k), "hash": sha256_hex(k), "owner": "org-a", **({"status": "revoked"} if i < gen else {})}
             for i, k in enumerate(REVOCABLE)]
    keys += [{"id": kid(k), "hash": sha256_hex(k), "owner": "org-b"} for k in ADDABLE[:gen]]
    keys += [{"id": kid(k), "hash": sha256_hex(k), "owner": "org-a",
              "rate_limits": [{"limit": LIMIT[0], "window_s": LIMIT[1]}]} for k in LIMITED]
    keys += [{"id": kid(k), "hash": sha256_hex(k), "owner": "org-b", "allowed_ips": ["127.0.0.2/32"]} for k in IPKEYS]
    return {"version": f"good-{gen}", "owners": {"org-a": {"status": "active"}, "org-b": {}}, "keys": keys}


def state_of(doc: dict) -> dict[str, KeyState]:
    """The oracle's view of a good document (only the fields these lists use)."""
    by_hash = {sha256_hex(k): k for k in VALID + REVOCABLE + ADDABLE + UNKNOWN + LIMITED + IPKEYS}
    out = {}
    for k in doc["keys"]:
        plain = by_hash[k["hash"]]
        rl = k.get("rate_limits")
        out[plain] = KeyState(id=k["id"], status=k.get("status", "active"),
                              allowed_ips=tuple(k.get("allowed_ips", ())),
                              limit=(rl[0]["limit"], rl[0]["window_s"]) if rl and len(rl) == 1 else None,
                              limited=bool(rl))
    return out


def evil_doc(gen: int) -> dict:
    """What must never be in force: every decision it changes is visible in the traffic."""
    d = good_doc(gen)
    for k in d["keys"]:
        k.pop("status", None)                       # revoked keys come back
        k.pop("allowed_ips", None)                  # IP restrictions lifted
        if "rate_limits" in k:
            k["rate_limits"] = [{"limit": 100000, "window_s": LIMIT[1]}]
    d["keys"][0]["status"] = "revoked"              # a valid key is refused
    d["keys"] += [{"id": kid(k), "hash": sha256_hex(k), "owner": "org-a"} for k in UNKNOWN]
    d["version"] = f"evil-{gen}"
    return d


def probes() -> dict[str, list[Probe]]:
    base = ([Probe(f"valid:{kid(k)}", k) for k in VALID]
            + [Probe(f"revocable:{kid(k)}", k) for k in REVOCABLE[:6]]
            + [Probe(f"addable:{kid(k)}", k) for k in ADDABLE[:6]]
            + [Probe(f"unknown:{kid(k)}", k) for k in UNKNOWN]
            + [Probe(f"limited:{kid(k)}", k) for k in LIMITED] * 2
            + [Probe(f"ip:{kid(k)}", k) for k in IPKEYS]
            + [Probe("no key", None)])
    return {src: list(base) for src in SOURCES}


# ---- bad bodies ---------------------------------------------------------------------------------
def body_invalid_json(gen: int) -> bytes:
    return json.dumps(evil_doc(gen)).encode()[:-7]


def body_invalid_document(gen: int) -> bytes:
    d = evil_doc(gen)
    d["keys"].append(dict(d["keys"][1], hash=sha256_hex("ak_other_dup")))  # duplicate id
    return json.dumps(d).encode()


def body_over_max_bytes(gen: int) -> bytes:
    d = evil_doc(gen)
    d["meta"] = {"padding": "p" * (MAX_BYTES + 1024)}
    return json.dumps(d).encode()


def body_evil(gen: int) -> bytes:
    return json.dumps(evil_doc(gen)).encode()


def hostile_bodies(gen: int) -> list[tuple[str, bytes]]:
    """SPEC §2: trailing data, duplicate members and unknown members fail to parse."""
    evil = json.dumps(evil_doc(gen))
    good = json.dumps(good_doc(gen))
    dup_top = evil[:-1] + ', "version": "again"}'
    d = evil_doc(gen)
    dup_key = json.dumps(d).replace('"owner": "org-a"}', '"owner": "org-a", "owner": "org-a"}', 1)
    unknown_member = copy.deepcopy(d)
    unknown_member["keys"][1]["alowed_ips"] = ["10.0.0.0/8"]
    return [
        ("trailing `}`", (evil + "}").encode()),
        ("trailing second document", (evil + "\n" + good).encode()),
        ("trailing garbage", (evil + " xyz").encode()),
        ("duplicate top-level member", dup_top.encode()),
        ("duplicate key member", dup_key.encode()),
        ("unknown member", json.dumps(unknown_member).encode()),
    ]


# =================================================================================================
# the stack
# =================================================================================================
class Stack:
    """What a fault run needs of the proxy: its port, metrics, identity, health."""
    port: int
    ks: KeyService

    def metrics(self) -> dict[str, float]: ...
    def identity(self) -> Any: ...
    def health(self) -> list[str]: ...
    def rss_kb(self) -> int: ...
    def stop(self) -> None: ...


def start_echo() -> tuple[subprocess.Popen, int]:
    import harness

    for _ in range(5):
        port = harness.free_port()
        proc = subprocess.Popen([sys.executable, str(HERE / "echo_upstream.py"), str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                import socket

                socket.create_connection(("127.0.0.1", port), 0.2).close()
                return proc, port
            except OSError:
                time.sleep(0.05)
        proc.kill()
        proc.wait()
    raise RuntimeError("echo upstream did not start")


def stop_proc(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def rss_kb(pid: int) -> int:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1])
    except OSError:
        pass
    return 0


_CRITICAL = re.compile(r"\]\[critical\]|keygate: panic")


class EnvoyStack(Stack):
    def __init__(self, doc: Any, plugin_extra: dict | None = None, runtime: dict | None = None,
                 concurrency: int = 2, hcm_extra: dict | None = None, echo: bool = True):
        import harness
        from util import start_envoy

        self.echo, echo_port = start_echo() if echo else (None, harness.free_port())
        self.ks = KeyService(doc).start()
        cfg = {"key_list": {"cluster": "keyservice", "path": "/v1/keys", "refresh_s": REFRESH_S,
                            "timeout_ms": TIMEOUT_MS, "max_bytes": MAX_BYTES}}
        for k, v in (plugin_extra or {}).items():
            if k == "key_list":
                cfg["key_list"].update(v)
            else:
                cfg[k] = v
        try:
            self.env = start_envoy(harness.start_envoy, cfg, self.ks.port, echo_port, concurrency=concurrency,
                                   runtime=runtime, hcm_extra=hcm_extra)
        except BaseException:
            self.ks.stop()
            stop_proc(self.echo)
            raise
        self.port = self.env.port
        self.pid = self.env.proc.pid
        self.name = f"Envoy --concurrency {concurrency} (pid {self.pid})"

    def metrics(self) -> dict[str, float]:
        # The admin endpoint runs on Envoy's main thread, which is also where a large list is
        # parsed (for seconds, with 1M keys): wait for it rather than fail.
        import harness

        for attempt in range(3):
            try:
                r = harness.http_request("127.0.0.1", self.env.admin_port, "GET", "/stats/prometheus", timeout=30)
                return {k: v for k, v in harness.parse_prometheus(r.text).items() if k.startswith("keygate_")}
            except OSError:
                if attempt == 2:
                    raise
        return {}

    def identity(self) -> Any:
        return self.env.proc.pid if self.env.running else None

    def health(self) -> list[str]:
        problems = []
        if not self.env.running:
            problems.append(f"Envoy exited with {self.env.returncode}")
        if self.env.proc.pid != self.pid:
            problems.append("Envoy PID changed")
        bad = self.env.wasm_failures() + [ln for ln in self.env.log().splitlines() if _CRITICAL.search(ln)]
        problems += [f"log: {ln[:300]}" for ln in dict.fromkeys(bad)][:10]
        return problems

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def log(self) -> str:
        return self.env.log()

    def stop(self) -> None:
        self.env.stop()
        self.ks.stop()
        stop_proc(self.echo)


class NginxStack(Stack):
    """nginx + ngx_wasm_module (KEYGATE_NGINX), configured like tests/nginx/run_nginx.py."""

    def __init__(self, doc: Any, plugin_extra: dict | None = None, workers: int = 2):
        import run_nginx

        self.echo, echo_port = start_echo()
        self.ks = KeyService(doc).start()
        port, = run_nginx.free_ports(1)
        addr = f"127.0.0.1:{self.ks.port}"
        cfg = {"key_list": {"cluster": addr, "authority": addr, "path": "/v1/keys", "refresh_s": REFRESH_S,
                            "timeout_ms": TIMEOUT_MS, "max_bytes": MAX_BYTES}}
        for k, v in (plugin_extra or {}).items():
            if k == "key_list":
                cfg["key_list"].update(v)
            else:
                cfg[k] = v
        self.nginx = run_nginx.Nginx(os.environ["KEYGATE_NGINX"], [(port, cfg)], echo_port, workers=workers,
                                     name="faults")
        try:
            self.nginx.start()
            self.nginx.wait_ready()
        except BaseException:
            self.nginx.stop()
            self.ks.stop()
            stop_proc(self.echo)
            raise
        self.port = port
        self.pid = self.nginx.proc.pid if self.nginx.proc else 0
        self.workers0 = self.nginx.worker_pids()
        self.name = f"nginx, {workers} workers (master pid {self.pid})"

    def metrics(self) -> dict[str, float]:
        return {}  # ngx_wasm_module has no Prometheus endpoint here: fetch outcomes are not checked

    def identity(self) -> Any:
        return (self.pid, tuple(sorted(self.nginx.worker_pids())))

    def health(self) -> list[str]:
        problems = []
        if self.nginx.proc is None or self.nginx.proc.poll() is not None:
            problems.append("nginx exited")
        workers = self.nginx.worker_pids()
        if self.workers0 and workers != self.workers0:
            problems.append(f"nginx workers changed: {sorted(self.workers0)} -> {sorted(workers)}")
        bad = [ln for ln in self.nginx.log().splitlines()
               if re.search(r"panicked at|\[crit\]|\[emerg\]|\[alert\]|trap|keygate: panic", ln)]
        problems += [f"log: {ln[:300]}" for ln in dict.fromkeys(bad)][:10]
        return problems

    def rss_kb(self) -> int:
        return sum(rss_kb(p) for p in [self.pid, *self.nginx.worker_pids()])

    def log(self) -> str:
        return self.nginx.log()

    def stop(self) -> None:
        self.nginx.stop()
        self.ks.stop()
        stop_proc(self.echo)


# =================================================================================================
# phases
# =================================================================================================
@dataclass
class Phase:
    name: str
    what: str
    start: Callable[["Run"], Any]
    grow: list[str] = field(default_factory=list)   # fetch metrics that must move
    flat: list[str] = field(default_factory=list)   # fetch metrics that must not move
    xfail: str = ""                                 # reason: expected to fail on this branch
    keep_service: bool = False                      # do not reset the key service afterwards
    min_s: float = 0.0                              # at least this long, whatever phase_s


@dataclass
class PhaseResult:
    name: str
    what: str
    seconds: float
    tally: dict
    metrics: dict
    problems: list[str]
    samples: list[str]
    xfail: str = ""
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        t = self.tally
        m = " ".join(f"{k.removeprefix('keygate_')}+{v:g}" for k, v in self.metrics.items() if v) or "-"
        status = "ok" if not self.problems else ("XFAIL" if self.xfail else "FAIL")
        return (f"{self.name:<20} {t['requests']:>7} req  wrong {t['wrong']:>3}  in-window {t['in_window']:>5}  "
                f"5xx {t['status_5xx']:>2}  err {t['errors']:>2}  windows {t['limit_windows']:>3} "
                f"(over {t['limit_over']}, short {t['limit_short']})  {m}  [{status}]")


class Run:
    """One stack, one load, the phases in order."""

    def __init__(self, stack: Stack, load: Load, oracle: Oracle, phase_s: float):
        self.stack = stack
        self.ks = stack.ks
        self.load = load
        self.oracle = oracle
        self.phase_s = phase_s
        self.gen = 1
        self.aux: list[asyncio.Task] = []
        self.notes: list[str] = []

    def publish(self, gen: int | None = None) -> None:
        """A new good list: the oracle first, then the key service."""
        if gen is not None:
            self.gen = gen
        doc = good_doc(self.gen)
        self.oracle.publish(state_of(doc))
        self.ks.set_document(doc)

    def spawn(self, coro) -> None:
        self.aux.append(asyncio.create_task(coro))

    async def stop_aux(self) -> None:
        for t in self.aux:
            t.cancel()
        for t in self.aux:
            try:
                await t
            except (asyncio.CancelledError, Exception):  # noqa: BLE001
                pass
        self.aux.clear()


def _p_baseline(r: Run) -> None:
    pass


def _p_500(r: Run) -> None:
    r.ks.status = 500


def _p_hang(r: Run) -> None:
    r.ks.delay = TIMEOUT_MS / 1000 * 4


def _p_reset(r: Run) -> None:
    r.ks.rst = True


def _p_truncated(r: Run) -> None:
    r.ks.body_override = body_evil(r.gen)
    r.ks.truncate = True


def _p_over_max(r: Run) -> None:
    r.ks.body_override = body_over_max_bytes(r.gen)


def _p_invalid_json(r: Run) -> None:
    r.ks.body_override = body_invalid_json(r.gen)


def _p_invalid_doc(r: Run) -> None:
    r.ks.body_override = body_invalid_document(r.gen)


def _p_flap(r: Run) -> None:
    bad = body_invalid_json(r.gen)

    async def flap():
        on = True
        while True:
            r.ks.body_override = bad if on else None
            on = not on
            await asyncio.sleep(1.0)

    r.spawn(flap())


def _p_publish(r: Run) -> None:
    async def two():
        r.publish(r.gen + 1)
        await asyncio.sleep(r.phase_s / 2)
        r.publish(r.gen + 1)

    r.spawn(two())


def _p_publish_no_etag(r: Run) -> None:
    r.ks.etag = False
    r.publish(r.gen + 1)


def _p_304_no_etag(r: Run) -> None:
    r.ks.etag = False
    r.ks.status = 304


def _p_hostile(r: Run) -> None:
    bodies = hostile_bodies(r.gen)

    async def cycle():
        # each body is served long enough for one fetch (refresh_s, or the 1 s backoff after a
        # rejection); what the filter made of it is noted from the fetch metrics
        i = 0
        while True:
            name, body = bodies[i % len(bodies)]
            m0 = await asyncio.to_thread(r.stack.metrics)
            r.ks.body_override = body
            await asyncio.sleep(HOSTILE_HOLD_S)
            m1 = await asyncio.to_thread(r.stack.metrics)
            d = {k.split('"')[1]: m1.get(k, 0) - m0.get(k, 0) for k in FETCH if m1.get(k, 0) - m0.get(k, 0)}
            verdict = ("PUBLISHED (must be rejected)" if d.get("ok") else
                       "rejected" if d.get("rejected") else "no verdict") if m1 else "served"
            r.notes.append(f"{name}: {verdict} {d}")
            i += 1

    r.spawn(cycle())


PHASES = [
    Phase("baseline", "good list, normal service (304s)", _p_baseline,
          grow=[], flat=[fetch_metric("failed"), fetch_metric("rejected")]),
    Phase("status_500", "every fetch answered 500", _p_500,
          grow=[fetch_metric("failed")], flat=[fetch_metric("ok"), fetch_metric("rejected")]),
    Phase("hang", f"answers after {TIMEOUT_MS * 4} ms > timeout_ms {TIMEOUT_MS}", _p_hang,
          grow=[fetch_metric("failed")], flat=[fetch_metric("ok"), fetch_metric("rejected")]),
    Phase("reset", "connection reset (RST) before any answer", _p_reset,
          grow=[fetch_metric("failed")], flat=[fetch_metric("ok"), fetch_metric("rejected")]),
    Phase("truncated", "200, half the announced body of an evil list, then RST", _p_truncated,
          grow=[fetch_metric("failed")], flat=[fetch_metric("ok"), fetch_metric("rejected")]),
    Phase("over_max_bytes", f"an evil list padded over max_bytes {MAX_BYTES}", _p_over_max,
          grow=[fetch_metric("rejected")], flat=[fetch_metric("ok"), fetch_metric("failed")]),
    Phase("invalid_json", "an evil list cut short (bad JSON)", _p_invalid_json,
          grow=[fetch_metric("rejected")], flat=[fetch_metric("ok"), fetch_metric("failed")]),
    Phase("invalid_document", "an evil list with a duplicate key id", _p_invalid_doc,
          grow=[fetch_metric("rejected")], flat=[fetch_metric("ok"), fetch_metric("failed")]),
    Phase("flap", "good (304) and bad JSON alternating every second", _p_flap,
          grow=[fetch_metric("rejected"), fetch_metric("not_modified")], flat=[fetch_metric("ok"), fetch_metric("failed")]),
    Phase("publish", "two good lists, each revoking one key and adding one", _p_publish,
          grow=[fetch_metric("ok")], flat=[fetch_metric("failed"), fetch_metric("rejected")]),
    Phase("publish_no_etag", "a good list (revoke + add) served without ETag", _p_publish_no_etag,
          grow=[fetch_metric("ok")], flat=[fetch_metric("failed"), fetch_metric("rejected"), fetch_metric("not_modified")],
          keep_service=True),
    Phase("304_without_etag", "304 to every fetch, though no ETag was ever sent for this list", _p_304_no_etag,
          grow=[fetch_metric("failed")], flat=[fetch_metric("ok"), fetch_metric("not_modified"), fetch_metric("rejected")]),
    Phase("hostile_documents", "evil lists + trailing data / duplicate members / unknown member, "
          "then a good list", _p_hostile,
          grow=[fetch_metric("rejected")], flat=[fetch_metric("ok")], min_s=6 * HOSTILE_HOLD_S + WINDOW_S + 0.8),
    Phase("publish_after", "a good list (revoke + add) after everything", _p_publish,
          grow=[fetch_metric("ok")], flat=[fetch_metric("failed"), fetch_metric("rejected")]),
]


async def run_phases(stack: Stack, phase_s: float, rounds: int = 1, connections: int = 64,
                     settle_s: float | None = None, log: Callable[[str], None] = print,
                     only: set[str] | None = None, allow_no_metrics: bool = False) -> list[PhaseResult]:
    """Runs every phase under load; returns one result per phase (per round)."""
    settle_s = WINDOW_S if settle_s is None else settle_s
    oracle = Oracle(WINDOW_S)
    run = Run(stack, None, oracle, phase_s)  # type: ignore[arg-type]
    # the list the stack started with is gen 1
    oracle.publish(state_of(good_doc(1)), at=0.0)
    load = Load(stack.port, probes(), oracle, connections=connections)
    run.load = load
    stop = asyncio.Event()
    traffic = asyncio.create_task(load.run(stop))
    results: list[PhaseResult] = []
    ident = stack.identity()
    try:
        await asyncio.sleep(settle_s)
        load.settle_windows()
        for rnd in range(rounds):
            for ph in PHASES:
                if only and ph.name not in only:
                    continue
                res = await _one_phase(run, ph, settle_s)
                if rounds > 1:
                    res.name = f"{res.name}#{rnd + 1}"
                if stack.identity() != ident:
                    res.problems.append(f"the proxy process changed: {ident} -> {stack.identity()}")
                results.append(res)
                log(res.line())
                for s in res.notes:
                    log(f"    - {s}")
                for s in res.samples[:5]:
                    log(f"    {s}")
                for p in res.problems[:8]:
                    log(f"    ! {p}")
    finally:
        stop.set()
        await run.stop_aux()
        await traffic
    return results


async def _one_phase(run: Run, ph: Phase, settle_s: float) -> PhaseResult:
    stack, load = run.stack, run.load
    m0 = await asyncio.to_thread(stack.metrics)
    t0 = load.tally.snapshot()
    s0 = len(load.tally.samples)
    started = time.time()
    run.notes = []
    ph.start(run)
    hostile = ph.name == "hostile_documents"
    fault_s = max(run.phase_s, ph.min_s) - (WINDOW_S + 0.5 if hostile else 0)
    await asyncio.sleep(fault_s)
    m1 = await asyncio.to_thread(stack.metrics)
    await run.stop_aux()
    if hostile:
        # the recovery: the good list again (new bytes, new ETag), judged within this phase
        run.ks.reset()
        run.publish()
        await asyncio.sleep(WINDOW_S + 0.5)
    elif not ph.keep_service:
        run.ks.reset()
        run.ks.set_document(good_doc(run.gen))
    # the service answers normally again; answers still arriving belong to this phase
    await asyncio.sleep(settle_s)
    load.settle_windows(before=time.time() - 1.5)
    t1 = load.tally.snapshot()
    tally = loadgen.diff(t1, t0)
    deltas = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in FETCH}
    problems = []
    if tally["requests"] < 50:
        problems.append(f"only {tally['requests']} requests")
    for k in ("wrong", "status_5xx", "errors", "limit_over", "limit_short"):
        if tally[k]:
            problems.append(f"{k}: {tally[k]}")
    if m0 or m1:
        for k in ph.grow:
            if deltas[k] < 1:
                problems.append(f"{k} did not grow (deltas {deltas})")
        for k in ph.flat:
            if deltas[k] != 0:
                problems.append(f"{k} moved by {deltas[k]:g} (deltas {deltas})")
    problems += stack.health()
    return PhaseResult(ph.name, ph.what, time.time() - started, tally, deltas, problems,
                       load.tally.samples[s0:], ph.xfail, list(run.notes))


# HTTP/1.0 reaches the filter only when the listener accepts it (Envoy answers 426 otherwise).
HCM_HTTP10 = {"http_protocol_options": {"accept_http_10": True, "default_host_for_http_10": "gw"}}


def start_stack(nginx: bool = False, hcm_extra: dict | None = None) -> Stack:
    doc = good_doc(1)
    stack: Stack = NginxStack(doc) if nginx else EnvoyStack(doc, hcm_extra=hcm_extra)
    # wait for the first list on every worker
    import harness
    from harness import http_request

    def loaded() -> bool:
        return all(http_request("127.0.0.1", stack.port, "GET", "/r", {"x-api-key": VALID[0]}).status == 200
                   for _ in range(8))

    try:
        harness.wait_until(loaded, 15.0, 0.1, "first key list loaded")
    except BaseException:
        stack.stop()
        raise
    return stack


def report(results: list[PhaseResult], stack_name: str, elapsed: float) -> str:
    lines = [f"faults under load on {stack_name}: {len(results)} phases in {elapsed:.0f} s "
             f"(refresh_s {REFRESH_S}, timeout_ms {TIMEOUT_MS}, transition window {WINDOW_S:.1f} s)"]
    lines += [r.line() for r in results]
    total = sum(r.tally["requests"] for r in results)
    wrong = sum(r.tally["wrong"] for r in results if not r.xfail)
    lines.append(f"total {total} requests, {wrong} wrong decisions outside xfail phases")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--long", action="store_true", help="15 s phases, 2 rounds (make test-faults)")
    ap.add_argument("--phase-s", type=float, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--nginx", action="store_true", help="run under nginx (needs KEYGATE_NGINX)")
    ap.add_argument("--only", default="", help="comma-separated phase names")
    a = ap.parse_args(argv)
    if a.nginx and not os.environ.get("KEYGATE_NGINX"):
        print("SKIP: KEYGATE_NGINX is not set (an nginx built with ngx_wasm_module); nothing to run")
        return 0
    phase_s = a.phase_s or (15.0 if a.long else SHORT_PHASE_S)
    rounds = a.rounds or (2 if a.long else 1)
    t = time.time()
    stack = start_stack(a.nginx)
    try:
        print(f"stack: {stack.name}; {a.connections} connections; phases of {phase_s:g} s x {rounds}", flush=True)
        results = asyncio.run(run_phases(stack, phase_s, rounds, a.connections,
                                         log=lambda s: print(s, flush=True),
                                         only=set(filter(None, a.only.split(","))) or None))
        health = stack.health()
    finally:
        stack.stop()
    print(report(results, stack.name, time.time() - t))
    failed = [r for r in results if r.problems and not r.xfail]
    xfailed = [r for r in results if r.problems and r.xfail]
    for r in xfailed:
        print(f"XFAIL {r.name}: {r.xfail}")
    for p in health:
        print(f"! {p}")
    print(f"{len(results) - len(failed) - len(xfailed)} phases passed, {len(failed)} failed, {len(xfailed)} xfailed")
    return 1 if failed or health else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
