"""Connections a finished command keeps for the next ones (`transport.links`), over a local
shell standing in for an SSH connection: what is relayed, and who may borrow what."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import TransportError
from reconciler.transport import links
from reconciler.transport.commands import ShellTransport
from reconciler.transport.local_shell import LocalShell
from tests.support.users import need_other_user, run_as_other_user


class Closable(LocalShell):
    """A local shell that says whether it was closed (as an SSH connection would)."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = threading.Event()

    @property
    def active(self) -> bool:
        return not self.closed.is_set()

    def close(self) -> None:
        self.closed.set()
        super().close()


@pytest.fixture
def place() -> Iterator[Path]:
    # short, as the warm process's directory is (a Unix socket's path has 107 bytes)
    directory = Path(tempfile.mkdtemp(prefix="ukc-links-"))
    links.enable(str(directory), idle_s=30.0)
    try:
        yield directory
    finally:
        links.enable(None)
        shutil.rmtree(directory, ignore_errors=True)


def a_key(tmp_path: Path, **changes: object) -> links.LinkKey:
    key_file = tmp_path / "key"
    if not key_file.exists():
        key_file.write_bytes(b"private key bytes")
    key = links.key_for(
        session="web",
        status_path=tmp_path / ".ukc" / "status.json",
        uuid="11111111-1111-1111-1111-111111111111",
        start_count=1,
        pin="SHA256:pinned",
        key_path=key_file,
        fqdn="web.local",
        kind="ssh",
    )
    assert key is not None
    return dataclasses.replace(key, **changes)  # type: ignore[arg-type]


def lend(key: links.LinkKey) -> tuple[Closable, threading.Thread]:
    shell = Closable()
    lender = links.lender()
    assert lender is not None
    assert links.hand_over(ShellTransport("ssh", shell, pin=key.pin), key)
    serving = threading.Thread(target=lender.serve, daemon=True)
    serving.start()
    return shell, serving


def test_a_process_started_on_a_borrowed_connection_gets_its_stdin_output_and_exit_code_relayed(
    place: Path, tmp_path: Path
) -> None:
    key = a_key(tmp_path)
    shell, _ = lend(key)
    borrowed = links.borrow(key)
    assert borrowed is not None and borrowed.pin == key.pin
    process = borrowed.start("cat; echo oops >&2; exit 7")
    payload = os.urandom(3 << 20)  # more than a frame, and than one socket buffer
    writer = threading.Thread(target=lambda: (process.write(payload), process.close_stdin()))
    writer.start()
    out = bytearray()
    while chunk := process.read():
        out += chunk
    writer.join()
    err = bytearray()
    while chunk := process.read_stderr():
        err += chunk
    assert bytes(out) == payload
    assert bytes(err) == b"oops\n"
    assert process.wait(10) == 7
    assert shell.started == ["cat; echo oops >&2; exit 7"]  # it ran on the lent connection


