"""Gathered sends: several SSH packets through one TLS write and one socket send.

A thread inside `TlsStream.gathered` has its sends held and sent together; another thread's
send must first take what is held (SSH numbers its packets, so the wire order is the order
they were made), and the gathering thread must never wait for a channel's window while it
holds bytes (they may be what the peer needs before it opens the window again).
"""

from __future__ import annotations

import random
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from reconciler.transport import tls
from reconciler.transport.sshclient import SshProcess, SshShell
from reconciler.transport.tls import Dialer, TlsStream
from tests.support.tls_peer import TlsPeer, echo
from tests.support.tls_sshd import FQDN, CaFiles, Sshd, dialer_to


class CountingSocket:
    """The stream's socket, counting the sends that reach the kernel."""

    def __init__(self, raw: socket.socket) -> None:
        self._raw = raw
        self.sends: list[int] = []

    def send(self, data: Any, *flags: int) -> int:
        n = self._raw.send(data, *flags)
        self.sends.append(n)
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)


@pytest.fixture
def stream(test_ca: CaFiles) -> Iterator[tuple[TlsStream, CountingSocket]]:
    peer = TlsPeer(test_ca, echo)
    s = dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5)
    counting = CountingSocket(s._raw)
    s._raw = counting  # type: ignore[assignment]
    yield s, counting
    s.close()
    peer.close()


def read_exactly(s: TlsStream, n: int) -> bytes:
    got = bytearray()
    s.settimeout(10)
    while len(got) < n:
        data = s.recv(n - len(got))
        assert data, f"the echo ended after {len(got)} of {n} bytes"
        got += data
    return bytes(got)


def test_a_gathering_thread_sends_many_small_writes_in_a_few_socket_sends(
    stream: tuple[TlsStream, CountingSocket],
) -> None:
    s, counting = stream
    parts = [random.Random(i).randbytes(4096) for i in range(64)]
    with s.gathered():
        for part in parts:
            assert s.send(part) == len(part)
    # 256 KiB in 128 KiB gathers: two TLS writes, each one send unless the kernel takes it
    # in parts, where 64 sends went before
    assert len(counting.sends) < 16
    assert read_exactly(s, 64 * 4096) == b"".join(parts)


def test_without_a_gather_every_send_reaches_the_socket(
    stream: tuple[TlsStream, CountingSocket],
) -> None:
    s, counting = stream
    for i in range(8):
        s.send(bytes([i]) * 100)
    assert len(counting.sends) == 8
    assert read_exactly(s, 800) == b"".join(bytes([i]) * 100 for i in range(8))


def test_another_threads_send_goes_out_after_what_the_gathering_thread_holds(
    stream: tuple[TlsStream, CountingSocket],
) -> None:
    s, _ = stream
    held, sent_b, done = threading.Event(), threading.Event(), threading.Event()

    def gatherer() -> None:
        with s.gathered():
            s.send(b"a1")
            s.send(b"a2")
            held.set()
            assert sent_b.wait(5)
            s.send(b"a3")
        done.set()

    thread = threading.Thread(target=gatherer)
    thread.start()
    assert held.wait(5)
    s.send(b"b")  # made after a1 and a2: must not overtake them
    sent_b.set()
    assert done.wait(5)
    thread.join(5)
    assert read_exactly(s, 7) == b"a1a2ba3"


def test_what_is_held_goes_out_when_the_gathering_thread_raises(
    stream: tuple[TlsStream, CountingSocket],
) -> None:
    s, _ = stream
    with pytest.raises(RuntimeError), s.gathered():
        s.send(b"held")
        raise RuntimeError("the caller failed")
    assert read_exactly(s, 4) == b"held"
    s.send(b"after")  # no longer gathering: straight out
    assert read_exactly(s, 5) == b"after"


class WindowedChannel:
    """A channel whose window the test opens: `send` waits while it is shut (as paramiko's
    does), and each call records whether the stream held bytes at that moment."""

    def __init__(self, stream: TlsStream, window: int) -> None:
        self.stream = stream
        self.out_window_size = window
        self.cv = threading.Condition()
        self.got = bytearray()
        self.held_while_waiting: list[int] = []
        self.waiting = threading.Event()

    def _take(self, data: Any, wait: bool) -> int:
        with self.cv:
            if wait and self.out_window_size == 0:
                self.held_while_waiting.append(self.stream._held_n)
                self.waiting.set()
                assert self.cv.wait_for(lambda: self.out_window_size > 0, 5)
            n = min(len(data), self.out_window_size, 32 * 1024)
            self.out_window_size -= n
        self.stream.send(bytes(data[:n]))  # as paramiko's packetizer writes a packet
        self.got += data[:n]
        return n

    def send(self, data: Any) -> int:
        return self._take(data, wait=True)

    def sendall(self, data: Any) -> None:
        view = memoryview(data)
        while view:
            view = view[self._take(view, wait=True) :]

    def open(self, n: int) -> None:
        with self.cv:
            self.out_window_size += n
            self.cv.notify_all()


def test_a_write_waits_for_a_shut_window_with_nothing_held(
    stream: tuple[TlsStream, CountingSocket],
) -> None:
    s, _ = stream
    channel = WindowedChannel(s, window=100 * 1024)
    shell = SshShell.__new__(SshShell)
    shell._sock = s
    process = SshProcess(channel, shell)  # type: ignore[arg-type]
    payload = random.Random(5).randbytes(300 * 1024)

    def opener() -> None:
        # the window opens only once what was sent arrived (the peer's echo here) and the
        # writer waits for it
        for _ in range(2):
            read_exactly(s, 100 * 1024)
            assert channel.waiting.wait(5)
            channel.waiting.clear()
            channel.open(100 * 1024)
        read_exactly(s, 100 * 1024)

    thread = threading.Thread(target=opener)
    thread.start()
    process._send(payload)
    thread.join(10)
    assert not thread.is_alive()
    assert bytes(channel.got) == payload
    assert channel.held_while_waiting == [0, 0]


def test_ssh_through_the_gathered_stream_moves_more_than_a_window_in_one_write(
    dialer: Dialer, sshd: Sshd
) -> None:
    """sshd opens its window 2 MiB at a time: one write of 9 MiB crosses it many times, with
    gathers of every size against the window's edges."""
    payload = random.Random(11).randbytes(9 * 1024 * 1024 + 12345)
    with SshShell.connect(dialer, FQDN, key_path=sshd.client_key, user=sshd.user) as shell:
        proc = shell.start("cat")
        got = bytearray()

        def reader() -> None:
            while data := proc.read(1 << 20):
                got.extend(data)

        thread = threading.Thread(target=reader)
        thread.start()
        proc.write(payload)
        proc.write(b"tail")
        proc.close_stdin()
        thread.join(60)
        assert proc.wait(30) == 0
        assert bytes(got) == payload + b"tail"


def test_the_gather_holds_less_than_half_an_ssh_window() -> None:
    # why: a peer such as sshd opens its window again after it consumed half of it; held
    # bytes above that could be the ones it waits for
    assert tls._GATHER < (2 << 20) // 2
