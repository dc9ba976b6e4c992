"""TLS dialling of a sandbox's public ports, and the socketpair bridge paramiko needs.

A `Dialer` connects where a metro's `Reach` says an FQDN's public port is and verifies the
certificate against the FQDN (SNI too) with the metro's CA. SSH runs over it (`open_bridged`);
the HTTP exec client reuses its context and address mapping.

Why the bridge: paramiko reads its socket from its transport thread while callers write from
theirs, and an OpenSSL object must not be used by two threads at once; handing an SSLSocket
to paramiko made bulk transfers die at random and leaked an fd-reuse race on close. So
paramiko gets one end of a `socketpair()` and a single pump thread owns the SSLSocket.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
from pathlib import Path

from reconciler.cloud.trust import AddressMap, Reach, same_address
from reconciler.errors import TransportError

__all__ = ["BridgedSocket", "Dialer"]

_CHUNK = 256 * 1024
#: stop reading a side while this much is queued for the other (back-pressure)
_HIGH_WATER = 4 * 1024 * 1024
_SOCK_BUF = 1024 * 1024
_JOIN_S = 5.0
_POLL_S = 0.05


class Dialer:
    """Opens TLS connections to `fqdn:port` (SNI and certificate check against the fqdn)."""

    def __init__(self, ssl_context: ssl.SSLContext, address: AddressMap | None = None) -> None:
        self.ssl_context = ssl_context
        self.address: AddressMap = address or same_address

    @classmethod
    def to(cls, reach: Reach) -> Dialer:
        """A dialer for a metro's instances."""
        return cls(reach.ssl_context, reach.address)

    @classmethod
    def with_ca(cls, ca_path: Path | str | None, address: AddressMap | None = None) -> Dialer:
        """A dialer trusting `ca_path` (the local metro's CA) or the system store when None."""
        context = ssl.create_default_context(cafile=str(ca_path) if ca_path else None)
        return cls(context, address)

    def connect(self, fqdn: str, port: int, timeout: float) -> ssl.SSLSocket:
        """A handshaken TLS socket to the fqdn's public port; `TransportError` on failure.

        Refused/reset/EOF/timeouts are retryable (a standby sandbox wakes on the first
        connection); a certificate that does not verify for the fqdn is not.
        """
        host, real_port = self.address(fqdn, port)
        where = f"tls {fqdn}:{port}" + (
            "" if (host, real_port) == (fqdn, port) else f" via {host}:{real_port}"
        )
        try:
            raw = socket.create_connection((host, real_port), timeout=timeout)
        except OSError as err:
            raise TransportError(f"{where}: connect failed ({_reason(err)})") from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = self.ssl_context.wrap_socket(raw, server_hostname=fqdn)
        except ssl.SSLCertVerificationError as err:
            raw.close()
            raise TransportError(
                f"{where}: certificate rejected ({err.verify_message})", retryable=False
            ) from None
        except OSError as err:
            raw.close()
            raise TransportError(f"{where}: handshake failed ({_reason(err)})") from None
        tls.settimeout(None)
        return tls

    def open_bridged(self, fqdn: str, port: int, timeout: float) -> BridgedSocket:
        """A plain socket whose bytes travel over a TLS connection to fqdn:port.

        The returned socket's `close()` also waits for the pump thread to finish, so the
        TLS socket's fd is released before anything can reuse its number.
        """
        return BridgedSocket.over(self.connect(fqdn, port, timeout))


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, ssl.SSLError):
        return f"{type(err).__name__}: {err.reason or err.strerror or 'tls error'}".lower()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return type(err).__name__.lower()


class BridgedSocket(socket.socket):
    """The application's end of a socketpair pumped to a TLS socket by one thread."""

    _pump_thread: threading.Thread | None = None
    _pump: _Pump | None = None

    @classmethod
    def over(cls, tls: ssl.SSLSocket) -> BridgedSocket:
        mine, theirs = socket.socketpair()
        for sk in (mine, theirs):
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SOCK_BUF)
            sk.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _SOCK_BUF)
        app = cls(theirs.family, theirs.type, theirs.proto, fileno=theirs.detach())
        pump = _Pump(tls, mine)
        thread = threading.Thread(target=pump.run, name="tls-bridge", daemon=True)
        app._pump_thread = thread
        app._pump = pump
        thread.start()
        return app

    def close(self) -> None:
        if self._pump is not None:
            self._pump.stop.set()
        # why: a shutdown wakes the pump (EOF on its end) even if someone dup'ed our fd.
        with contextlib.suppress(OSError):
            self.shutdown(socket.SHUT_RDWR)
        super().close()
        thread = self._pump_thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(_JOIN_S)


