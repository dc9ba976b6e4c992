"""`TlsStream`: paramiko's socket over one `SSLObject`, against real TLS peers on loopback.

The design is safe when every use of the OpenSSL object is serialised while socket calls run
outside the lock, and when `close()` never frees the fd under a thread still inside a call on
it (the next connection would get the same number). These tests run bulk bytes both ways at
once over many connections in one process, and close under blocked readers and writers.
"""

from __future__ import annotations

import contextlib
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator

import pytest

from reconciler.errors import TransportError
from reconciler.transport.sshclient import SshProcess, SshShell
from reconciler.transport.tls import Dialer, TlsStream
from tests.support.tls_peer import TlsPeer, deaf, echo
from tests.support.tls_sshd import FQDN, CaFiles, Sshd, dialer_to


def says_goodbye(tls: ssl.SSLSocket) -> None:
    tls.unwrap().close()  # close_notify, then the TCP close


@pytest.fixture
def peer(test_ca: CaFiles, request: pytest.FixtureRequest) -> Iterator[TlsPeer]:
    behaviour, handshake = getattr(request, "param", (echo, True))
    server = TlsPeer(test_ca, behaviour, handshake=handshake)
    yield server
    server.close()


def exchange(stream: TlsStream, payload: bytes, rng: random.Random) -> bytes:
    """Write `payload` in pieces of random sizes while another thread reads the echo."""
    got = bytearray()

    def reader() -> None:
        while len(got) < len(payload) and (data := stream.recv(rng.choice((5, 4096, 1 << 20)))):
            got.extend(data)

    thread = threading.Thread(target=reader)
    thread.start()
    view, sizes = memoryview(payload), (1, 700, 32 * 1024, 300 * 1024)
    while view:
        n = stream.send(view[: rng.choice(sizes)])
        view = view[n:]
    thread.join(60)
    return bytes(got)


def test_the_stream_sends_the_fqdn_as_sni_and_checks_the_certificate_against_it(
    test_ca: CaFiles, peer: TlsPeer
) -> None:
    with dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5) as stream:
        assert stream.server_hostname == FQDN
        assert stream.version() == "TLSv1.3"
        stream.send(b"ping")
        assert stream.recv(4) == b"ping"
    assert peer.names == [FQDN]


def test_a_certificate_not_valid_for_the_fqdn_is_refused_for_good(
    test_ca: CaFiles, peer: TlsPeer
) -> None:
    with pytest.raises(TransportError, match="certificate rejected") as err:
        dialer_to(test_ca, peer.port).open_stream("box1.elsewhere.test", 2222, 5)
    assert err.value.retryable is False


def test_an_untrusted_ca_is_refused(peer: TlsPeer) -> None:
    dialer = Dialer.with_ca(None, lambda f, p: ("127.0.0.1", peer.port))
    with pytest.raises(TransportError, match="certificate rejected"):
        dialer.open_stream(FQDN, 2222, 5)


@pytest.mark.parametrize("peer", [(deaf, False)], indirect=True)
def test_a_peer_that_never_answers_the_handshake_is_a_retryable_timeout(
    test_ca: CaFiles, peer: TlsPeer
) -> None:
    started = time.monotonic()
    with pytest.raises(TransportError, match="handshake failed \\(timed out\\)") as err:
        dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 0.3)
    assert err.value.retryable is True
    assert time.monotonic() - started < 3


def test_a_peer_that_trickles_the_handshake_is_cut_at_the_timeout(test_ca: CaFiles) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn, contextlib.suppress(OSError):
            # a handshake record that announces 16 KiB, then one byte of it every 50 ms: each
            # read gets something well within the timeout, and the record never completes
            conn.sendall(b"\x16\x03\x03\x40\x00")
            until = time.monotonic() + 3.0
            while not stop.wait(0.05) and time.monotonic() < until:
                conn.sendall(b"\x00")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    started = time.monotonic()
    try:
        with pytest.raises(TransportError, match="handshake failed \\(timed out\\)") as err:
            dialer_to(test_ca, listener.getsockname()[1]).open_stream(FQDN, 2222, 0.5)
        assert time.monotonic() - started < 2.0
        assert err.value.retryable is True
    finally:
        stop.set()
        listener.close()
        thread.join(5)