def test_a_borrower_naming_another_session_instance_host_key_or_key_file_is_refused(
    place: Path, tmp_path: Path
) -> None:
    key = a_key(tmp_path)
    shell, _ = lend(key)
    others = [
        a_key(tmp_path, session="api"),
        a_key(tmp_path, status_path=str(tmp_path / "other" / "status.json")),
        # the instance replaced under the same name: another uuid, another boot, host key
        a_key(tmp_path, uuid="22222222-2222-2222-2222-222222222222"),
        a_key(tmp_path, start_count=2),
        a_key(tmp_path, pin="SHA256:another"),
        a_key(tmp_path, key_digest="0" * 64),
    ]
    for other in others:
        assert links.borrow(other) is None
        # asked at the lender's own socket (as a child that guessed its name would)
        path = os.path.join(place, key.name())
        for op in ("hello", "start", "discard"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            sock.connect(path)
            command = f"touch {tmp_path / 'pwned'}"
            request = {"op": op, "key": dataclasses.asdict(other), "command": command}
            payload = json.dumps(request).encode()
            sock.sendall(struct.pack(">I", len(payload)) + payload)
            assert sock.recv(1) == b"-"
            sock.close()
    assert shell.started == []
    assert not (tmp_path / "pwned").exists()
    assert not shell.closed.is_set()
    assert links.borrow(key) is not None  # its own session still gets it


def test_dropping_a_session_ends_its_kept_connection_at_once(place: Path, tmp_path: Path) -> None:
    key = a_key(tmp_path)
    other = a_key(tmp_path, session="api")
    shell, serving = lend(key)
    other_shell = Closable()
    lender = links.lender()
    assert lender is not None
    assert links.hand_over(ShellTransport("ssh", other_shell, pin=other.pin), other)
    links.drop_session(key.status_path, "web")
    assert shell.closed.wait(5)
    assert links.borrow(key) is None
    assert not other_shell.closed.is_set()  # another session's stays
    assert links.borrow(other) is not None
    links.drop_session(other.status_path, "api")
    serving.join(5)
    assert not serving.is_alive()  # nothing held: the lender is done
    assert os.listdir(place) == []


class SlowToClose(Closable):
    """An SSH connection whose close takes longer than the lender's idle wake-up (a
    sandbox that is slow to answer the disconnect)."""

    def close(self) -> None:
        time.sleep(1.5)
        super().close()


def test_a_lender_is_done_only_once_a_connection_it_was_told_to_drop_is_closed_and_unlisted(
    place: Path, tmp_path: Path
) -> None:
    # the warm process's child exits as soon as `serve` returns: a drop still on its way
    # was cut short there, its socket left behind for the next command to find
    key = a_key(tmp_path)
    shell = SlowToClose()
    lender = links.lender()
    assert lender is not None
    assert links.hand_over(ShellTransport("ssh", shell, pin=key.pin), key)
    when_done: list[tuple[bool, list[str]]] = []

    def serve_then_look() -> None:
        lender.serve()
        when_done.append((shell.closed.is_set(), os.listdir(place)))

    serving = threading.Thread(target=serve_then_look, daemon=True)
    serving.start()
    links.drop_session(key.status_path, "web")
    serving.join(10)
    assert when_done == [(True, [])]


def test_a_kept_connection_nobody_borrows_is_closed_after_its_idle_time(
    place: Path, tmp_path: Path
) -> None:
    links.enable(str(place), idle_s=0.3)
    key = a_key(tmp_path)
    started = time.monotonic()
    shell, serving = lend(key)
    serving.join(10)
    assert not serving.is_alive()
    assert shell.closed.is_set()
    assert time.monotonic() - started >= 0.3
    assert links.borrow(key) is None


def test_a_borrower_that_failed_gives_the_connection_up_and_one_that_converged_keeps_it(
    place: Path, tmp_path: Path
) -> None:
    key = a_key(tmp_path)
    shell, _ = lend(key)
    converged = links.borrow(key)
    assert converged is not None
    assert converged.start("true").wait(10) == 0
    assert links.hand_over(converged, key)  # the pool's end of a command: released
    assert not shell.closed.is_set()
    failed = links.borrow(key)
    assert failed is not None
    failed.close()  # after an error: the lender's connection goes too
    assert shell.closed.wait(5)
    with pytest.raises(TransportError):
        failed.start("true")
    assert links.borrow(key) is None


def test_nothing_is_kept_outside_a_command_of_the_warm_process(tmp_path: Path) -> None:
    links.enable(None)
    key = a_key(tmp_path)
    assert not links.hand_over(ShellTransport("ssh", Closable(), pin=key.pin), key)
    assert links.borrow(key) is None
    links.enable(str(tmp_path), idle_s=0)  # UKC_LINK_IDLE_S=0
    assert links.lender() is None
    assert links.borrow(key) is None


ATTACKER = """
import json, socket, struct, sys
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.settimeout(5)
sock.connect(sys.argv[1])
payload = sys.argv[2].encode()
try:
    sock.sendall(struct.pack(">I", len(payload)) + payload)
    print(repr(sock.recv(1)))
except OSError as err:
    print("error", err)
"""


def test_another_local_user_reaching_a_lenders_socket_gets_nothing_started(
    place: Path, tmp_path: Path
) -> None:
    need_other_user()
    key = a_key(tmp_path)
    shell, _ = lend(key)
    # as if the private directory had been opened to everyone: the peer's uid still counts
    place.chmod(0o755)
    path = place / key.name()
    path.chmod(0o777)
    planted = tmp_path / "pwned"
    command = f"touch {planted}"
    request = {"op": "start", "key": dataclasses.asdict(key), "command": command}
    got = run_as_other_user(["/usr/bin/python3", "-c", ATTACKER, str(path), json.dumps(request)])
    assert got.returncode == 0, got.stderr
    assert got.stdout.strip() in ("b''", "") or got.stdout.startswith("error"), got.stdout
    assert shell.started == []
    assert not planted.exists()
    assert links.borrow(key) is not None  # still there for its own user


def wait_started(shell: LocalShell, n: int, timeout: float = 10) -> bool:
    """Whether `shell` has started `n` processes within `timeout`."""
    deadline = time.monotonic() + timeout
    while len(shell.started) < n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_command_that_waits_for_its_stdin_is_started_ahead_for_the_next_borrower(
    place: Path, tmp_path: Path
) -> None:
    key = a_key(tmp_path)
    shell, _ = lend(key)
    waits = "head -c 3; echo ' '$$"
    outputs = []
    for text in (b"one", b"two"):
        borrowed = links.borrow(key)
        assert borrowed is not None
        relay = borrowed.shell  # type: ignore[attr-defined]
        assert isinstance(relay, links.RelayShell)
        relay.spare(waits)
        process = borrowed.start(waits)
        process.write(text)
        out = bytearray()
        while chunk := process.read():
            out += chunk
        assert process.wait(10) == 0
        outputs.append(out.decode())
        assert links.hand_over(borrowed, key)
        # once it ended, the lender starts the next one, which waits for its stdin
        assert wait_started(shell, len(outputs) + 1)
    first, second = outputs
    assert first.startswith("one ") and second.startswith("two ")
    assert first.split()[1] != second.split()[1]  # two processes
    assert shell.started == [waits, waits, waits]  # the second borrower's was the spare


def test_a_command_not_marked_as_waiting_for_its_stdin_is_never_started_ahead(
    place: Path, tmp_path: Path
) -> None:
    key = a_key(tmp_path)
    shell, _ = lend(key)
    marker = tmp_path / "ran"
    runs = f"echo x >> {marker}"
    for _ in range(2):
        borrowed = links.borrow(key)
        assert borrowed is not None
        assert borrowed.start(runs).wait(10) == 0
        assert links.hand_over(borrowed, key)
    time.sleep(0.3)
    assert shell.started == [runs, runs]
    assert marker.read_text() == "x\nx\n"  # run when asked, never ahead


def test_a_borrower_queues_megabytes_for_a_process_that_is_not_reading_yet(
    place: Path, tmp_path: Path
) -> None:
    """The relay's socket takes a push's next frames while the lender is busy with the last:
    at the default buffer (~200 KiB) the borrower waited for every frame."""
    with open("/proc/sys/net/core/wmem_max") as f:
        if int(f.read()) < links._SOCKET_BUFFER:
            pytest.skip("this system caps socket buffers below the relay's")
    key = a_key(tmp_path)
    lend(key)
    borrowed = links.borrow(key)
    assert borrowed is not None
    process = borrowed.start("sleep 3; wc -c")  # reads nothing for 3 s
    queued = threading.Event()

    def writer() -> None:
        piece = bytes(128 << 10)
        for _ in range(16):  # 2 MiB, as a push writes it
            process.write(piece)
        queued.set()

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    assert queued.wait(2.5), "the borrower's writes waited for the process"
    process.close_stdin()
    out = bytearray()
    while chunk := process.read():
        out += chunk
    assert out.strip() == b"2097152"
    assert process.wait(10) == 0


def test_a_frame_longer_than_a_chunk_is_relayed_whole(place: Path, tmp_path: Path) -> None:
    key = a_key(tmp_path)
    lend(key)
    borrowed = links.borrow(key)
    assert borrowed is not None
    process = borrowed.start("wc -c")
    process.write(bytes(3 * links._CHUNK + 7))  # one frame, read as it comes
    process.close_stdin()
    out = bytearray()
    while chunk := process.read():
        out += chunk
    assert out.strip() == str(3 * links._CHUNK + 7).encode()
