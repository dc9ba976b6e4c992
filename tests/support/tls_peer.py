"""A TLS server on loopback for tests of the client's TLS stream (`TlsPeer`), and behaviours
for its connections."""

from __future__ import annotations

import contextlib
import select
import socket
import ssl
import threading
from collections.abc import Callable

from tests.support.tls_sshd import CaFiles


class TlsPeer:
    """A TLS server on loopback, one thread per connection, doing `behaviour` with each
    handshaken socket; records the SNI names it was asked for.

    A connection's socket is closed only by its own thread: `close()` shuts the connections
    down (which wakes a thread inside a call on one) and waits for the threads. Closing the fd
    under a thread inside OpenSSL let that thread's next read or write land on whatever socket
    took the number next: the next test's stream, which then read bytes that were not TLS.
    """

    def __init__(
        self, ca: CaFiles, behaviour: Callable[[ssl.SSLSocket], None], *, handshake: bool = True
    ) -> None:
        self.names: list[str | None] = []
        self._ctx = ca.server_context()
        self._ctx.sni_callback = lambda sock, name, ctx: self.names.append(name)  # type: ignore[assignment,misc,unused-ignore]
        self._behaviour = behaviour
        self._handshake = handshake
        self._lock = threading.Lock()
        self._closing = False
        #: per connection: its thread, and a duplicate of its socket that can shut it down
        #: whoever holds the original (the TLS wrapper takes over the accepted socket's fd)
        self._serving: list[tuple[threading.Thread, socket.socket]] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closing:
                    conn.close()
                    return
                thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
                self._serving.append((thread, conn.dup()))
                thread.start()

    def _serve(self, conn: socket.socket) -> None:
        if not self._handshake:
            with conn:
                deaf(conn)  # TCP accepted, not a byte of TLS ever answered
            return
        try:
            tls = self._ctx.wrap_socket(conn, server_side=True)
        except OSError:
            conn.close()
            return
        with tls, contextlib.suppress(OSError):
            self._behaviour(tls)

    def close(self) -> None:
        with self._lock:
            self._closing = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept (a close does not)
        self._acceptor.join(5)
        self.listener.close()
        with self._lock:
            serving = list(self._serving)
        for _thread, waker in serving:
            with contextlib.suppress(OSError):
                waker.shutdown(socket.SHUT_RDWR)
        for thread, waker in serving:
            thread.join(5)
            waker.close()


def deaf(sock: socket.socket) -> None:
    """Never reads, never writes: waits until the connection is shut down (`close()`, or the
    client's reset)."""
    poller = select.poll()
    poller.register(sock, 0)  # only a hang-up or an error ends the wait
    poller.poll()


def echo(tls: ssl.SSLSocket) -> None:
    while data := tls.recv(1 << 20):
        tls.sendall(data)
