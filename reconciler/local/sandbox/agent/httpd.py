"""The agent's HTTP/1.1 servers: request handling both APIs share, and the two servers."""

from __future__ import annotations

import json
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["MAX_BODY", "EnvelopeHandler", "Handler", "TcpHTTPServer", "UnixHTTPServer"]

# why: the metro proxy reads at most 2 MiB of request body; JSON + base64 framing of a 1 MiB
# SDK chunk stays well below this
MAX_BODY = 4 * 1024 * 1024


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "ukc-agent"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        pass  # why: request lines may carry paths of user files; the console stays quiet

    def _body(self) -> bytes | None:
        """The request body, or None after answering 413 for a bad or oversized length."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > MAX_BODY:
            self._send(413, b"", "text/plain")
            self.close_connection = True
            return None
        return self.rfile.read(length) if length > 0 else b""

    def _send(
        self,
        status: int,
        body: bytes,
        ctype: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        if body or ctype != "application/json":
            self.send_header("Content-Type", ctype)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj: object) -> None:
        self._send(status, json.dumps(obj).encode())


class EnvelopeHandler(Handler):
    """A handler that answers in UKC's envelope, timing each request for `op_time_us`."""

    _t0 = 0.0

    def _ok(self, data: object) -> None:
        self._json(200, {"status": "success", "data": data, "op_time_us": self._us()})

    def _err(self, status: int, message: str) -> None:
        self._json(
            status,
            {
                "status": "error",
                "message": message,
                "errors": [{"status": status}],
                "data": None,
                "op_time_us": self._us(),
            },
        )

    def _us(self) -> int:
        return max(1, int((time.monotonic() - self._t0) * 1e6))


class UnixHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on an already listening unix socket inherited from the runtime."""

    address_family = socket.AF_UNIX
    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__("", handler, bind_and_activate=False)  # type: ignore[arg-type]
        self.socket.close()
        self.socket = sock

    def get_request(self) -> tuple[socket.socket, Any]:
        conn, _ = self.socket.accept()
        return conn, ("unix", 0)


class TcpHTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer on an already listening TCP socket (bound at boot, `tcp_listener`)."""

    daemon_threads = True

    def __init__(self, sock: socket.socket, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(sock.getsockname(), handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