class _Pump:
    """Moves bytes both ways between the TLS socket and our socketpair end, then closes both."""

    def __init__(self, tls: ssl.SSLSocket, mine: socket.socket) -> None:
        self.tls = tls
        self.mine = mine
        self.to_tls = bytearray()
        self.to_app = bytearray()
        self.tls_eof = False
        self.app_eof = False
        self.stop = threading.Event()

    def run(self) -> None:
        tls, mine = self.tls, self.mine
        tls.setblocking(False)
        mine.setblocking(False)
        sel = selectors.DefaultSelector()
        want = (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError)
        try:
            registered: dict[socket.socket, int] = {}

            def interest(sk: socket.socket, events: int) -> None:
                # why: a socket we are not willing to read must leave the selector, or a
                # readable-but-ignored socket would spin the loop.
                current = registered.get(sk, 0)
                if events == current:
                    return
                if not events:
                    sel.unregister(sk)
                    del registered[sk]
                elif not current:
                    sel.register(sk, events)
                    registered[sk] = events
                else:
                    sel.modify(sk, events)
                    registered[sk] = events

            while True:
                if self.tls_eof and not self.to_app:
                    break  # the sandbox side is done and everything reached the app
                if self.stop.is_set() and not self.to_tls:
                    break  # the app closed its socket and everything reached the sandbox
                read_tls = not self.tls_eof and len(self.to_app) < _HIGH_WATER
                read_app = not self.app_eof and len(self.to_tls) < _HIGH_WATER
                interest(
                    tls,
                    (selectors.EVENT_READ if read_tls else 0)
                    | (selectors.EVENT_WRITE if self.to_tls else 0),
                )
                interest(
                    mine,
                    (selectors.EVENT_READ if read_app else 0)
                    | (selectors.EVENT_WRITE if self.to_app else 0),
                )
                # why: OpenSSL may hold decrypted bytes that select() cannot see.
                if read_tls and tls.pending():
                    ready_tls, ready_app = True, False
                else:
                    # why: after the app's EOF we may still relay the sandbox's answer
                    # (a half-close); poll so an explicit close() is noticed promptly.
                    events = sel.select(_POLL_S if self.app_eof else None)
                    ready_tls = any(k.fileobj is tls for k, _ in events)
                    ready_app = any(k.fileobj is mine for k, _ in events)
                if ready_tls and read_tls:
                    try:
                        while len(self.to_app) < _HIGH_WATER:
                            chunk = tls.recv(_CHUNK)
                            if not chunk:
                                self.tls_eof = True
                                break
                            self.to_app += chunk
                            if not tls.pending():
                                break
                    except want:
                        pass
                    except (ssl.SSLEOFError, ConnectionError):
                        self.tls_eof = True
                if ready_app and read_app:
                    try:
                        chunk = mine.recv(_CHUNK)
                        if chunk:
                            self.to_tls += chunk
                        else:
                            self.app_eof = True
                    except want:
                        pass
                    except ConnectionError:
                        self.app_eof = True
                if self.to_tls:
                    try:
                        # why: bounded TLS writes, and a copy, so trimming the buffer never
                        # moves memory OpenSSL may be asked to retry with.
                        sent = tls.send(bytes(self.to_tls[:_CHUNK]))
                        del self.to_tls[:sent]
                    except want:
                        pass
                if self.to_app:
                    try:
                        sent = mine.send(self.to_app)
                        del self.to_app[:sent]
                    except want:
                        pass
                    except (BrokenPipeError, ConnectionResetError):
                        break  # the app is gone; nothing left to deliver to
        except OSError:
            pass  # the connection died; closing both ends tells paramiko
        finally:
            sel.close()
            if not self.tls_eof:
                # why: a TLS close_notify tells the edge this is a clean end, not a cut; one
                # non-blocking attempt, we do not wait for the peer's answer.
                with contextlib.suppress(OSError, ValueError):
                    tls.unwrap()
            for sk in (mine, tls):
                with contextlib.suppress(OSError):
                    sk.close()
