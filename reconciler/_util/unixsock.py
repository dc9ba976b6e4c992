"""A Unix socket's peer and exact reads: what the warm process's client and server and the
connections kept between its commands check and read.

Only interpreter built-ins (`_socket`, `_struct`): the warm client imports this on every
command, before anything else.
"""

from __future__ import annotations

import _socket
import _struct

__all__ = ["peer_pid", "peer_uid", "recv_exact"]


def peer_uid(sock: _socket.socket) -> int:
    return _peer(sock)[1]


def peer_pid(sock: _socket.socket) -> int:
    return _peer(sock)[0]


def _peer(sock: _socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as this process's namespace sees them."""
    creds = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    pid, uid, _gid = _struct.unpack("3i", creds)
    return int(pid), int(uid)


def recv_exact(sock: _socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)
