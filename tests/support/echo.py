#!/usr/bin/env python3
"""Threaded HTTP/1.1 echo upstream (stdlib only).

Any method, any path: answers 200 with a JSON document

    {"method": "GET", "path": "/a?b=c",
     "headers": {"lowercased-name": "value", ...},   # repeated names joined with ", "
     "header_list": [["lowercased-name", "value"], ...],  # every header line, in order
     "body": "..."}                                   # request body as text (UTF-8, errors replaced)

Standalone:  python3 tests/support/echo.py PORT [HOST]   (HOST defaults to 127.0.0.1)
In-process:  with EchoServer() as echo: echo.port, echo.url, echo.requests
"""
from __future__ import annotations

import json
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["EchoServer", "main"]


class _EchoHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "keygate-echo"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are closed after this

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by stdlib
        pass  # quiet

    def _read_body(self) -> bytes:
        te = (self.headers.get("Transfer-Encoding") or "").lower()
        if "chunked" in te:
            chunks = []
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    # trailers until blank line
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _echo(self):
        body = self._read_body()
        header_list = [[k.lower(), v] for k, v in self.headers.items()]
        headers: dict[str, str] = {}
        for k, v in header_list:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
        doc = {
            "method": self.command,
            "path": self.path,
            "headers": headers,
            "header_list": header_list,
            "body": body.decode("utf-8", errors="replace"),
        }
        record = getattr(self.server, "records", None)
        if record is not None:
            with self.server.lock:
                record.append(doc)
        out = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(out)

    def __getattr__(self, name: str):
        # BaseHTTPRequestHandler dispatches to do_<METHOD>; answer every method.
        if name.startswith("do_"):
            return self._echo
        raise AttributeError(name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, addr):
        super().__init__(addr, _EchoHandler)
        self.records: list[dict] = []
        self.lock = threading.Lock()


class EchoServer:
    """In-process echo upstream. `requests` holds every echoed document."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self._server = _Server((host, port))
        self.host = host
        self.port = self._server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def requests(self) -> list[dict]:
        with self._server.lock:
            return list(self._server.records)

    def clear(self) -> None:
        with self._server.lock:
            self._server.records.clear()

    def start(self) -> "EchoServer":
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "EchoServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: echo.py PORT [HOST]", file=sys.stderr)
        return 2
    port = int(argv[1])
    host = argv[2] if len(argv) > 2 else "127.0.0.1"
    server = _Server((host, port))
    server.records = None  # type: ignore[assignment]  # standalone: keep nothing
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(main(sys.argv))
