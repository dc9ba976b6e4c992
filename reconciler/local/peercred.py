"""Which local user is on the other end of a loopback TCP connection.

The edge listens on 127.0.0.1 only, so every client is a process of this host in the daemon's
network namespace. The kernel lists every TCP socket of that namespace with the uid that
created it in `/proc/net/tcp` (IPv4) and `/proc/net/tcp6` (IPv6, where an IPv6 socket that
reached an IPv4 listener appears with its v4-mapped address). The client's socket is the entry
whose local address is the peer address we accepted and whose remote address is our listening
address. A TCP 4-tuple is unique in a namespace, so no other socket can stand in for it.

Only entries backed by a live socket count: a socket its process already closed (inode 0), and
TIME_WAIT entries, are listed with uid 0 whoever made them, so a client that closed before we
looked is treated as unknown, never as root.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

__all__ = ["loopback_peer_uid"]

_TIME_WAIT = "06"


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
        if fields[3].decode() == _TIME_WAIT or fields[9] == b"0":
            continue
        try:
            return int(fields[7])
        except ValueError:
            return None


def loopback_peer_uid(
    peer: tuple[str, int],
    ours: tuple[str, int],
    *,
    proc_net: Path = Path("/proc/net"),
) -> int | None:
    """The uid owning the client socket of the connection `peer` → `ours`, or None if unknown.

    `peer` and `ours` are (address, port) as `getpeername()` / `getsockname()` give them.
    """
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
