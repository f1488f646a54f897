"""Where Envoy's memory goes when a key list is loaded: section 2's measurement (bench/run.py
`Bench.scale_one`: `--concurrency 2`, Envoy pinned to the first CPU, RSS once the list is settled),
repeated, with Envoy's allocator figures (admin `/memory`: tcmalloc's allocated bytes, free pages
it keeps, thread caches) and the footprint gauges (`keygate_vm_memory_bytes.vm<N>`,
`keygate_shared_entries`) read just before Envoy stops.

    .venv/bin/python bench/scale_memory.py [1k,1m] [repeats]
    KEYGATE_WASM=/path/to/keygate.wasm .venv/bin/python bench/scale_memory.py 1m 3

Not niced or isolated like `make bench`: the times it prints depend on the machine's other load
(printed as *machine busy*, from /proc/stat); the memory figures hardly do."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as R  # noqa: E402
import harness  # noqa: E402  (run.py put tests/integration on the path)

KEYS = {"1k": 1_000, "10k": 10_000, "100k": 100_000, "1m": 1_000_000}


def busy() -> tuple[int, int]:
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return sum(f) - f[3] - f[4], sum(f)


def main() -> int:
    names = (sys.argv[1] if len(sys.argv) > 1 else "1k,1m").split(",")
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    allowed = sorted(os.sched_getaffinity(0))
    cpus = (allowed[0], allowed[1]) if len(allowed) >= 2 else None
    workdir = Path(tempfile.mkdtemp(prefix="keygate-scale-"))
    if cpus:
        wrapper = workdir / "envoy-pinned"
        wrapper.write_text(f'#!/bin/sh\nexec taskset -c {cpus[0]} "{harness.envoy_binary()}" "$@"\n')
        wrapper.chmod(0o755)
        os.environ["KEYGATE_ENVOY"] = str(wrapper)
        os.sched_setaffinity(0, {cpus[1]})
    bench = R.Bench(argparse.Namespace(wait_quiet=0), workdir, cpus)
    footprint: dict = {}
    stop = harness.Envoy.stop

    def stop_reading(env: harness.Envoy) -> None:
        try:
            footprint["memory"] = json.loads(env.admin("/memory")[1])
            footprint["gauges"] = {k: v for k, v in env.stats().items()
                                   if "keygate_vm_memory" in k or "keygate_shared_entries" in k}
        except Exception as e:  # noqa: BLE001
            footprint["error"] = str(e)
        stop(env)

    harness.Envoy.stop = stop_reading  # type: ignore[method-assign]
    try:
        for _ in range(repeats):
            for name in names:
                b0 = busy()
                r = bench.scale_one(name, KEYS[name])
                b1 = busy()
                load = (b1[0] - b0[0]) / max(1, b1[1] - b0[1])
                mem = footprint.get("memory", {})
                mib = lambda k: int(mem.get(k, 0)) / 2**20  # noqa: E731
                vms = {k.rsplit("_", 1)[-1]: round(v / 2**20, 1) for k, v in footprint.get("gauges", {}).items()
                       if "vm_memory" in k}
                print(f"{name}: live {r['live_s']:.2f} s (published {R.pubs_text(r['published'])}), Envoy CPU s "
                      f"main {r['load_cpu']['main']:.2f} workers {r['load_cpu']['workers']:.2f}; RSS before "
                      f"{r['rss_before_kb'] / 1024:.1f} after {r['rss_kb'] / 1024:.1f} peak {r['hwm_kb'] / 1024:.0f} MiB; "
                      f"tcmalloc MiB: allocated {mib('allocated'):.1f}, free pages {mib('pageheap_free'):.1f}, "
                      f"thread caches {mib('total_thread_cache'):.1f}, released {mib('pageheap_unmapped'):.1f}; "
                      f"VM memory MiB {vms}; shared entries "
                      f"{int(footprint.get('gauges', {}).get('keygate_shared_entries', 0))}; full fetches "
                      f"{r['answers_200']}; machine busy {load * 100:.0f}%", flush=True)
    finally:
        if bench.ks:
            bench.ks.stop()
        harness._stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
