"""TLS dialling of a sandbox's public ports, and the TLS stream paramiko runs over.

A `Dialer` connects where a metro's `Reach` says an FQDN's public port is and verifies the
certificate against the FQDN (SNI too) with the metro's CA. SSH runs over it (`open_stream`);
the HTTP exec client reuses its context and address mapping.

Why a stream of our own: paramiko reads its socket from its transport thread while callers
write from theirs, and an OpenSSL object must not be used by two threads at once; handing an
SSLSocket to paramiko made bulk transfers die at random and leaked an fd-reuse race on close.
`TlsStream` serialises every use of one `SSLObject` under a lock held only for in-memory work
(socket calls run outside it), with no thread of its own: it replaced a socketpair bridge
whose pump thread copied every byte once more (15-20% of the client's CPU per MB).
"""

from __future__ import annotations

import contextlib
import errno
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from reconciler.cloud.trust import AddressMap, Reach, same_address
from reconciler.errors import TransportError

__all__ = ["Dialer", "TlsStream"]

#: ciphertext read from the socket at a time
_CHUNK = 256 * 1024
#: plaintext a `gathered` sender holds before it sends what it has: a few SSH packets (sshd
#: takes 32 KiB each), so one TLS write and one socket send carry them, and the edge wakes
#: once for them, while the peer still gets bytes to work on as the batch goes
_GATHER = 128 * 1024
#: how long `close` waits for threads inside a call on the socket before leaving the fd to
#: the last of them
_JOIN_S = 5.0


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
        raw, where = self._dial(fqdn, port, timeout)
        with _handshake_errors(raw, where):
            tls = self.ssl_context.wrap_socket(raw, server_hostname=fqdn)
        tls.settimeout(None)
        return tls

    def open_stream(self, fqdn: str, port: int, timeout: float) -> TlsStream:
        """A handshaken `TlsStream` to the fqdn's public port (what paramiko runs over); the
        same checks and errors as `connect`, and the whole handshake within `timeout`."""
        raw, where = self._dial(fqdn, port, timeout)
        deadline = time.monotonic() + timeout
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        with _handshake_errors(raw, where):
            tls = self.ssl_context.wrap_bio(incoming, outgoing, server_hostname=fqdn)
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pass
                if outgoing.pending:
                    raw.sendall(outgoing.read())
                # why: a peer that trickles bytes must not stretch the handshake past timeout
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                raw.settimeout(left)
                chunk = raw.recv(_CHUNK)
                if chunk:
                    incoming.write(chunk)
                else:
                    incoming.write_eof()
            if outgoing.pending:
                raw.sendall(outgoing.read())  # TLS 1.3: the client's Finished
        raw.settimeout(None)
        return TlsStream(raw, tls, incoming, outgoing)

    def _dial(self, fqdn: str, port: int, timeout: float) -> tuple[socket.socket, str]:
        host, real_port = self.address(fqdn, port)
        where = f"tls {fqdn}:{port}" + (
            "" if (host, real_port) == (fqdn, port) else f" via {host}:{real_port}"
        )
        try:
            raw = socket.create_connection((host, real_port), timeout=timeout)
        except OSError as err:
            raise TransportError(f"{where}: connect failed ({_reason(err)})") from None
        return raw, where


