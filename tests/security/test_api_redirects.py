"""The metro's API answers with a redirect to somewhere else, to have the token follow.

A metro the user named (`UKC_METRO`) is trusted with its token, but what it answers is not a
place to send it again: a compromised or misconfigured API, or an open redirect on its host,
answers `307 Location: <the attacker's listener>` (a 307/308 keeps the method and body). The
listener is a real HTTP server recording every request.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support.canary import Canaries, assert_nowhere
from tests.support.listener import RecordingMetro
from tests.support.ukc import Ukc


@pytest.fixture
def listener() -> Iterator[RecordingMetro]:
    server = RecordingMetro()
    yield server
    server.close()


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_from_the_metro_never_takes_the_token_or_a_request_elsewhere(
    ukc: Ukc, canaries: Canaries, listener: RecordingMetro, code: int
) -> None:
    class Redirect(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            self.send_response(code)
            self.send_header("location", listener.url + self.path)
            self.send_header("content-length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _answer  # noqa: N815

        def log_message(self, format: str, *args: object) -> None:
            pass

    metro = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=metro.serve_forever, daemon=True).start()
    try:
        ukc.extra_env.update(
            {
                "UKC_TOKEN": canaries.token,
                "UKC_METRO": f"http://127.0.0.1:{metro.server_address[1]}",
                "UKC_METRO_TOKEN": canaries.secret,
            }
        )
        ukc.write_spec("name: hello\nimage: me/box:1\n")
        for command in ("plan", "apply"):
            proc = ukc.run(command, "session.yaml")
            assert proc.returncode != 0
            assert listener.requests == [], [r.path for r in listener.requests]
            assert_nowhere(canaries, texts=[proc.stdout, proc.stderr])
    finally:
        metro.shutdown()
        metro.server_close()
