"""Soak (issue 17, item 2): steady keep-alive load on Envoy (--concurrency 2) while the key service
rotates a ~10k-key list every second, with a 1M-key list in its place every few minutes (the first
during warm-up, so the VMs' linear memory has reached its high-water mark before it is judged).

    python3 tests/faults/soak.py [--seconds 600] [--warmup 150] [--big-every 180]   (make soak; SOAK_S)

Each second the list changes: keys are added, revoked, unrevoked, given an expiry a few seconds
ahead, moved between plans (one with a small limit, one without limits, one large), and an owner
is disabled or re-enabled. ~150 of the keys are sent by the clients, along with unknown keys, keys
with an exact limit (5 per 1 s), keys restricted to 127.0.0.2 and requests without a key; every
answer is judged against the lists published in the transition window (loadgen.Oracle), so the
count of wrong decisions must be 0.

Reported (stdout, and Markdown in target/soak/): requests served, wrong decisions, 5xx, Envoy RSS
at start / after warm-up / end (growth after warm-up must be <= 5%), keygate_shared_entries
(must not grow after warm-up), p50/p99 latency per minute, keygate_vm_memory_bytes per VM, fetch
outcomes. Exit status 1 when a bound is broken.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import scenario  # noqa: E402  (sets sys.path for the support modules)
from loadgen import KeyState, Load, Oracle, Probe, percentiles  # noqa: E402

REPO = scenario.REPO
BIG = 536_870_912  # http.async_response_buffer_limit and max_bytes for the 1M-key list
REFRESH_S = 1
TIMEOUT_MS = 5000
WINDOW_S = REFRESH_S + TIMEOUT_MS / 1000 + 0.3
N_KEYS = 10_000
N_OWNERS = 100
N_PROBE = 150
BIG_KEYS = 1_000_000
PLANS = {"free": {"rate_limits": [{"limit": 100000, "window_s": 60}]},
         "tiny": {"rate_limits": [{"limit": 3, "window_s": 1}]},
         "open": {"rate_limits": []}}


def plain(i: int) -> str:
    return f"ak_soak_{i:06d}_{hashlib.sha256(str(i).encode()).hexdigest()[:12]}"


class Rotation:
    """The ~10k-key list and its changes, and the oracle's view of the keys clients send."""

    def __init__(self, seed: int = 5):
        self.rng = random.Random(seed)
        self.next_index = 0
        self.keys: dict[int, dict] = {}
        self.plain: dict[int, str] = {}
        self.owners = {f"org-{o:03d}": {"status": "active"} for o in range(N_OWNERS)}
        self.gen = 0
        for _ in range(N_KEYS):
            self._add()
        self.probe_idx = list(range(N_PROBE))               # the first keys are the ones sent
        self.unknown = [plain(10_000_000 + i) for i in range(5)]
        self.limited = [f"ak_soak_limited_{i}" for i in range(3)]
        self.ipkeys = [f"ak_soak_ip2_{i}" for i in range(2)]
        self.changes = 0

    def _add(self) -> int:
        i = self.next_index
        self.next_index += 1
        p = plain(i)
        self.plain[i] = p
        self.keys[i] = {"id": f"k{i:06d}", "hash": hashlib.sha256(p.encode()).hexdigest(),
                        "owner": f"org-{i % N_OWNERS:03d}", "plan": "free"}
        return i

    def rotate(self, now: float) -> None:
        """One second's changes; the probed keys are picked more often, so changes are seen."""
        rng = self.rng
        self.gen += 1

        def pick() -> int:
            if rng.random() < 0.5:
                return rng.choice(self.probe_idx)
            return rng.choice(list(self.keys)) if rng.random() < 0.02 else rng.randrange(self.next_index)

        for _ in range(5):  # revoke / unrevoke
            i = pick()
            if i in self.keys:
                k = self.keys[i]
                k["status"] = "active" if k.get("status") == "revoked" else "revoked"
        for _ in range(3):  # expiry a few seconds ahead, or none again
            i = pick()
            if i in self.keys:
                k = self.keys[i]
                if "expires_at" in k:
                    del k["expires_at"]
                else:
                    k["expires_at"] = int(now) + rng.randint(2, 8)
        for _ in range(5):  # plan / limits
            i = pick()
            if i in self.keys:
                k = self.keys[i]
                k.pop("rate_limits", None)
                if rng.random() < 0.2:
                    k["rate_limits"] = [{"limit": 2, "window_s": 1}]
                else:
                    k["plan"] = rng.choice(list(PLANS))
        o = f"org-{rng.randrange(N_OWNERS):03d}"  # an owner disabled or enabled again
        self.owners[o] = {"status": "active" if self.owners[o].get("status") == "disabled" else "disabled"}
        for _ in range(4):  # removed (non-probed) and added keys: the list stays ~10k
            victims = [i for i in (rng.randrange(self.next_index) for _ in range(3))
                       if i in self.keys and i not in self.probe_idx]
            if victims:
                del self.keys[victims[0]]
            self._add()
        # a removed probe key comes back as unknown, then is added again later
        if rng.random() < 0.3:
            i = rng.choice(self.probe_idx)
            if i in self.keys:
                self.removed = getattr(self, "removed", {})
                self.removed[i] = self.keys.pop(i)
            elif getattr(self, "removed", {}).get(i):
                self.keys[i] = self.removed.pop(i)
        self.changes += 5 + 3 + 5 + 1 + 8

    def document(self) -> dict:
        keys = list(self.keys.values())
        keys += [{"id": f"lim{i}", "hash": hashlib.sha256(k.encode()).hexdigest(), "owner": "org-000",
                  "rate_limits": [{"limit": scenario.LIMIT[0], "window_s": scenario.LIMIT[1]}]}
                 for i, k in enumerate(self.limited)]
        keys += [{"id": f"ip{i}", "hash": hashlib.sha256(k.encode()).hexdigest(), "owner": "org-stable",
                  "allowed_ips": ["127.0.0.2/32"]} for i, k in enumerate(self.ipkeys)]
        owners = dict(self.owners)
        owners["org-stable"] = {}
        owners["org-000"] = {"status": "active"}  # the limited keys' owner stays active
        return {"version": f"soak-{self.gen}", "owners": owners, "plans": PLANS, "keys": keys}

    def state(self) -> dict[str, KeyState]:
        st: dict[str, KeyState] = {}
        owners = dict(self.owners)
        owners["org-000"] = {"status": "active"}
        for i in self.probe_idx:
            k = self.keys.get(i)
            if k is None:
                continue
            rl = k.get("rate_limits", PLANS[k.get("plan", "free")]["rate_limits"] if "plan" in k else None)
            st[self.plain[i]] = KeyState(id=k["id"], status=k.get("status", "active"), expires_at=k.get("expires_at"),
                                         owner_ok=owners.get(k["owner"], {}).get("status", "active") == "active",
                                         limited=bool(rl))
        for i, p in enumerate(self.limited):
            st[p] = KeyState(id=f"lim{i}", limit=scenario.LIMIT, limited=True)
        for i, p in enumerate(self.ipkeys):
            st[p] = KeyState(id=f"ip{i}", allowed_ips=("127.0.0.2/32",))
        return st

    def probes(self) -> dict[str, list[Probe]]:
        base = ([Probe(f"rotating:{i}", self.plain[i]) for i in self.probe_idx]
                + [Probe("unknown", p) for p in self.unknown]
                + [Probe("limited", p) for p in self.limited] * 4
                + [Probe("ip", p) for p in self.ipkeys] * 2
                + [Probe("no key", None)] * 2)
        return {src: list(base) for src in scenario.SOURCES}