def test_bulk_bytes_cross_both_ways_at_once_over_many_connections_in_one_process(
    test_ca: CaFiles, peer: TlsPeer
) -> None:
    rng = random.Random(7)
    dialer = dialer_to(test_ca, peer.port)
    for _ in range(25):
        payload = rng.randbytes(3 * 1024 * 1024)
        stream = dialer.open_stream(FQDN, 2222, 5)
        try:
            assert exchange(stream, payload, rng) == payload
        finally:
            stream.close()


@pytest.mark.parametrize("peer", [(deaf, True)], indirect=True)
def test_a_read_waits_no_longer_than_the_timeout(test_ca: CaFiles, peer: TlsPeer) -> None:
    with dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5) as stream:
        stream.settimeout(0.2)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            stream.recv(10)
        assert 0.15 < time.monotonic() - started < 2


@pytest.mark.parametrize("peer", [(deaf, True)], indirect=True)
def test_close_wakes_a_blocked_reader_and_returns_promptly(test_ca: CaFiles, peer: TlsPeer) -> None:
    stream = dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5)
    left = threading.Event()
    outcome: list[object] = []

    def reader() -> None:
        try:
            outcome.append(stream.recv(10))
        except OSError as err:
            outcome.append(err)
        left.set()

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.2)  # the reader is blocked in recv on the socket
    started = time.monotonic()
    stream.close()  # wakes the reader (a plain close of the fd would not) and waits for it
    assert time.monotonic() - started < 3
    assert left.wait(5)
    assert outcome == [b""] or isinstance(outcome[0], OSError)
    thread.join(5)


@pytest.mark.parametrize("peer", [(deaf, True)], indirect=True)
def test_close_wakes_a_writer_blocked_by_a_peer_that_does_not_read(
    test_ca: CaFiles, peer: TlsPeer
) -> None:
    stream = dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5)
    stream.settimeout(0.1)  # as paramiko sets it: a write still waits for the peer
    blocked = threading.Event()
    outcome: list[BaseException] = []

    def writer() -> None:
        chunk = bytes(1 << 20)
        try:
            while True:
                blocked.set()
                stream.send(chunk)
        except OSError as err:
            outcome.append(err)

    thread = threading.Thread(target=writer)
    thread.start()
    blocked.wait(5)
    time.sleep(0.5)  # the kernel buffers are full: the writer waits for the peer
    assert thread.is_alive()
    started = time.monotonic()
    stream.close()
    thread.join(5)
    assert not thread.is_alive()
    assert outcome and isinstance(outcome[0], OSError)
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("peer", [(says_goodbye, True)], indirect=True)
def test_a_peer_that_closes_gives_the_end_of_the_stream(test_ca: CaFiles, peer: TlsPeer) -> None:
    with dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5) as stream:
        stream.settimeout(5)
        assert stream.recv(10) == b""


def test_a_closed_stream_refuses_further_use_and_closing_twice_is_harmless(
    test_ca: CaFiles, peer: TlsPeer
) -> None:
    stream = dialer_to(test_ca, peer.port).open_stream(FQDN, 2222, 5)
    stream.close()
    stream.close()
    with pytest.raises(OSError):
        stream.send(b"late")


def test_ssh_moves_bulk_both_ways_at_once_over_many_connections_in_one_process(
    dialer: Dialer, sshd: Sshd
) -> None:
    """Each connection pushes into one process while pulling from another: paramiko's
    reader thread decrypts while the caller's threads encrypt, on one TLS stream."""
    size = 6 * 1024 * 1024
    payload = random.Random(3).randbytes(size)
    threads_before = threading.active_count()
    for _ in range(10):
        with SshShell.connect(dialer, FQDN, key_path=sshd.client_key, user=sshd.user) as shell:
            echo = shell.start("cat")
            pull = shell.start(f"head -c {size} /dev/zero")
            got, pulled = bytearray(), [0]

            def read_echo(proc: SshProcess = echo, into: bytearray = got) -> None:
                while data := proc.read(1 << 20):
                    into.extend(data)

            def read_pull(proc: SshProcess = pull, count: list[int] = pulled) -> None:
                while data := proc.read(1 << 20):
                    count[0] += len(data)

            readers = [threading.Thread(target=read_echo), threading.Thread(target=read_pull)]
            for t in readers:
                t.start()
            echo.write(payload)
            echo.close_stdin()
            for t in readers:
                t.join(60)
            assert (echo.wait(30), pull.wait(30)) == (0, 0)
            assert bytes(got) == payload
            assert pulled[0] == size
    assert threading.active_count() <= threads_before
