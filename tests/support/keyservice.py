#!/usr/bin/env python3
"""A controllable fake key service (stdlib only, threaded).

Serves one key-list document (SPEC §2) at `path` (default /v1/keys) with a strong ETag
(the quoted hex SHA-256 of the body) and answers 304 to a matching If-None-Match.
Any other path is 404. Every request is recorded.

In-process (pytest):

    ks = KeyService(document={...}).start()   # or: with KeyService(doc) as ks: ...
    ks.port, ks.url
    ks.set_document(doc)        # dict (serialised as JSON), str or bytes; new ETag
    ks.status = 500             # answer every request with this status (body: ks.error_body)
    ks.delay = 3.0              # sleep this long before answering (slow service)
    ks.body_override = b"{bad"  # answer 200 with these raw bytes instead of the document
    ks.drop = True              # close the connection without any response
    ks.rst = True               # reset the connection (TCP RST) without any response
    ks.truncate = True          # 200 with the full Content-Length, half the body, then a reset
    ks.etag = False             # don't send ETag / never answer 304
    ks.extra_headers = {...}    # added to every answer
    ks.reset()                  # all switches back to normal (document kept)
    ks.count                    # number of requests received on any path
    ks.requests                 # list of Request(method, path, headers{lowercased}, time)
    ks.wait_for_requests(n, timeout=10) -> list of requests (raises AssertionError on timeout)
    ks.stop()

Standalone:  python3 tests/support/keyservice.py FILE.json [--port 8081] [--path /v1/keys]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["KeyService", "Request", "sha256_hex", "etag_of"]


def sha256_hex(data: str | bytes) -> str:
    """Lowercase hex SHA-256, as used for key hashes in the key list."""
    if isinstance(data, str):
        data = data.encode()
    return hashlib.sha256(data).hexdigest()


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha256(body).hexdigest() + '"'


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    time: float = field(default_factory=time.time)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keygate-fake-keyservice"
    sys_version = ""
    timeout = 60

    def log_message(self, format, *args):  # noqa: A002
        pass

    def setup(self):
        super().setup()
        self.server.ks._track(self.connection, add=True)

    def finish(self):
        try:
            super().finish()
        finally:
            self.server.ks._track(self.connection, add=False)

    def _handle(self):
        ks: KeyService = self.server.ks
        length = int(self.headers.get("Content-Length") or 0)
        if length > 0:
            self.rfile.read(length)
        headers: dict[str, str] = {}
        for k, v in self.headers.items():
            k = k.lower()
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        with ks._lock:
            ks._requests.append(Request(self.command, self.path, headers))
            ks._cond.notify_all()
            delay, drop, status = ks.delay, ks.drop, ks.status
            rst, truncate = ks.rst, ks.truncate
            body_override, use_etag = ks.body_override, ks.etag
            body, extra = ks._body, dict(ks.extra_headers)
            error_body, serve_path = ks.error_body, ks.path
        if delay:
            ks._stopping.wait(delay)
        if rst:
            self._reset()
            return
        if drop or ks._stopping.is_set():
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return

        path_only = self.path.split("?", 1)[0]
        if status is not None:
            self._send(status, error_body, extra, content_type="application/json")
            return
        if path_only != serve_path:
            self._send(404, b'{"error":"not found"}', extra, content_type="application/json")
            return
        if body_override is not None:
            body = body_override
        if truncate:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            try:
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
            except OSError:
                pass
            self._reset()
            return
        tag = etag_of(body)
        if use_etag:
            extra.setdefault("ETag", tag)
            inm = headers.get("if-none-match")
            if inm is not None and (inm.strip() == "*" or tag in [t.strip() for t in inm.split(",")]):
                self._send(304, b"", extra, content_type=None)
                return
        self._send(200, body, extra, content_type="application/json")

    def _reset(self):
        """Abort the connection with a TCP RST (SO_LINGER 0), not an orderly FIN."""
        self.close_connection = True
        try:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()  # with linger 0: RST, no FIN first
        except OSError:
            pass

    def _send(self, status: int, body: bytes, extra: dict[str, str], content_type: str | None):
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in extra.items():
            self.send_header(k, v)
        if status != 304:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if status != 304 and self.command != "HEAD":
            try:
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    def __getattr__(self, name: str):
        if name.startswith("do_"):
            return self._handle
        raise AttributeError(name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class KeyService:
    def __init__(self, document: Any = None, path: str = "/v1/keys", host: str = "127.0.0.1", port: int = 0):
        self.path = path
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._requests: list[Request] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()
        self._body = b""
        self.reset()
        self.set_document(document if document is not None else {"version": "empty", "keys": []})
        self._server = _Server((host, port), _Handler)
        self._server.ks = self  # type: ignore[attr-defined]
        self.host = host
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}{path}"
        self._thread: threading.Thread | None = None

    # --- switches -------------------------------------------------------------------
    def reset(self) -> None:
        """Every switch back to normal; the document and the request log are kept."""
        self.status: int | None = None
        self.error_body: bytes = b'{"error":"injected failure"}'
        self.delay: float = 0.0
        self.body_override: bytes | None = None
        self.drop: bool = False
        self.rst: bool = False
        self.truncate: bool = False
        self.etag: bool = True
        self.extra_headers: dict[str, str] = {}

    def set_document(self, document: Any) -> None:
        if isinstance(document, (dict, list)):
            body = json.dumps(document).encode()
        elif isinstance(document, str):
            body = document.encode()
        else:
            body = bytes(document)
        with self._lock:
            self._body = body

    @property
    def body(self) -> bytes:
        return self._body

    @property
    def current_etag(self) -> str:
        return etag_of(self.body_override if self.body_override is not None else self._body)

    # --- observation ----------------------------------------------------------------
    @property
    def requests(self) -> list[Request]:
        with self._lock:
            return list(self._requests)

    @property
    def count(self) -> int:
        with self._lock:
            return len(self._requests)

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    def wait_for_requests(self, n: int, timeout: float = 10.0) -> list[Request]:
        """Block until at least n requests have been received in total."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while len(self._requests) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"key service got {len(self._requests)} requests, expected >= {n} within {timeout}s")
                self._cond.wait(left)
            return list(self._requests)

    # --- lifecycle ------------------------------------------------------------------
    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            (self._conns.add if add else self._conns.discard)(conn)

    def close_connections(self) -> None:
        """Shut down every open (keep-alive) connection, e.g. to force the client to reconnect."""
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def start(self) -> "KeyService":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self.close_connections()

    def __enter__(self) -> "KeyService":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="fake keygate key service")
    p.add_argument("file", help="key-list JSON document to serve")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--path", default="/v1/keys")
    a = p.parse_args(argv[1:])
    with open(a.file, "rb") as f:
        doc = f.read()
    ks = KeyService(doc, path=a.path, host=a.host, port=a.port)
    print(f"serving {a.file} at {ks.url}", flush=True)
    try:
        ks._server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        ks._server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
