"""One trust decision for a remote metro: its API client and its TLS edge verify against the
same store (SSL_CERT_FILE / SSL_CERT_DIR from the environment ukc was given, else certifi),
so a CA that the API accepts is never refused by the edge, or the reverse."""

from __future__ import annotations

import http.server
from collections.abc import Iterator

import pytest

from reconciler.cloud.metros import MetroRegistry
from reconciler.errors import TransportError
from reconciler.transport.select import edge_handshake
from tests.support.tls_sshd import CaFiles, TlsForwarder, https_front


class _EmptyList(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "success", "data": {"instances": []}}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def front(test_ca: CaFiles) -> Iterator[TlsForwarder]:
    """An https metro signed by the test CA: an API and an edge on one TLS port."""
    with https_front(test_ca, _EmptyList) as fwd:
        yield fwd


def environ_for(url: str, **extra: str) -> dict[str, str]:
    return {"UKC_METRO": url, "UKC_METRO_TOKEN": "t" * 20, **extra}


def test_a_ca_named_in_the_environment_is_trusted_by_both_the_api_and_the_edge(
    test_ca: CaFiles, front: TlsForwarder
) -> None:
    url = f"https://127.0.0.1:{front.port}"
    registry = MetroRegistry(environ_for(url, SSL_CERT_FILE=str(test_ca.ca_path)))
    try:
        conn = registry.get(url)
        assert conn.api.list_instances([]) == []
        assert edge_handshake(conn.reach, "127.0.0.1", front.port, 5.0).startswith("TLS")
        assert conn.reach.trust_store == "SSL_CERT_FILE"
    finally:
        registry.close()


def test_without_one_both_refuse_a_ca_that_certifi_does_not_hold(front: TlsForwarder) -> None:
    url = f"https://127.0.0.1:{front.port}"
    registry = MetroRegistry(environ_for(url))
    try:
        conn = registry.get(url)
        assert conn.reach.trust_store == "certifi"
        with pytest.raises(TransportError, match="certificate"):
            conn.api.list_instances([])
        with pytest.raises(TransportError, match="certificate rejected"):
            edge_handshake(conn.reach, "127.0.0.1", front.port, 5.0)
    finally:
        registry.close()
