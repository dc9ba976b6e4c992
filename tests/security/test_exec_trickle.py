"""The image's exec server (`exec: http`: the sandbox's) answers a command a byte at a time,
each byte well within the read timeout, to hold `ukc apply` (and the running instance, which
is billed) forever: a command with a 1 s timeout kept its apply waiting as long as the
sandbox liked. UKC's gateway cuts only an answer that is silent for 60 s.

The hostile server is a real HTTP server behind the TLS forwarder of the test CA.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler

import pytest

from reconciler.transport.base import CommandResult
from reconciler.transport.http import HttpExec
from tests.support.tls_sshd import FQDN, CaFiles, TlsForwarder, dialer_to, https_front


class Trickle(BaseHTTPRequestHandler):
    """Starts a 200 answer at once, then sends a byte a second (never silent for long)."""

    stop = threading.Event()

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", "100000")
        self.end_headers()
        self.wfile.write(b'{"stdout": "')
        while not self.stop.wait(1.0):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:
                return

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def trickling(test_ca: CaFiles) -> Iterator[TlsForwarder]:
    Trickle.stop.clear()
    with https_front(test_ca, Trickle) as fwd:
        yield fwd
        Trickle.stop.set()  # (before the front stops: the handler's trickle ends)


def test_an_answer_trickling_past_the_commands_timeout_ends_the_command_as_timed_out(
    test_ca: CaFiles, trickling: TlsForwarder
) -> None:
    got: list[CommandResult | BaseException] = []
    client = HttpExec.from_dialer(dialer_to(test_ca, trickling.port))

    def run() -> None:
        try:
            got.append(client.run(FQDN, "true", {}, timeout_s=1))
        except BaseException as exc:
            got.append(exc)

    started = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    # twice the command's timeout (1 s), the kill grace (5 s) and the 10 s margin, then a little
    worker.join(45)
    took = time.monotonic() - started
    Trickle.stop.set()  # ends a client still waiting (the code without the deadline)
    worker.join(10)
    client.close()
    assert took < 45, "the trickling answer held the command past every deadline"
    (result,) = got
    assert isinstance(result, CommandResult) and result.timed_out, result
