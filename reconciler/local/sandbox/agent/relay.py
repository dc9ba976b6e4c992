"""The relay: how the host reaches ports inside the sandbox's network namespace.

A host client connects to the inherited relay socket and sends `PORT\\n`; the agent connects
to 127.0.0.1:PORT inside, answers `OK\\n` (or closes when refused), and then pumps bytes both
ways, zero-copy with splice where the kernel allows.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import threading
import time

from .console import log

__all__ = ["serve_relay"]

PUMP_BUF = 256 * 1024
_F_SETPIPE_SZ = 1031
# why: never SPLICE_F_MORE, it corks the socket like MSG_MORE and delays every small packet
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1)
_TCP_QUICKACK = getattr(socket, "TCP_QUICKACK", 12)


def _ack_now(sock: socket.socket) -> None:
    """Acknowledge what was just read from sshd at once (Linux leaves quick-ACK mode by itself).

    why: sshd leaves Nagle on for sessions without a pty, and its answers come in pairs of small
    writes (auth success, then a host-keys notice; a channel confirmation after it): the second
    waited for our delayed ACK, 40 ms on every first channel of a connection. A real edge is
    not a loopback peer with a 40 ms ACK timer; this relay is ours, so it must not add that.
    """
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)


def _splice_all(src: socket.socket, dst: socket.socket) -> bool:
    """Zero-copy src → dst through a pipe until EOF; False if splice is unusable here."""
    rfd, wfd = os.pipe()
    moved = False
    try:
        with contextlib.suppress(OSError):
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


def _pump(src: socket.socket, dst: socket.socket) -> None:
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
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
        else:
            # why: a reset on one side must also unblock the thread pumping the other way
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _relay_one(client: socket.socket) -> None:
    upstream: socket.socket | None = None
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
            upstream = socket.create_connection(("127.0.0.1", int(text)), timeout=5.0)
        except OSError:
            return  # refused inside: the client sees EOF at once
        client.settimeout(None)
        upstream.settimeout(None)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(b"OK\n")
        back = threading.Thread(target=_pump, args=(upstream, client), daemon=True)
        back.start()
        _pump(client, upstream)
        back.join()
    except OSError:
        pass
    finally:
        if upstream is not None:
            upstream.close()
        client.close()


def serve_relay(listener: socket.socket) -> None:
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:
            log(f"relay accept failed: {exc.strerror}")
            time.sleep(0.05)
            continue
        threading.Thread(target=_relay_one, args=(client,), daemon=True).start()
