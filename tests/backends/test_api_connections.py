"""`UkcApi`'s connections: one kept per thread that asks, closed once its thread is gone."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from reconciler.cloud.api import UkcApi


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        #: the client port of every request, by the instance name it asked for
        self.ports: dict[str, list[int]] = {}
        #: client ports whose connection the client closed
        self.closed: set[int] = set()
        self.changed = threading.Condition()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client closing its kept connection may reset it mid-read: what these tests do
        if not isinstance(sys.exc_info()[1], ConnectionResetError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = parse_qs(urlsplit(self.path).query).get("name", ["?"])[0]
        with self.server.changed:
            self.server.ports.setdefault(name, []).append(self.client_address[1])
        body = json.dumps({"status": "success", "data": {"instances": []}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        super().finish()
        with self.server.changed:
            self.server.closed.add(self.client_address[1])
            self.server.changed.notify_all()


@pytest.fixture
def server() -> Iterator[_Server]:
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _in_thread(
    api: UkcApi, name: str, times: int, hold: threading.Event | None = None
) -> tuple[threading.Thread, threading.Event]:
    """A thread that asks for `name` `times` times (`done` then), then waits for `hold`."""
    done = threading.Event()

    def run() -> None:
        for _ in range(times):
            assert api.get_instance(name) is None
        done.set()
        if hold is not None:
            hold.wait(30)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, done


def test_each_thread_keeps_one_connection_of_its_own(server: _Server) -> None:
    # why it matters: one pool shared by every session thread walked all its connections at
    # each request and answer; a thread of its own has one to look at
    api = UkcApi(f"http://127.0.0.1:{server.server_address[1]}", "t", metro="local")
    hold = threading.Event()
    try:
        first, first_done = _in_thread(api, "a", 3, hold)
        assert first_done.wait(30)
        second, second_done = _in_thread(api, "b", 3, hold)  # the first lives on, idle
        assert second_done.wait(30)
    finally:
        hold.set()
        for thread in (first, second):
            thread.join(30)
        api.close()
    a, b = server.ports["a"], server.ports["b"]
    assert len(set(a)) == 1 and len(set(b)) == 1  # each kept its connection
    assert a[0] != b[0]  # and neither used the other's idle one


def test_the_connection_of_a_thread_that_ended_is_closed_when_another_thread_asks(
    server: _Server,
) -> None:
    api = UkcApi(f"http://127.0.0.1:{server.server_address[1]}", "t", metro="local")
    try:
        _in_thread(api, "gone", 1)[0].join(30)
        (port,) = server.ports["gone"]
        assert port not in server.closed
        assert api.get_instance("here") is None
        with server.changed:
            assert server.changed.wait_for(lambda: port in server.closed, 10)
        assert server.ports["here"][0] != port
    finally:
        api.close()


def test_a_closed_api_answers_no_thread(server: _Server) -> None:
    api = UkcApi(f"http://127.0.0.1:{server.server_address[1]}", "t", metro="local")
    assert api.get_instance("before") is None
    api.close()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            api.get_instance("after")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(30)
    with pytest.raises(RuntimeError):
        api.get_instance("after")
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "after" not in server.ports
