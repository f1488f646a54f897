#!/usr/bin/env python3
"""A Rate Limit Service speaking Envoy's standard protocol
(`envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit`, gRPC over HTTP/2), backed by a
real Redis: what keygate's global mode (`rate_limit.global`) is tested against.

Counting follows envoyproxy/ratelimit: a fixed window per descriptor, aligned to multiples of
the unit since the Unix epoch, one Redis counter per (domain, descriptor entries, window start),
`INCRBY hits` and `EXPIRE` in one pipeline; a descriptor is over its limit when the count after
adding passes it. The limit is the descriptor's `limit` override (keygate always sends one); a
descriptor without one gets an OK status without `current_limit`, as a service without a
configured limit answers.

The protos come from PyPI `envoy-data-plane` (the Envoy API as Python dataclasses); gRPC from
`grpcio`; Redis from `redis`.

    with RedisServer() as redis, RateLimitService(redis.port) as rls:
        rls.port            # the gRPC port on 127.0.0.1
        rls.stop(); rls.start()   # the same port again (an outage, then recovery)
        rls.delay_s = 2.0   # answer late (timeouts)
        rls.garbage = True  # answer bytes that are no RateLimitResponse (bad replies)
        rls.calls           # requests answered so far
        envoy_cluster(rls.port)   # an Envoy cluster (HTTP/2) that reaches it, named "rls"

Standalone:  python3 tests/support/ratelimit_service.py --port 8081 --redis-port 6379
"""
from __future__ import annotations

import argparse
import datetime
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import warnings

import grpc
import redis

with warnings.catch_warnings():
    # The generated dataclasses use a pydantic idiom that pydantic 2.12 deprecates.
    warnings.simplefilter("ignore", DeprecationWarning)
    from envoy_data_plane.envoy.service.ratelimit.v3 import (RateLimitRequest, RateLimitResponse,
                                                             RateLimitResponseCode,
                                                             RateLimitResponseDescriptorStatus,
                                                             RateLimitResponseRateLimit,
                                                             RateLimitResponseRateLimitUnit)

__all__ = ["RedisServer", "RateLimitService", "UNIT_SECONDS", "envoy_cluster"]

SERVICE = "envoy.service.ratelimit.v3.RateLimitService"
# type.v3.RateLimitUnit (the override's unit) and RateLimitResponse.RateLimit.Unit agree.
UNIT_SECONDS = {1: 1, 2: 60, 3: 3600, 4: 86400}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def envoy_cluster(port: int, name: str = "rls") -> dict:
    """The Envoy cluster of a service on 127.0.0.1:port: gRPC needs HTTP/2 to the upstream."""
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": port}}}}]}],
        },
    }


class RedisServer:
    """Debian's `redis-server` on a free loopback port, in a temporary directory, no persistence."""

    def __init__(self, port: int | None = None):
        self.port = port or _free_port()
        self.proc: subprocess.Popen | None = None
        self.dir: str | None = None

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not installed (make deps installs it)")
        self.dir = tempfile.mkdtemp(prefix="keygate-redis-")
        self.proc = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
             "--save", "", "--appendonly", "no", "--protected-mode", "yes", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.05)
        client.close()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class RateLimitService:
    def __init__(self, redis_port: int, port: int | None = None, host: str = "127.0.0.1"):
        self.host = host
        self.port = port or _free_port()
        self.redis = redis.Redis(host="127.0.0.1", port=redis_port)
        self.server: grpc.Server | None = None
        self.delay_s = 0.0
        self.garbage = False
        self.calls = 0
        self.requests: list[RateLimitRequest] = []
        self._lock = threading.Lock()
        # The first message built and serialised pays for the dataclasses' setup (a second
        # or more): pay it here, not in the first request a test times.
        self.should_rate_limit(RateLimitRequest(domain="warm-up", descriptors=[]), None)
        self.calls = 0
        self.requests.clear()

    # ---- the protocol ----------------------------------------------------------------------
    def should_rate_limit(self, req: RateLimitRequest, context) -> bytes:
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self.calls += 1
            self.requests.append(req)
        if self.garbage:
            return b"\xff\xff\xff"
        now = time.time()
        hits_default = req.hits_addend or 1
        pipe = self.redis.pipeline(transaction=False)
        plan = []
        for d in req.descriptors:
            if d.limit is None or d.limit.unit not in UNIT_SECONDS:
                plan.append(None)
                continue
            window = UNIT_SECONDS[int(d.limit.unit)]
            start = int(now) // window * window
            hits = d.hits_addend if d.hits_addend is not None else hits_default
            key = "%s_%s_%d" % (req.domain, "_".join(f"{e.key}_{e.value}" for e in d.entries), start)
            pipe.incrby(key, hits)
            pipe.expire(key, window)
            plan.append((d.limit.requests_per_unit, int(d.limit.unit), start + window))
        results = pipe.execute()
        counts = iter(results[0::2])
        statuses = []
        over = False
        for p in plan:
            if p is None:
                statuses.append(RateLimitResponseDescriptorStatus(code=RateLimitResponseCode.OK))
                continue
            limit, unit, end = p
            count = next(counts)
            code = RateLimitResponseCode.OVER_LIMIT if count > limit else RateLimitResponseCode.OK
            over |= code == RateLimitResponseCode.OVER_LIMIT
            statuses.append(RateLimitResponseDescriptorStatus(
                code=code,
                current_limit=RateLimitResponseRateLimit(
                    requests_per_unit=limit, unit=RateLimitResponseRateLimitUnit(unit)),
                limit_remaining=max(0, limit - count),
                duration_until_reset=datetime.timedelta(seconds=max(0, end - int(now))),
            ))
        resp = RateLimitResponse(
            overall_code=RateLimitResponseCode.OVER_LIMIT if over else RateLimitResponseCode.OK,
            statuses=statuses)
        return bytes(resp)

    # ---- process ---------------------------------------------------------------------------
    def start(self) -> "RateLimitService":
        handler = grpc.method_handlers_generic_handler(SERVICE, {
            "ShouldRateLimit": grpc.unary_unary_rpc_method_handler(
                self.should_rate_limit,
                request_deserializer=RateLimitRequest.parse,
                response_serializer=lambda b: b),
        })
        server = grpc.server(ThreadPoolExecutor(max_workers=32))
        server.add_generic_rpc_handlers((handler,))
        if server.add_insecure_port(f"{self.host}:{self.port}") == 0:
            raise RuntimeError(f"cannot listen on {self.host}:{self.port}")
        server.start()
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait(5)
            self.server = None

    def close(self) -> None:
        self.stop()
        self.redis.close()

    def __enter__(self) -> "RateLimitService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--redis-port", type=int, default=6379)
    args = ap.parse_args()
    rls = RateLimitService(args.redis_port, args.port, args.host).start()
    print(f"rate limit service on {args.host}:{args.port} (redis 127.0.0.1:{args.redis_port})", flush=True)
    try:
        assert rls.server is not None
        rls.server.wait_for_termination()
    except KeyboardInterrupt:
        pass
    finally:
        rls.close()


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
