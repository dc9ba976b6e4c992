"""The relay: how the host reaches ports inside the sandbox's network namespace.

A host client connects to the inherited relay socket and sends `PORT\\n`; the agent connects
to 127.0.0.1:PORT inside, answers `OK\\n` (or closes when refused), and then pumps bytes both
ways, zero-copy with splice where the kernel allows.
"""

from __future__ import annotations

import _socket
import _thread
import errno
import fcntl
import os
import time

from .console import log, suppress

# why _socket and _thread, not socket and threading: every sandbox boot starts the relay, and
# socket (with enum, selectors) and threading (with functools, collections) were half of the
# agent's start; the relay needs nothing they add
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["accept", "serve_relay", "spawn"]

PUMP_BUF = 256 * 1024
_F_SETPIPE_SZ = 1031
# why: never SPLICE_F_MORE, it corks the socket like MSG_MORE and delays every small packet
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1)
_TCP_QUICKACK = getattr(_socket, "TCP_QUICKACK", 12)


def spawn(target: Callable[..., object], *args: object) -> _thread.LockType:
    """Run `target(*args)` on a new thread; the lock it returns is released when it ends."""
    done = _thread.allocate_lock()
    done.acquire()

    def run() -> None:
        try:
            target(*args)
        finally:
            done.release()

    _thread.start_new_thread(run, ())
    return done


def _ack_now(sock: _socket.socket) -> None:
    """Acknowledge what was just read from sshd at once (Linux leaves quick-ACK mode by itself).

    why: sshd leaves Nagle on for sessions without a pty, and its answers come in pairs of small
    writes (auth success, then a host-keys notice; a channel confirmation after it): the second
    waited for our delayed ACK, 40 ms on every first channel of a connection. A real edge is
    not a loopback peer with a 40 ms ACK timer; this relay is ours, so it must not add that.
    """
    if sock.family in (_socket.AF_INET, _socket.AF_INET6):
        with suppress(OSError):
            sock.setsockopt(_socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _splice_all(src: _socket.socket, dst: _socket.socket) -> bool:
    """Zero-copy src → dst through a pipe until EOF; False if splice is unusable here."""
    rfd, wfd = os.pipe()
    moved = False
    try:
        with suppress(OSError):
            fcntl.fcntl(wfd, _F_SETPIPE_SZ, 1024 * 1024)
        while True:
            try:
                n = os.splice(src.fileno(), wfd, PUMP_BUF, flags=_SPLICE_FLAGS)
            except OSError as exc:
                if not moved and exc.errno in (errno.EINVAL, errno.ENOSYS):
                    return False
                raise
            if n == 0:
                return True
            moved = True
            _ack_now(src)
            while n > 0:
                n -= os.splice(rfd, dst.fileno(), n, flags=_SPLICE_FLAGS)
    finally:
        os.close(rfd)
        os.close(wfd)


def _pump(src: _socket.socket, dst: _socket.socket) -> None:
    """Copy src → dst until EOF; splice where the kernel allows, else 256 KiB recv/send."""
    clean = False
    try:
        if not (hasattr(os, "splice") and _splice_all(src, dst)):
            while True:
                data = src.recv(PUMP_BUF)
                if not data:
                    break
                _ack_now(src)
                dst.sendall(data)
        clean = True
    except OSError:
        pass
    finally:
        if clean:
            with suppress(OSError):
                dst.shutdown(_socket.SHUT_WR)
        else:
            # why: a reset on one side must also unblock the thread pumping the other way
            for s in (src, dst):
                with suppress(OSError):
                    s.shutdown(_socket.SHUT_RDWR)


def _connect_inside(port: int) -> _socket.socket:
    """A TCP connection to 127.0.0.1:`port` (5 s to connect), as `socket.create_connection`."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def _relay_one(client: _socket.socket) -> None:
    upstream: _socket.socket | None = None
    try:
        client.settimeout(5.0)
        line = b""
        while not line.endswith(b"\n") and len(line) < 8:
            chunk = client.recv(8 - len(line))
            if not chunk:
                return
            line += chunk
        text = line.strip().decode("ascii", "replace")
        if not text.isdigit() or not 0 < int(text) < 65536:
            return
        try:
            upstream = _connect_inside(int(text))
        except OSError:
            return  # refused inside: the client sees EOF at once
        client.settimeout(None)
        upstream.settimeout(None)
        upstream.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        client.sendall(b"OK\n")
        back = spawn(_pump, upstream, client)
        _pump(client, upstream)
        back.acquire()
    except OSError:
        pass
    finally:
        if upstream is not None:
            upstream.close()
        client.close()


def accept(listener: _socket.socket) -> _socket.socket:
    """The next connection on `listener` (blocking, as `socket.socket.accept` gives it)."""
    fd, _ = listener._accept()  # type: ignore[attr-defined]  # (not in the stubs)
    return _socket.socket(listener.family, listener.type, listener.proto, fd)


def serve_relay(listener: _socket.socket) -> None:
    while True:
        try:
            client = accept(listener)
        except OSError as exc:
            log(f"relay accept failed: {exc.strerror}")
            time.sleep(0.05)
            continue
        spawn(_relay_one, client)
