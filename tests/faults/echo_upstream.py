#!/usr/bin/env python3
"""tests/support/echo.py as a process for the load runs, with a listen backlog that holds 64+
simultaneous connects (socketserver's default of 5 makes the kernel drop SYNs under a burst, and
Envoy then answers 503 after its 1 s connect timeout: the upstream's fault, not keygate's)."""
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))

import echo  # noqa: E402

echo._Server.request_queue_size = 1024

if __name__ == "__main__":
    socket.setdefaulttimeout(None)
    sys.exit(echo.main(sys.argv))
