"""How a metro's instances are reached: where an FQDN's public port really is, and which CA
signs the certificates its TLS edge presents.

One trust decision serves the API client and the edge dialer of a remote metro
(`remote_trust`): the CA file or directory the operator names in SSL_CERT_FILE / SSL_CERT_DIR,
else certifi's bundle. Why one: a proxy or a private CA that the API accepts but the edge
refuses (or the reverse) would fail halfway through an apply, after the instance was made.
Why certifi over the OS store: it is what httpx (and so the vendor's own SDK) trusts by
default, it is the same on every runner (a CI image with a stale or absent ca-certificates
package still works), and an operator whose network needs another CA names it once, in the
variables OpenSSL and httpx both read. `ukc doctor` reports which store was used.

UKC publishes a sandbox's ports behind a TLS edge that routes by SNI (= the instance FQDN);
the local metro does the same on 127.0.0.1 with its own CA, trusted for that metro only.
`Reach` carries the only two differences; the transports dial with it.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from reconciler.errors import TransportError

__all__ = [
    "AddressMap",
    "Reach",
    "edge_address",
    "remote_trust",
    "same_address",
    "verifying_context",
]

#: (fqdn, public port) → (host, port) to connect to
AddressMap = Callable[[str, int], tuple[str, int]]


def same_address(fqdn: str, port: int) -> tuple[str, int]:
    """The real cloud's mapping: an FQDN's public port is where DNS says."""
    return fqdn, port


def edge_address(edge_host: str, edge_ports: Mapping[int, int]) -> AddressMap:
    """The local metro's mapping: every FQDN's public port P → edge_host:edge_ports[P]."""
    ports = dict(edge_ports)

    def address(fqdn: str, port: int) -> tuple[str, int]:
        if port not in ports:
            raise TransportError(f"local metro has no edge listener for {fqdn} port {port}")
        return edge_host, ports[port]

    return address


@dataclass(frozen=True)
class Reach:
    """The CA to trust and the address mapping of one metro's instance FQDNs."""

    ssl_context: ssl.SSLContext = field(repr=False)
    address: AddressMap = same_address
    #: which store `ssl_context` trusts, for messages and the doctor's report
    trust_store: str = "custom"


@functools.cache
def verifying_context(cafile: str | None, capath: str | None) -> ssl.SSLContext:
    """The CA-verifying context of a trust source (a CA file, else a CA directory, else
    certifi's bundle), built once per process and source.

    why: loading the bundle costs ~35 ms per client; the warm process builds it once and every
    command forked from it inherits it (a context is configuration, safe to share).
    """
    if cafile:
        return ssl.create_default_context(cafile=cafile)
    if capath:
        return ssl.create_default_context(capath=capath)
    import certifi  # httpx's own dependency, where its default bundle comes from

    return ssl.create_default_context(cafile=certifi.where())


def remote_trust(environ: Mapping[str, str]) -> tuple[ssl.SSLContext, str]:
    """The one context a remote metro's API and edge are verified with, and its store's name."""
    cafile = environ.get("SSL_CERT_FILE") or None
    capath = environ.get("SSL_CERT_DIR") or None
    label = "SSL_CERT_FILE" if cafile else "SSL_CERT_DIR" if capath else "certifi"
    return verifying_context(cafile, capath), label
