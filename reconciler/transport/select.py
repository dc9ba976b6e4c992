"""The one place that maps a session's `exec` to its `TransportKind`.

The transports a spec may name are listed once, in `spec.models.EXEC_NAMES` (the user
contract: a spec naming another is refused at its line); the transport called `NAME` is the
module `reconciler.transport.NAME`, whose `KIND` sets it up. To add a transport, write that
module and add its name to that list. Modules load on first use: a client library costs
import time that a no-op apply never needs. A transport module may list, in `PRELOAD`, the
modules it loads late (its client library): the warm process imports them once, so that every
command it forks starts with them.
"""

from __future__ import annotations

import importlib
from typing import cast

from reconciler.cloud.trust import Reach
from reconciler.errors import UsageError
from reconciler.spec.models import EXEC_NAMES
from reconciler.transport.base import TransportKind

__all__ = ["edge_handshake", "kind_for", "preload"]


def kind_for(name: str) -> TransportKind:
    """The transport a session's `exec` names."""
    if name not in EXEC_NAMES:
        raise UsageError(f"exec {name!r} is not a transport ukc knows ({', '.join(EXEC_NAMES)})")
    kind = cast(TransportKind, importlib.import_module(f"{__package__}.{name}").KIND)
    if kind.name != name:
        raise UsageError(f"reconciler.transport.{name} sets up transport {kind.name!r}")
    return kind


def preload() -> None:
    """Import every transport and what each loads late (see `PRELOAD`)."""
    for name in EXEC_NAMES:
        module = importlib.import_module(f"{__package__}.{name}")
        for late in getattr(module, "PRELOAD", ()):
            importlib.import_module(late)


def edge_handshake(reach: Reach, fqdn: str, port: int, timeout_s: float) -> str:
    """One TLS handshake with an instance's public port as every transport dials it (SNI and
    the certificate checked against the fqdn with the metro's trust store), then closed: the
    TLS version; `TransportError` when it fails."""
    from reconciler.transport.tls import Dialer

    tls = Dialer.to(reach).connect(fqdn, port, timeout_s)
    try:
        return tls.version() or "unknown"
    finally:
        tls.close()
