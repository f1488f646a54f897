#!/usr/bin/env python3
"""Key service at scale (`make bench-keyservice`, part of `make bench`): the release binary
(`target/release/keygate keyservice`) on loopback, on SQLite and on a PostgreSQL server started
here in a temporary directory (as the `postgres` user when run as root).

For each database, with --keys keys imported through the admin API (default 1,000,000):
  - import time, time until the document of all keys is served;
  - one change (PATCH status) -> time until the new document is served (min and max of 3), the
    last build's own wall time (`keygate_keyservice_document_build_duration_seconds`) and the
    number of full builds (`…_document_full_rebuilds_total`: the others were incremental);
  - what hashing the whole document once costs (hashlib SHA-256), for comparison;
  - RSS of the service (VmRSS) with the document built;
  - 304 cost: sequential conditional GETs of /v1/keys on one keep-alive connection;
  - admin throughput: creates and updates (scopes: the document changes on every one),
    sequential and from 8 client threads.
Stdlib only. Prints a Markdown table; --out FILE also writes it there. KEYGATE_BENCH_CLI=PATH
benchmarks another build of `keygate` (an older one, for a before/after).
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(os.environ.get("KEYGATE_BENCH_CLI", REPO / "target" / "release" / "keygate"))
TOKEN = "bench-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Client:
    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)

    def call(self, method: str, path: str, body=None, headers=None):
        h = {"authorization": f"Bearer {TOKEN}"}
        if body is not None:
            h["content-type"] = "application/json"
            if not isinstance(body, (bytes, bytearray)):
                body = json.dumps(body).encode()
        h.update(headers or {})
        for attempt in range(2):
            try:
                self.conn.request(method, path, body=body, headers=h)
                r = self.conn.getresponse()
                data = r.read()
                return r.status, data, r
            except (http.client.HTTPException, OSError):
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
                if attempt:
                    raise
        raise RuntimeError("unreachable")


def metric(c: Client, name: str) -> float:
    _, body, _ = c.call("GET", "/metrics")
    for line in body.decode().splitlines():
        if line.startswith(f"keygate_keyservice_{name} "):
            return float(line.split()[1])
    return float("nan")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Service:
    def __init__(self, database: str, tmp: Path):
        self.port = free_port()
        tokens = tmp / "admin-tokens"
        tokens.write_text(TOKEN + "\n")
        self.log = open(tmp / "keyservice.log", "wb")
        self.proc = subprocess.Popen(
            [str(CLI), "keyservice", "--listen", f"127.0.0.1:{self.port}", "--database", database,
             "--admin-tokens", str(tokens)], stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.c = Client(self.port)
        deadline = time.time() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"keyservice exited: {(tmp / 'keyservice.log').read_text()[-2000:]}")
            try:
                if self.c.call("GET", "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline:
                raise RuntimeError("keyservice not ready")
            time.sleep(0.1)

    def wait_generation(self, above: float, timeout: float = 1200) -> float:
        t0 = time.monotonic()
        while metric(self.c, "document_generation") <= above:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError("document not rebuilt in time")
            time.sleep(0.005)
        return time.monotonic() - t0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Postgres:
    def __init__(self):
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) + (
            ["/usr/local/bin/initdb"] if os.path.exists("/usr/local/bin/initdb") else [])
        if not bins:
            raise FileNotFoundError("PostgreSQL (initdb, pg_ctl) not found")
        self.bin = Path(bins[-1]).parent
        self.dir = Path(tempfile.mkdtemp(prefix="keygate-bench-pg-"))
        self.as_postgres = os.geteuid() == 0
        if self.as_postgres:
            shutil.chown(self.dir, "postgres", "postgres")
        self.data = self.dir / "data"
        self.port = free_port()
        self.run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--locale=C", "-E", "UTF8",
                 "--no-sync")
        opts = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self.run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"), "-w", "-t", "60", "start")
        self.url = f"postgres://postgres@127.0.0.1:{self.port}/postgres"

    def run(self, tool: str, *args: str):
        cmd = [str(self.bin / tool), *args]
        if self.as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, cwd=self.dir, capture_output=True)

    def stop(self):
        try:
            self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


def import_doc(n: int) -> bytes:
    parts = []
    for i in range(n):
        h = hashlib.sha256(f"bench-key-{i}".encode()).hexdigest()
        parts.append(f'{{"id":"key_{i:08d}","hash":"{h}","owner":"o{i % 100}","scopes":["a:*"]}}')
    return ('{"keys":[' + ",".join(parts) + "]}").encode()


def throughput(port: int, what: str, count: int, threads: int) -> float:
    """Requests per second of `count` admin writes spread over `threads` clients."""
    per = count // threads
    errors: list[str] = []

    def work(t: int):
        c = Client(port)
        for i in range(per):
            if what == "create":
                s, b, _ = c.call("POST", "/v1/admin/keys", {"owner": "bench", "name": f"t{t}-{i}"})
                ok = s == 201
            else:
                kid = f"key_{(t * per + i) % 1000:08d}"
                s, b, _ = c.call("PATCH", f"/v1/admin/keys/{kid}", {"scopes": [f"s{t}-{i}"]})
                ok = s == 200
            if not ok:
                errors.append(f"{what}: {s} {b[:200]!r}")
    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    t0 = time.monotonic()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    took = time.monotonic() - t0
    if errors:
        raise RuntimeError(errors[0])
    return per * threads / took


def bench(name: str, database: str, doc: bytes, n: int, writes: int, tmp: Path) -> dict:
    print(f"[{name}] starting the key service", file=sys.stderr)
    svc = Service(database, tmp)
    try:
        out = {"database": name, "keys": n}
        gen = metric(svc.c, "document_generation")
        t0 = time.monotonic()
        s, b, _ = svc.c.call("POST", "/v1/admin/import", doc)
        assert s == 200, b[:300]
        out["import_s"] = time.monotonic() - t0
        svc.wait_generation(gen)
        while metric(svc.c, "document_keys") < n:
            time.sleep(0.05)
        out["served_after_import_s"] = time.monotonic() - t0
        print(f"[{name}] {n} keys imported in {out['import_s']:.1f} s", file=sys.stderr)
        # One change -> the new document served.
        changes = []
        for i in range(3):
            gen = metric(svc.c, "document_generation")
            t0 = time.monotonic()
            s, b, _ = svc.c.call("PATCH", f"/v1/admin/keys/key_{i + 1:08d}", {"status": "disabled"})
            assert s == 200, b[:300]
            svc.wait_generation(gen)
            changes.append(time.monotonic() - t0)
        out["change_to_served_s"] = min(changes)
        out["change_to_served_max_s"] = max(changes)
        out["full_builds"] = metric(svc.c, "document_full_rebuilds_total")
        out["build_s"] = metric(svc.c, "document_build_duration_seconds")
        out["doc_mib"] = metric(svc.c, "document_bytes") / 2**20
        out["rss_mib"] = rss_mib(svc.proc.pid)
        # 304s on one connection.
        s, body, r = svc.c.call("GET", "/v1/keys")
        etag = r.getheader("etag")
        assert s == 200 and etag, s
        # What hashing the whole document costs (OpenSSL SHA-256 through hashlib, per schema):
        # what every change cost when the ETag was the SHA-256 of the bytes.
        t0 = time.monotonic()
        hashlib.sha256(body).digest()
        out["sha256_whole_s"] = time.monotonic() - t0
        del body
        reps = 2000
        t0 = time.monotonic()
        for _ in range(reps):
            s, _, _ = svc.c.call("GET", "/v1/keys", headers={"if-none-match": etag})
            assert s == 304, s
        out["us_per_304"] = (time.monotonic() - t0) / reps * 1e6
        out["create_rps_1"] = throughput(svc.port, "create", writes, 1)
        out["create_rps_8"] = throughput(svc.port, "create", writes, 8)
        out["update_rps_1"] = throughput(svc.port, "update", writes, 1)
        out["update_rps_8"] = throughput(svc.port, "update", writes, 8)
        out["rss_after_writes_mib"] = rss_mib(svc.proc.pid)
        return out
    finally:
        svc.stop()


def table(rows: list[dict]) -> str:
    cols = [("database", "database", "{}"), ("keys", "keys", "{:,}"), ("import_s", "import (s)", "{:.1f}"),
            ("change_to_served_s", "one change → served (s, min of 3)", "{:.3f}"),
            ("change_to_served_max_s", "(max of 3)", "{:.3f}"), ("build_s", "last build (s)", "{:.4f}"),
            ("doc_mib", "document (MiB)", "{:.0f}"), ("rss_mib", "RSS (MiB)", "{:.0f}"),
            ("us_per_304", "304 (µs, 1 conn)", "{:.0f}"),
            ("create_rps_1", "creates/s (1 / 8 clients)", None), ("update_rps_1", "updates/s (1 / 8 clients)", None),
            ("rss_after_writes_mib", "RSS after writes (MiB)", "{:.0f}"),
            ("full_builds", "full builds", "{:.0f}"), ("sha256_whole_s", "SHA-256 of the whole document (s)", "{:.3f}")]
    head = "| " + " | ".join(c[1] for c in cols) + " |\n|" + "---|" * len(cols) + "\n"
    lines = []
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            if fmt is None:
                k8 = key.replace("_1", "_8")
                cells.append(f"{r[key]:.0f} / {r[k8]:.0f}")
            else:
                cells.append(fmt.format(r[key]))
        lines.append("| " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--writes", type=int, default=400, help="admin writes per throughput figure")
    ap.add_argument("--quick", action="store_true", help="50,000 keys, 80 writes")
    ap.add_argument("--no-postgres", action="store_true")
    ap.add_argument("--no-sqlite", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.quick:
        a.keys, a.writes = 50_000, 80
    if not CLI.exists():
        print(f"{CLI} is missing: run `make build` first", file=sys.stderr)
        return 1
    doc = import_doc(a.keys)
    rows = []
    with tempfile.TemporaryDirectory(prefix="keygate-bench-") as d:
        tmp = Path(d)
        if not a.no_sqlite:
            rows.append(bench("SQLite", f"sqlite:{tmp / 'keygate.db'}", doc, a.keys, a.writes, tmp))
        if not a.no_postgres:
            pg = Postgres()
            try:
                rows.append(bench("PostgreSQL", pg.url, doc, a.keys, a.writes, tmp))
            finally:
                pg.stop()
    text = ("## Key service (`bench/keyservice.py`)\n\n" + table(rows) +
            f"\nrelease build, loopback, {os.cpu_count()} CPUs; writes: {a.writes} per figure.\n")
    print(text)
    if a.out:
        a.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
