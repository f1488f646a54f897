#!/usr/bin/env python3
"""In-VM cost of keygate's decision under V8, without Envoy (`make bench-vm`).

    python3 bench/vm.py [--rounds 7] [--n 200000] [--native]

Builds bench/vm (the core's `decide_cached` on `make bench`'s D request, D's configuration and
a 1,000-key list written by bench/run.py's own generators) for wasm32-wasip1 with keygate's
release profile and runs it in Node's V8 through WASI, one fresh process per round. Prints each
round and the median (min–max) of wall µs per decision and per SHA-256 of the key. V8 runs with
`--no-liftoff`, as proxy-wasm's V8 host sets it (every function compiled by TurboFan at once). Envoy's per-request CPU
swings by ±15% between runs on this machine; this reads the VM's own share to a few per cent, so
a change to the decision's code can be judged before `make bench-envoy`. The host's calls (header
map, shared data, properties) are not in it: the in-memory store stands in for shared data."""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run as bench  # noqa: E402  (D's configuration and key list)

MANIFEST = HERE / "vm" / "Cargo.toml"
TARGET = HERE / "vm" / "target"


def build(native: bool) -> list[Path]:
    targets = ["wasm32-wasip1"] + ([] if not native else [None])
    out = []
    for t in targets:
        cmd = ["cargo", "build", "--quiet", "--release", "--manifest-path", str(MANIFEST)]
        if t:
            cmd += ["--target", t]
        subprocess.run(cmd, check=True)
        out.append(TARGET / "wasm32-wasip1" / "release" / "keygate-bench-vm.wasm" if t
                   else TARGET / "release" / "keygate-bench-vm")
    return out


def parse(line: str) -> dict[str, float]:
    words = line.split()
    return {k: float(v) for k, v in zip(words[::2], words[1::2])}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n", type=int, default=200_000, help="decisions per round")
    ap.add_argument("--native", action="store_true", help="also run the same loop natively")
    args = ap.parse_args()
    node = shutil.which("node")
    if node is None:
        print("bench/vm.py needs Node.js (`node`, 18 or newer) for its V8", file=sys.stderr)
        return 2
    binaries = build(args.native)
    with tempfile.TemporaryDirectory(prefix="keygate-bench-vm-") as tmp:
        cfg, lst = Path(tmp) / "config.json", Path(tmp) / "list.json"
        cfg.write_text(json.dumps(bench.keygate_config()))
        lst.write_bytes(bench.make_document(1000, "vm"))
        for binary in binaries:
            wasm = binary.suffix == ".wasm"
            label = f"V8 (Node {subprocess.run([node, '--version'], capture_output=True, text=True).stdout.strip()})" \
                if wasm else "native"
            rounds = []
            for _ in range(args.rounds):
                cmd = ([node, "--no-warnings", "--no-liftoff", str(HERE / "vm" / "run.mjs"), str(binary), tmp]
                       if wasm else [str(binary)]) + [str(cfg), str(lst), str(args.n)]
                r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
                if r.returncode != 0:
                    print(r.stdout + r.stderr, file=sys.stderr)
                    return 1
                rounds.append(parse(r.stdout))
                print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in rounds[-1].items()), flush=True)
            summary = []
            for k in rounds[0]:
                xs = [r[k] for r in rounds]
                summary.append(f"{k} {statistics.median(xs):.3f} ({min(xs):.3f}–{max(xs):.3f})")
            print(f"{label}, median of {args.rounds} rounds of {args.n}: " + ", ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