@contextlib.contextmanager
def _handshake_errors(raw: socket.socket, where: str) -> Iterator[None]:
    """Closes `raw` on failure; a certificate that does not verify is for good, the rest is
    retryable."""
    try:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        yield
    except ssl.SSLCertVerificationError as err:
        raw.close()
        raise TransportError(
            f"{where}: certificate rejected ({err.verify_message})", retryable=False
        ) from None
    except OSError as err:
        raw.close()
        raise TransportError(f"{where}: handshake failed ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    if isinstance(err, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(err, ssl.SSLError):
        return f"{type(err).__name__}: {err.reason or err.strerror or 'tls error'}".lower()
    if isinstance(err, OSError) and err.strerror:
        return err.strerror.lower()
    return type(err).__name__.lower()


class TlsStream:
    """A socket-like TLS connection for paramiko, with no thread of its own.

    One `ssl.SSLObject` over memory BIOs: every use of it (and of its BIOs) is under
    `_ssl_lock`, held only for the in-memory work, never across a socket call. A reader
    receives ciphertext outside the lock and feeds it in; a writer encrypts under the lock and
    sends outside it. Whoever holds `_send_lock` is the only one who drains the outgoing BIO,
    and drains it until empty before releasing it, so records reach the wire in the order
    OpenSSL made them even when a read produced some (a TLS 1.3 key update's answer).

    `close()` never releases the fd while another thread is inside a call on it: a thread
    blocked there is woken by a shutdown, and the fd is closed when the last one leaves.
    """

    def __init__(
        self,
        raw: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self._raw = raw
        self._tls = tls
        self._in = incoming
        self._out = outgoing
        self._ssl_lock = threading.Lock()
        self._send_lock = threading.Lock()
        #: one reader at a time feeds the incoming BIO, so ciphertext enters it in order;
        #: it owns the receive buffer (no new 256 KiB object per socket read)
        self._recv_lock = threading.Lock()
        self._view = memoryview(bytearray(_CHUNK))
        self._users_lock = threading.Condition()
        #: threads inside a call on the fd (thread id -> depth)
        self._users: dict[int, int] = {}
        #: paramiko's `Transport.stop_thread` reads this attribute
        self._closed = False
        #: the thread inside `gathered` (at most one), and the plaintext it holds
        self._gatherer: int | None = None
        self._held: list[bytes] = []
        self._held_n = 0
        self._held_lock = threading.Lock()

    @property
    def server_hostname(self) -> str | None:
        return self._tls.server_hostname

    def version(self) -> str | None:
        return self._tls.version()

    def settimeout(self, timeout: float | None) -> None:
        """How long a `recv` waits for the peer (paramiko polls with 0.1 s)."""
        self._raw.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._raw.gettimeout()

    def getpeername(self) -> object:
        with self._using():
            return self._raw.getpeername()

    def recv(self, n: int) -> bytes:
        """Up to `n` decrypted bytes; b"" at the end of the stream; `TimeoutError` when
        nothing arrived within the timeout."""
        with self._recv_lock:
            while True:
                parts: list[bytes] = []
                want, eof = n, False
                with self._ssl_lock:
                    # why: gather across records (16 KiB each), so paramiko's read of a packet
                    # is one call, and its concatenations see whole packets
                    while want > 0:
                        try:
                            part = self._tls.read(want)
                        except ssl.SSLWantReadError:
                            break
                        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                            eof = True
                            break
                        if not part:  # the peer's close_notify
                            eof = True
                            break
                        parts.append(part)
                        want -= len(part)
                    answer = self._out.pending
                if answer:
                    self._flush()
                if parts:
                    return b"".join(parts)
                if eof:
                    return b""
                got = self._raw_recv()
                with self._ssl_lock:
                    if got:
                        self._in.write(self._view[:got])
                    else:
                        self._in.write_eof()

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """Within it, this thread's sends are held and go out together (`_GATHER` at a time,
        the rest at its end): one TLS write and one socket send for several SSH packets
        instead of one each. Another thread's send takes what is held first, so the bytes
        keep their order. The caller must not wait inside for anything the held bytes are
        needed for (an SSH channel's window, say): no one else would send them."""
        with self._held_lock:
            mine = self._gatherer is None
            if mine:
                self._gatherer = threading.get_ident()
        if not mine:  # nested, or another thread gathers: plain sends
            yield
            return
        try:
            yield
        except BaseException:
            self._gatherer = None
            with contextlib.suppress(OSError, ssl.SSLError):
                self._send_held()
            raise
        self._gatherer = None
        self._send_held()

    def _send_held(self) -> None:
        self._send_lock.acquire()
        try:
            with self._held_lock:
                held, self._held, self._held_n = self._held, [], 0
            if not held:
                self._send_lock.release()
                return
            with self._ssl_lock:
                self._tls.write(b"".join(held))
                out = self._out.read()
        except BaseException:
            self._send_lock.release()
            raise
        self._send_drained(out)

    def send(self, data: bytes | bytearray | memoryview) -> int:
        """Encrypts all of `data` and returns once it is on the wire (or in the kernel); a
        `gathered` thread's data is held instead (and counted as sent)."""
        if self._gatherer == threading.get_ident():
            with self._held_lock:
                self._held.append(bytes(data))
                self._held_n += len(data)
                full = self._held_n >= _GATHER
            if full:
                self._send_held()
            return len(data)
        self._send_lock.acquire()
        try:
            with self._held_lock:
                # why first: they were made before `data` (SSH numbers its packets in order)
                held, self._held, self._held_n = self._held, [], 0
            with self._ssl_lock:
                if held:
                    held.append(bytes(data))
                    data = b"".join(held)
                n = self._tls.write(data)
                out = self._out.read()
        except ssl.SSLWantReadError:
            self._send_lock.release()
            # why: TLS 1.3 never needs a read to write; a TLS 1.2 renegotiation would
            raise ConnectionAbortedError("tls: the peer asked for a renegotiation") from None
        except BaseException:
            self._send_lock.release()
            raise
        self._send_drained(out)
        return n

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        self.send(data)

    def _flush(self) -> None:
        """Send what a read left in the outgoing BIO, unless a sender holds the send lock
        (it drains the BIO before it lets go)."""
        with self._ssl_lock:
            if not self._out.pending or not self._send_lock.acquire(blocking=False):
                return
            out = self._out.read()
        self._send_drained(out)

    def _send_drained(self, out: bytes) -> None:
        """Send `out` and then whatever reached the outgoing BIO meanwhile; the caller holds
        the send lock, which this releases (under the SSL lock, once the BIO is empty)."""
        try:
            while True:
                if out:
                    self._raw_sendall(out)
                with self._ssl_lock:
                    out = self._out.read()
                    if not out:
                        self._send_lock.release()
                        return
        except BaseException:
            self._send_lock.release()
            raise

    def _raw_recv(self) -> int:
        me = self._enter()
        try:
            return self._raw.recv_into(self._view)
        finally:
            self._leave(me)

    def _raw_sendall(self, out: bytes) -> None:
        me = self._enter()
        try:
            view = memoryview(out)
            while view:
                try:
                    sent = self._raw.send(view)
                except TimeoutError:
                    # why: the timeout is paramiko's poll interval for reads; a write waits
                    # for the peer as long as the connection is open, as paramiko's would
                    if self._closed:
                        raise ConnectionAbortedError("tls: closed while sending") from None
                    continue
                view = view[sent:]
        finally:
            self._leave(me)

    # why `_enter`/`_leave` and not only a context manager: they run around every socket
    # call (a generator-based one cost ~3% of a 2k push's client CPU)
    def _enter(self) -> int:
        """Count this thread in as inside a call on the fd (`_leave` counts it out)."""
        me = threading.get_ident()
        with self._users_lock:
            if self._closed:
                raise OSError(errno.EBADF, "tls stream closed")
            self._users[me] = self._users.get(me, 0) + 1
        return me

    def _leave(self, me: int) -> None:
        with self._users_lock:
            self._users[me] -= 1
            if not self._users[me]:
                del self._users[me]
            if self._closed:
                if not self._users:
                    self._raw.close()
                self._users_lock.notify_all()

    @contextlib.contextmanager
    def _using(self) -> Iterator[None]:
        me = self._enter()
        try:
            yield
        finally:
            self._leave(me)

    def close(self) -> None:
        """Say goodbye (TLS close_notify, one try), then release the fd once no other thread
        is inside a call on it; waits for them up to `_JOIN_S` (a shutdown wakes them), and
        past that the last one to leave releases it."""
        if self._closed:
            return
        self._goodbye()
        me = threading.get_ident()
        with self._users_lock:
            if self._closed:
                return
            self._closed = True
            if self._users:
                with contextlib.suppress(OSError):
                    self._raw.shutdown(socket.SHUT_RDWR)
                self._users_lock.wait_for(lambda: not self._users.keys() - {me}, _JOIN_S)
            if not self._users:
                self._raw.close()

    def _goodbye(self) -> None:
        # why: a TLS close_notify tells the edge this is a clean end, not a cut; sent only
        # when no one is sending (it must not land inside another record), without waiting
        with self._ssl_lock:
            if not self._send_lock.acquire(blocking=False):
                return
        try:
            with self._ssl_lock:
                with contextlib.suppress(ssl.SSLError, ValueError):
                    self._tls.unwrap()
                out = self._out.read()
            if out:
                with contextlib.suppress(OSError), self._using():
                    self._raw.send(out, socket.MSG_DONTWAIT)
        finally:
            self._send_lock.release()

    def __enter__(self) -> TlsStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
