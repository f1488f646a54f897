#!/usr/bin/env python3
"""Does Envoy re-resolve the route after keygate edits the request headers? (issue 13)

    .venv/bin/python bench/route_cache.py

Envoy's wasm host calls `onHeadersModified()` after every request-header add, replace or remove
a filter makes (source/extensions/common/wasm/context.cc), which clears the stream's route cache,
so the router matches the route again. This shows it in the Envoy under test: the first route
matches only when `x-api-key-id` is present, the second catches the rest; both answer with a
direct_response naming themselves. keygate (default mode) sets `x-api-key-id` on an allowed
request and removes a client-sent one; if the route were not re-resolved, the route chosen
before the filter ran would answer. Everything on 127.0.0.1; Envoy is stopped at the end."""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.argv = sys.argv[:1]
import run as bench  # noqa: E402
import harness  # noqa: E402  (put on the path by run)

ROUTES = [
    {"match": {"prefix": "/", "headers": [{"name": "x-api-key-id", "present_match": True}]},
     "direct_response": {"status": 200, "body": {"inline_string": "route matched on x-api-key-id"}}},
    {"match": {"prefix": "/"}, "direct_response": {"status": 200, "body": {"inline_string": "catch-all route"}}},
]


def main() -> int:
    def hook(boot: dict) -> None:
        hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["route_config"]["virtual_hosts"][0]["routes"] = ROUTES

    b = bench.Bench(type("Args", (), {"warmup": 0})(), Path("/tmp"), None)
    ks = b.keyserver("1k")
    env = harness.start_envoy(bench.keygate_config(), ks.port, harness.free_port(), concurrency=1,
                              bootstrap_hook=hook)
    try:
        b.wait_loaded(env, 1_000)
        r1 = harness.http_request("127.0.0.1", env.port, "GET", bench.BENCH_PATH, {"x-api-key": bench.BENCH_KEY})
        r2 = harness.http_request("127.0.0.1", env.port, "GET", "/healthz", {"x-api-key-id": "forged"})
    finally:
        env.stop()
        ks.stop()
    print(f"allowed request, no x-api-key-id sent, keygate sets it:   {r1.status} {r1.body.decode()!r}")
    print(f"exempt request, x-api-key-id sent, keygate removes it:    {r2.status} {r2.body.decode()!r}")
    rerouted = r1.body == b"route matched on x-api-key-id" and r2.body == b"catch-all route"
    print("=> Envoy re-resolved the route after the filter's header edits" if rerouted
          else "=> the route chosen before the filter ran answered (no re-resolution)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
