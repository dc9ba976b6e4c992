"""`Dialer` and the TLS stream paramiko runs over, against a real TLS forwarder on loopback."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator

import pytest

from reconciler.cloud.trust import edge_address
from reconciler.errors import TransportError
from reconciler.transport.tls import Dialer, TlsStream
from tests.support.tls_sshd import FQDN, CaFiles, TlsForwarder, dialer_to, free_port


class EchoServer:
    """Plain TCP echo on loopback, one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)


@pytest.fixture(scope="module")
def echo_front(test_ca: CaFiles) -> Iterator[TlsForwarder]:
    echo = EchoServer()
    fwd = TlsForwarder(test_ca, echo.port).start()
    yield fwd
    fwd.stop()
    echo.sock.close()


def roundtrip(sock: TlsStream, payload: bytes) -> bytes:
    """Send while reading back (an echo), until as many bytes came back or EOF."""
    got = bytearray()

    def reader() -> None:
        while len(got) < len(payload) and (data := sock.recv(1 << 20)):
            got.extend(data)

    t = threading.Thread(target=reader)
    t.start()
    sock.sendall(payload)
    t.join(30)
    return bytes(got)


class TestDialer:
    def test_connect_verifies_the_fqdn_and_sets_sni(
        self, test_ca: CaFiles, echo_front: TlsForwarder
    ) -> None:
        tls = dialer_to(test_ca, echo_front.port).connect(FQDN, 2222, timeout=5)
        with tls:
            assert tls.server_hostname == FQDN
            assert tls.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            tls.sendall(b"ping")
            assert tls.recv(4) == b"ping"

    def test_a_certificate_not_valid_for_the_fqdn_is_refused_for_good(
        self, test_ca: CaFiles, echo_front: TlsForwarder
    ) -> None:
        with pytest.raises(TransportError, match="certificate rejected") as err:
            dialer_to(test_ca, echo_front.port).connect("box1.elsewhere.test", 2222, 5)
        assert err.value.retryable is False

    def test_an_untrusted_ca_is_refused(self, echo_front: TlsForwarder) -> None:
        dialer = Dialer.with_ca(None, lambda f, p: ("127.0.0.1", echo_front.port))
        with pytest.raises(TransportError, match="certificate rejected"):
            dialer.connect(FQDN, 2222, 5)

    def test_a_refused_connection_is_a_retryable_transport_error(self, test_ca: CaFiles) -> None:
        port = free_port()
        with pytest.raises(TransportError, match=f"via 127.0.0.1:{port}: connect failed") as err:
            dialer_to(test_ca, port).connect(FQDN, 2222, 5)
        assert err.value.retryable is True

    def test_the_edge_address_maps_public_ports_to_edge_ports(self) -> None:
        address = edge_address("127.0.0.1", {2222: 41000, 443: 41001})
        assert address("a.local.ukc.localhost", 443) == ("127.0.0.1", 41001)
        with pytest.raises(TransportError, match="port 8443"):
            address("a.local.ukc.localhost", 8443)


class TestStream:
    def test_bytes_cross_the_stream_both_ways_intact(
        self, test_ca: CaFiles, echo_front: TlsForwarder
    ) -> None:
        payload = bytes(range(256)) * 20000  # ~5 MB
        with dialer_to(test_ca, echo_front.port).open_stream(FQDN, 2222, 5) as sock:
            assert sock.server_hostname == FQDN
            assert roundtrip(sock, payload) == payload

    def test_the_stream_starts_no_thread_and_closing_releases_its_socket(
        self, test_ca: CaFiles, echo_front: TlsForwarder
    ) -> None:
        def ours() -> set[threading.Thread]:
            # the echo server's own thread per connection ends when it sees our close
            return {t for t in threading.enumerate() if "_echo" not in t.name}

        dialer = dialer_to(test_ca, echo_front.port)
        before = ours()
        for _ in range(10):
            sock = dialer.open_stream(FQDN, 2222, 5)
            sock.sendall(b"x")
            assert sock.recv(1) == b"x"
            raw = sock._raw
            sock.close()
            assert raw.fileno() == -1
        assert ours() == before

    def test_a_peer_that_goes_away_gives_the_end_of_the_stream(
        self, test_ca: CaFiles, echo_front: TlsForwarder
    ) -> None:
        ca = test_ca
        fwd = TlsForwarder(ca, free_port()).start()  # its target refuses: the edge hangs up
        try:
            sock = dialer_to(ca, fwd.port).open_stream(FQDN, 2222, 5)
            sock.settimeout(10)
            assert sock.recv(10) == b""
            sock.close()
        finally:
            fwd.stop()
