"""A TLS server on loopback for tests of the client's TLS stream (`TlsPeer`), and behaviours
for its connections."""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from collections.abc import Callable

from tests.support.tls_sshd import CaFiles


class TlsPeer:
    """A TLS server on loopback, one thread per connection, doing `behaviour` with each
    handshaken socket; records the SNI names it was asked for."""

    def __init__(
        self, ca: CaFiles, behaviour: Callable[[ssl.SSLSocket], None], *, handshake: bool = True
    ) -> None:
        self.names: list[str | None] = []
        self._ctx = ca.server_context()
        self._ctx.sni_callback = lambda sock, name, ctx: self.names.append(name)  # type: ignore[assignment,misc,unused-ignore]
        self._behaviour = behaviour
        self._handshake = handshake
        self._conns: list[socket.socket] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self._conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        if not self._handshake:
            return  # TCP accepted, not a byte of TLS ever answered
        with contextlib.suppress(OSError):
            tls = self._ctx.wrap_socket(conn, server_side=True)
            self._conns.append(tls)
            self._behaviour(tls)

    def close(self) -> None:
        self.listener.close()
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


def echo(tls: ssl.SSLSocket) -> None:
    with tls:
        while data := tls.recv(1 << 20):
            tls.sendall(data)
