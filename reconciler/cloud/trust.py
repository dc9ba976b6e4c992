"""How a metro's instances are reached: where an FQDN's public port really is, and which CA
signs the certificates its TLS edge presents.

UKC publishes a sandbox's ports behind a TLS edge that routes by SNI (= the instance FQDN);
the local metro does the same on 127.0.0.1 with its own CA, trusted for that metro only.
`Reach` carries the only two differences; the transports dial with it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from reconciler.errors import TransportError

__all__ = ["AddressMap", "Reach", "edge_address", "same_address"]

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
