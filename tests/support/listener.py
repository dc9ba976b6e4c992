"""A listener posing as a metro: it records every request (headers included) and answers the
instance list with an empty page, so a client that trusts it carries on and shows its hand.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["RECORDING_HANDLER", "Recorded", "RecordingMetro"]


#: the same, as source for a script that runs as another user (by the system python): it
#: needs `LOG` (a file that gets one JSON line per request: method, path, Authorization) and
#: `data_for(path)` (the `data` of the answer) defined before it, and http.server, json imported
RECORDING_HANDLER = r"""
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        with open(LOG, "a") as f:
            f.write(json.dumps([self.command, self.path, self.headers.get("Authorization")]) + "\n")
        body = json.dumps({"status": "success", "data": data_for(self.path)}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = answer

    def log_message(self, *args):
        pass
"""


@dataclass(frozen=True)
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class RecordingMetro:
    """An HTTP server on `host` (a free port) that records what it is sent."""

    host: str = "127.0.0.1"
    requests: list[Recorded] = field(default_factory=list)

    def __post_init__(self) -> None:
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                size = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(size) if size else b""
                recorder.requests.append(
                    Recorded(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        body,
                    )
                )
                payload = json.dumps({"status": "success", "data": {"instances": []}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer  # noqa: N815

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def authorizations(self) -> list[str]:
        return [r.headers["authorization"] for r in self.requests if "authorization" in r.headers]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
