"""A loopback HTTP server for the remote tests that a real registry cannot play:
one that drips bytes, points to a token service elsewhere, or asks to retry later.

``Stub(handler)`` serves each request with ``handler(req)``, where ``req`` has
``method``, ``path``, ``headers`` and ``body``, and ``req.send(status, headers,
body)`` or raw ``req.write(bytes)``. Every request is recorded in
``stub.requests`` (method, path, headers). Handlers run in threads and stop
with the server; a dripping handler also stops when the client hangs up.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Request:
    def __init__(self, h: BaseHTTPRequestHandler, body: bytes) -> None:
        self.method = h.command
        self.path = h.path
        self.headers = {k.lower(): v for k, v in h.headers.items()}
        self.body = body
        self._h = h

    def send(self, status: int, headers: dict[str, str] | None = None, body: bytes = b"") -> None:
        self._h.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for k, v in headers.items():
            self._h.send_header(k, v)
        self._h.end_headers()
        if body and self.method != "HEAD":
            self._h.wfile.write(body)

    def write(self, data: bytes) -> bool:
        """Raw bytes to the client; False once it has gone away."""
        try:
            self._h.wfile.write(data)
            self._h.wfile.flush()
            return True
        except OSError:
            return False

    def drip(self, data: bytes, every: float = 1.0, limit_s: float = 60.0) -> int:
        """Send ``data`` one byte per ``every`` seconds, for at most ``limit_s``; returns the bytes sent."""
        sent = 0
        stop = time.monotonic() + limit_s
        for i in range(len(data)):
            if time.monotonic() > stop or not self.write(data[i:i + 1]):
                break
            sent += 1
            time.sleep(every)
        return sent


class Stub:
    def __init__(self, handler: Callable[[Request], Any], host: str = "127.0.0.1") -> None:
        self.handler = handler
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        stub = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: Any) -> None:
                pass

            def _any(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                req = Request(self, body)
                stub.requests.append((req.method, req.path, req.headers))
                try:
                    stub.handler(req)
                except (BrokenPipeError, ConnectionResetError, socket.timeout):
                    pass

            do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _any

        self.server = ThreadingHTTPServer((host, 0), H)
        self.server.daemon_threads = True
        self.host = f"{host}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