def filler(n: int) -> bytes:
    """n more keys for the 1M-key list (nobody sends them), as a JSON fragment."""
    sha = hashlib.sha256
    return ",".join('{"id":"f%07d","hash":"%s","owner":"org-stable"}' % (i, sha(b"filler/%d" % i).hexdigest())
                    for i in range(n)).encode()


def mib(n: float) -> str:
    return f"{n / 1048576:.1f}"


async def soak(args) -> int:
    rot = Rotation()
    oracle = Oracle(WINDOW_S, keep=max(16, int(WINDOW_S) + 8))
    doc = rot.document()
    oracle.publish(rot.state(), at=0.0)
    print(f"building the 1M-key filler ({BIG_KEYS - len(doc['keys'])} keys) ...", flush=True)
    fill = await asyncio.to_thread(filler, BIG_KEYS - len(doc["keys"]))
    stack = scenario.EnvoyStack(doc, plugin_extra={"key_list": {"refresh_s": REFRESH_S, "timeout_ms": TIMEOUT_MS,
                                                                "max_bytes": BIG}},
                                runtime={"http.async_response_buffer_limit": BIG})
    problems: list[str] = []
    lines: list[str] = []

    def out(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    try:
        from harness import http_request, wait_until

        wait_until(lambda: http_request("127.0.0.1", stack.port, "GET", "/r",
                                        {"x-api-key": rot.limited[0]}).status in (200, 429), 20, 0.1, "list loaded")
        time.sleep(1.0)
        load = Load(stack.port, rot.probes(), oracle, connections=args.connections)
        stop = asyncio.Event()
        traffic = asyncio.create_task(load.run(stop))
        t_start = time.time()
        rss0 = stack.rss_kb()
        m_start = await asyncio.to_thread(stack.metrics)
        out(f"soak: {stack.name}, {args.connections} connections, {args.seconds:g} s, warm-up {args.warmup:g} s, "
            f"1M-key list every {args.big_every:g} s (first at {args.first_big:g} s), transition window {WINDOW_S:.1f} s")
        out(f"start: RSS {mib(rss0 * 1024)} MiB, shared entries {m_start.get('keygate_shared_entries', 0):.0f}, "
            f"VM memory {vm_mem(m_start)}")
        out("minute  requests  wrong  in-window  5xx  err  p50 ms  p99 ms   RSS MiB  shared entries  VM memory MiB  keys loaded")
        rss_warm = None
        shared_warm = None
        m_warm: dict = {}
        next_big = args.first_big
        big_until = None
        minute_t = t_start
        minute_n = 0
        snap = load.tally.snapshot()
        rss_series = []
        shared_series = []
        big_count = 0
        big_loading: float | None = None
        big_load_s: list[float] = []
        while True:
            now = time.time()
            el = now - t_start
            if el >= args.seconds:
                break
            # --- the key service ---
            if big_loading is not None:
                # Nothing changes until the 1M-key list is in force: its parse takes seconds on
                # the fetching thread, and a change published meanwhile would only take effect
                # after it (see tests/faults/README.md). The hold starts once it is loaded.
                m = await asyncio.to_thread(stack.metrics)
                if m.get("keygate_keys_loaded", 0) >= BIG_KEYS * 0.99:
                    took = time.time() - big_loading
                    big_load_s.append(took)
                    out(f"  {el:6.0f} s: 1M-key list #{big_count} in force {took:.1f} s after it was published")
                    big_loading = None
                    big_until = time.time() + args.big_hold
                elif time.time() - big_loading > 180:
                    problems.append(f"1M-key list #{big_count} not loaded within 180 s")
                    big_loading = None
                    big_until = time.time()
            if big_until is not None and now >= big_until:
                big_until = None
            if big_loading is not None or big_until is not None:
                pass
            elif el >= next_big and el <= args.seconds - args.quiet_end:
                big_count += 1

                def build_big():
                    d = rot.document()
                    head = json.dumps({k: v for k, v in d.items() if k != "keys"})[:-1]
                    keys = ",".join(json.dumps(k) for k in d["keys"])
                    return (head + ',"keys":[' + keys + ",").encode() + fill + b"]}", rot.state()

                body, st = await asyncio.to_thread(build_big)
                oracle.publish(st)
                stack.ks.set_document(body)
                big_loading = time.time()
                next_big += args.big_every
                out(f"  {el:6.0f} s: 1M-key list #{big_count} published ({len(body) / 1e6:.0f} MB); no change until it "
                    f"is in force, then held {args.big_hold:g} s")
            else:
                def build():
                    rot.rotate(now)
                    return json.dumps(rot.document()).encode(), rot.state()

                # built off the event loop, so the clients' timing is not held up by it
                body, st = await asyncio.to_thread(build)
                oracle.publish(st)
                stack.ks.set_document(body)
            load.settle_windows()
            if args.warmup <= el and rss_warm is None:
                rss_warm = stack.rss_kb()
                m_warm = await asyncio.to_thread(stack.metrics)
                shared_warm = m_warm.get("keygate_shared_entries", 0)
                out(f"after warm-up ({el:.0f} s): RSS {mib(rss_warm * 1024)} MiB, shared entries {shared_warm:.0f}, "
                    f"VM memory {vm_mem(m_warm)}")
            if now - minute_t >= 60:
                minute_n += 1
                s1 = load.tally.snapshot()
                lat = load.tally.latencies
                load.tally.latencies = []
                pc = percentiles(lat)
                m = await asyncio.to_thread(stack.metrics)
                rss = stack.rss_kb()
                rss_series.append(rss)
                shared_series.append(m.get("keygate_shared_entries", 0))
                out(f"{minute_n:>6}  {s1['requests'] - snap['requests']:>8}  {s1['wrong'] - snap['wrong']:>5}  "
                    f"{s1['in_window'] - snap['in_window']:>9}  {s1['status_5xx'] - snap['status_5xx']:>3}  "
                    f"{s1['errors'] - snap['errors']:>3}  {pc['p50'] * 1000:>6.2f}  {pc['p99'] * 1000:>6.2f}  "
                    f"{mib(rss * 1024):>8}  {m.get('keygate_shared_entries', 0):>14.0f}  {vm_mem(m):>13}  "
                    f"{m.get('keygate_keys_loaded', 0):>11.0f}")
                snap = s1
                minute_t = now
            await asyncio.sleep(max(0.0, 1.0 - (time.time() - now)))
        stop.set()
        await traffic
        load.settle_windows(before=time.time() + 10)
        t = load.tally
        rss_end = stack.rss_kb()
        m_end = await asyncio.to_thread(stack.metrics)
        elapsed = time.time() - t_start
        shared_end = m_end.get("keygate_shared_entries", 0)
        out(f"end ({elapsed:.0f} s): RSS {mib(rss_end * 1024)} MiB, shared entries {shared_end:.0f}, "
            f"VM memory {vm_mem(m_end)}")
        fetch = {k.split('"')[1]: m_end.get(k, 0) - m_start.get(k, 0) for k in scenario.FETCH}
        decisions = {k.removeprefix("keygate_"): v for k, v in t.outcomes.items()}
        out(f"requests served {t.requests} ({t.requests / elapsed:.0f}/s), wrong decisions {t.wrong}, "
            f"answers matching only an older list inside the window {t.in_window}, 5xx {t.status_5xx}, "
            f"transport errors {t.errors}")
        out(f"outcomes {decisions}")
        out(f"limited keys: {t.limit_windows} windows judged, over the limit {t.limit_over}, short of it {t.limit_short}")
        out(f"list changes {rot.changes} in {rot.gen} rotations, 1M-key lists {big_count} "
            f"(in force after {', '.join(f'{x:.1f}' for x in big_load_s)} s); fetches {fetch}")
        if rss_warm:
            growth = (rss_end - rss_warm) / rss_warm * 100
            out(f"RSS: start {mib(rss0 * 1024)} MiB, after warm-up {mib(rss_warm * 1024)} MiB, end {mib(rss_end * 1024)} MiB "
                f"-> growth after warm-up {growth:+.1f}% (bound 5%)")
            if growth > 5:
                problems.append(f"RSS grew {growth:.1f}% after warm-up")
            if shared_end > (shared_warm or 0):
                problems.append(f"shared entries grew after warm-up: {shared_warm:.0f} -> {shared_end:.0f}")
            for k, v in m_end.items():
                # linear memory never shrinks; a 1M-key parse may fragment the allocator by a
                # few pages, a leak grows with every list: 2% after warm-up is the bound
                if k.startswith("keygate_vm_memory_bytes") and v > m_warm.get(k, 0) * 1.02:
                    problems.append(f"{k} grew after warm-up: {mib(m_warm.get(k, 0))} -> {mib(v)} MiB")
        else:
            problems.append("the run ended before the warm-up did")
        for what, n in (("wrong decisions", t.wrong), ("5xx", t.status_5xx), ("transport errors", t.errors),
                        ("windows over the limit", t.limit_over), ("windows short of the limit", t.limit_short)):
            if n:
                problems.append(f"{what}: {n}")
        for s in t.samples[:10]:
            out(f"  sample: {s}")
        problems += stack.health()
    finally:
        stack.stop()
    for p in problems:
        out(f"! {p}")
    out("SOAK " + ("FAILED" if problems else "PASSED"))
    outdir = REPO / "target" / "soak"
    outdir.mkdir(parents=True, exist_ok=True)
    path = outdir / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path.write_text("```\n" + "\n".join(lines) + "\n```\n")
    print(f"written to {path}")
    return 1 if problems else 0


def vm_mem(m: dict) -> str:
    vals = [(k.split('"')[1] if '"' in k else k.rsplit("vm", 1)[-1], v) for k, v in sorted(m.items()) if k.startswith("keygate_vm_memory_bytes")]
    return "/".join(f"{v / 1048576:.0f}" for _, v in vals) or "-"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--warmup", type=float, default=150)
    ap.add_argument("--big-every", type=float, default=180)
    ap.add_argument("--first-big", type=float, default=30)
    ap.add_argument("--big-hold", type=float, default=20)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--quiet-end", type=float, default=120,
                    help="no 1M-key list in the last S seconds, so the end is measured like the warm-up: "
                         "after a 1M-key list, back on the ~10k one")
    a = ap.parse_args(argv)
    return asyncio.run(soak(a))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
