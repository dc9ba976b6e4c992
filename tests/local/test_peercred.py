"""The uid behind a loopback TCP connection, from crafted kernel tables and from real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.local.peercred import loopback_peer_uid, peer_uid_by_diag, peer_uid_from_tables
from tests.support.users import need_other_user

HEADER = (
    "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
    "timeout inode\n"
)


def _row(local: str, remote: str, state: str, uid: int, inode: int) -> str:
    return (
        f"   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 "
        f"{uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1\n"
    )


def _tables(tmp_path: Path, tcp: str = "", tcp6: str = "") -> Path:
    (tmp_path / "tcp").write_text(HEADER + tcp)
    (tmp_path / "tcp6").write_text(HEADER + tcp6)
    return tmp_path


# 127.0.0.1 as the kernel prints it on a little-endian host; ports 0xA000 (client), 0x1F90
CLIENT, SERVER = "0100007F:A000", "0100007F:1F90"
PEER, OURS = ("127.0.0.1", 0xA000), ("127.0.0.1", 0x1F90)

little_endian = pytest.mark.skipif(
    socket.htonl(1) == 1, reason="crafted tables are written in little-endian order"
)


@little_endian
def test_the_client_sockets_uid_is_read_from_the_row_with_the_peer_as_local_address(
    tmp_path: Path,
) -> None:
    # our own accepted socket (the reverse row) belongs to the daemon: it must not be used
    rows = _row(SERVER, CLIENT, "01", 0, 111) + _row(CLIENT, SERVER, "01", 1234, 222)
    assert peer_uid_from_tables(PEER, OURS, _tables(tmp_path, rows)) == 1234


@little_endian
def test_a_time_wait_or_closed_entry_listed_as_uid_0_is_not_taken_for_root(
    tmp_path: Path,
) -> None:
    for state, inode in (("06", 0), ("05", 0)):
        rows = _row(CLIENT, SERVER, state, 0, inode)
        assert peer_uid_from_tables(PEER, OURS, _tables(tmp_path, rows)) is None


@little_endian
def test_an_ipv6_socket_that_reached_the_ipv4_listener_is_found_by_its_mapped_address(
    tmp_path: Path,
) -> None:
    mapped_client = "0000000000000000FFFF00000100007F:A000"
    mapped_server = "0000000000000000FFFF00000100007F:1F90"
    rows6 = _row(mapped_client, mapped_server, "01", 4321, 333)
    assert peer_uid_from_tables(PEER, OURS, _tables(tmp_path, tcp6=rows6)) == 4321


@little_endian
def test_no_matching_row_or_no_tables_means_unknown(tmp_path: Path) -> None:
    other = _row("0100007F:A001", SERVER, "01", 1234, 222)
    assert peer_uid_from_tables(PEER, OURS, _tables(tmp_path, other)) is None
    assert peer_uid_from_tables(PEER, OURS, tmp_path / "missing") is None


Lookup = Callable[[tuple[str, int], tuple[str, int]], "int | None"]
LOOKUPS: dict[str, Lookup] = {
    "sock_diag": peer_uid_by_diag,
    "proc tables": peer_uid_from_tables,
    "either": loopback_peer_uid,
}
lookups = pytest.mark.parametrize("lookup", list(LOOKUPS.values()), ids=list(LOOKUPS))


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(30)
    yield sock
    sock.close()


def _client_as_other_user(port: int, then: str) -> subprocess.Popen[bytes]:
    """`nobody` connects to `port`, then closes at once ("close") or waits for stdin EOF."""
    user = need_other_user()
    wait = "" if then == "close" else "sys.stdin.read(); "
    client = (
        f"import socket, sys; s = socket.create_connection(('127.0.0.1', {port})); "
        f"{wait}s.close(); print('closed', flush=True); sys.stdin.read()"
    )
    return subprocess.Popen(
        [
            "setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
            "--", "/usr/bin/python3", "-c", client,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip


def _finish(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)


@lookups
def test_a_real_connection_from_another_user_is_attributed_to_that_user(
    listener: socket.socket, lookup: Lookup
) -> None:
    user = need_other_user()
    proc = _client_as_other_user(listener.getsockname()[1], then="wait")
    try:
        conn, _ = listener.accept()
        with conn:
            assert lookup(conn.getpeername(), conn.getsockname()) == user.pw_uid
    finally:
        _finish(proc)


@lookups
def test_a_client_that_closed_before_the_lookup_is_unknown_not_root(
    listener: socket.socket, lookup: Lookup
) -> None:
    # the kernel reports the orphaned socket (FIN_WAIT2) of a closed client as uid 0
    proc = _client_as_other_user(listener.getsockname()[1], then="close")
    try:
        conn, _ = listener.accept()
        assert proc.stdout is not None and proc.stdout.readline() == b"closed\n"
        with conn:
            assert lookup(conn.getpeername(), conn.getsockname()) is None
    finally:
        _finish(proc)


@lookups
def test_a_real_connection_of_our_own_is_attributed_to_us(
    listener: socket.socket, lookup: Lookup
) -> None:
    client = socket.create_connection(listener.getsockname())
    conn, _ = listener.accept()
    with client, conn:
        assert lookup(conn.getpeername(), conn.getsockname()) == os.getuid()


def test_an_ipv6_client_of_the_ipv4_listener_is_found_by_sock_diag(
    listener: socket.socket,
) -> None:
    client = socket.socket(socket.AF_INET6)
    client.connect(("::ffff:127.0.0.1", listener.getsockname()[1]))
    conn, _ = listener.accept()
    with client, conn:
        assert peer_uid_by_diag(conn.getpeername(), conn.getsockname()) == os.getuid()
