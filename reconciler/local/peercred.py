"""Which local user is on the other end of a loopback TCP connection.

The edge listens on 127.0.0.1 only, so every client is a process of this host in the daemon's
network namespace, and the kernel knows the uid that created the client's socket: the socket
whose local address is the peer address we accepted and whose remote address is ours. A TCP
4-tuple is unique in a namespace, so no other socket can stand in for it.

The kernel is asked by sock_diag (netlink, an exact lookup of that 4-tuple: ~15 µs, needs no
privilege). Where sock_diag is unavailable, `/proc/net/tcp` and `/proc/net/tcp6` answer the
same (an IPv6 socket that reached an IPv4 listener is listed with its v4-mapped address), at
some milliseconds a read because the kernel walks its whole table.

Only a live socket counts: one its process already closed (inode 0) and TIME_WAIT entries are
reported as uid 0 whoever made them, so a client that closed before we looked is unknown,
never root.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

__all__ = ["loopback_peer_uid", "peer_uid_by_diag", "peer_uid_from_tables"]

_TCP_TIME_WAIT, _TCP_LISTEN = 6, 10
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NLMSG_HDR = struct.Struct("=IHHII")
#: inet_diag_msg after its 4 one-byte fields and the 48-byte socket id
_DIAG_TAIL = struct.Struct("=IIIII")
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF


def _diag_query(family: int, peer: tuple[str, int], ours: tuple[str, int]) -> int | None:
    if family == socket.AF_INET:
        src = socket.inet_aton(peer[0]) + bytes(12)
        dst = socket.inet_aton(ours[0]) + bytes(12)
    else:
        src = socket.inet_pton(socket.AF_INET6, peer[0].split("%", 1)[0])
        dst = socket.inet_pton(socket.AF_INET6, ours[0].split("%", 1)[0])
    # inet_diag_req_v2: family, protocol, ext, pad, states, then inet_diag_sockid (the source
    # is the socket we look for: the client's end)
    sockid = (
        struct.pack("!HH", int(peer[1]), int(ours[1]))
        + src
        + dst
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + sockid
    msg = _NLMSG_HDR.pack(_NLMSG_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(1.0)
        nl.sendto(msg + req, (0, 0))
        data = nl.recv(65536)
    if len(data) < _NLMSG_HDR.size:
        raise OSError("sock_diag: short answer")
    _len, kind, _flags, _seq, _pid = _NLMSG_HDR.unpack_from(data)
    if kind == _NLMSG_ERROR:
        (err,) = struct.unpack_from("=i", data, _NLMSG_HDR.size)
        if -err == errno.ENOENT:
            return None
        raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
    if kind != _SOCK_DIAG_BY_FAMILY or len(data) < _NLMSG_HDR.size + 52 + _DIAG_TAIL.size:
        raise OSError("sock_diag: unexpected answer")
    state = data[_NLMSG_HDR.size + 1]
    sport, dport = struct.unpack_from("!HH", data, _NLMSG_HDR.size + 4)
    _expires, _rq, _wq, uid, inode = _DIAG_TAIL.unpack_from(data, _NLMSG_HDR.size + 52)
    if (sport, dport) != (int(peer[1]), int(ours[1])):
        return None
    if state in (_TCP_TIME_WAIT, _TCP_LISTEN) or inode == 0:
        return None
    return int(uid)


def peer_uid_by_diag(peer: tuple[str, int], ours: tuple[str, int]) -> int | None:
    """The client socket's uid by sock_diag; None if no live socket; OSError if unavailable."""
    if ":" in peer[0] or ":" in ours[0]:
        return _diag_query(socket.AF_INET6, peer, ours)
    # why: an IPv6 socket may have reached our IPv4 listener through a v4-mapped address
    found = _diag_query(socket.AF_INET, peer, ours)
    if found is None:
        found = _diag_query(
            socket.AF_INET6, ("::ffff:" + peer[0], peer[1]), ("::ffff:" + ours[0], ours[1])
        )
    return found


def _words(raw: bytes) -> str:
    # why: the kernel prints each 32-bit word of an address in host byte order
    return "".join(f"{w:08X}" for w in struct.unpack(f"={len(raw) // 4}I", raw))


def _candidates(peer_ip: str, our_ip: str) -> list[tuple[str, str, str]]:
    """(table, peer hex, our hex) wherever the client's socket may be listed."""
    if ":" in peer_ip or ":" in our_ip:
        six = [
            _words(socket.inet_pton(socket.AF_INET6, ip.split("%", 1)[0]))
            for ip in (peer_ip, our_ip)
        ]
        return [("tcp6", six[0], six[1])]
    four = [_words(socket.inet_aton(ip)) for ip in (peer_ip, our_ip)]
    mapped = [_words(socket.inet_pton(socket.AF_INET6, "::ffff:" + ip)) for ip in (peer_ip, our_ip)]
    return [("tcp", four[0], four[1]), ("tcp6", mapped[0], mapped[1])]


def _uid_in(table: bytes, needle: bytes) -> int | None:
    start = 0
    while True:
        at = table.find(needle, start)
        if at < 0:
            return None
        start = at + len(needle)
        # why: the needle must be the line's local+remote columns, not text inside another line
        line_start = table.rfind(b"\n", 0, at) + 1
        line_end = table.find(b"\n", at)
        fields = table[line_start : line_end if line_end >= 0 else len(table)].split()
        # sl local remote st tx:rx tr:when retrnsmt uid timeout inode ...
        if len(fields) < 10 or fields[1] + b" " + fields[2] != needle:
            continue
        try:
            state, uid, inode = int(fields[3], 16), int(fields[7]), int(fields[9])
        except ValueError:
            continue
        if state in (_TCP_TIME_WAIT, _TCP_LISTEN) or inode == 0:
            continue
        return uid


def loopback_peer_uid(peer: tuple[str, int], ours: tuple[str, int]) -> int | None:
    """The uid owning the client socket of the connection `peer` → `ours`, or None if unknown.

    `peer` and `ours` are (address, port) as `getpeername()` / `getsockname()` give them.
    """
    try:
        return peer_uid_by_diag(peer, ours)
    except (OSError, ValueError):
        return peer_uid_from_tables(peer, ours)


def peer_uid_from_tables(
    peer: tuple[str, int], ours: tuple[str, int], proc_net: Path = Path("/proc/net")
) -> int | None:
    """The same answer read from `/proc/net/tcp` and `/proc/net/tcp6`."""
    try:
        candidates = _candidates(peer[0], ours[0])
    except (OSError, ValueError):
        return None
    for table_name, peer_hex, our_hex in candidates:
        try:
            table = (proc_net / table_name).read_bytes()
        except OSError:
            continue
        needle = f"{peer_hex}:{int(peer[1]):04X} {our_hex}:{int(ours[1]):04X}".encode()
        uid = _uid_in(table, needle)
        if uid is not None:
            return uid
    return None
