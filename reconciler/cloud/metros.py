"""Where a spec's `metro` points: API base URL, token, and how to reach instance FQDNs.

The local metro (the emulator) is started from here, and only from here: the rest of the
controller never imports it.

Which token a metro may receive is decided by `endpoints.resolve`, here, for every
connection: whoever named the metro cannot route the token elsewhere.

The only differences between the local metro and the real UKC live here: the base URL, the
token, the address an FQDN resolves to (the local edge) and the CA that signs its certificates
(trusted for that metro only). Everything above this module is identical for both.
"""

from __future__ import annotations

import ssl
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from reconciler import errors
from reconciler._util.names import metro_kind, unknown_metro_message
from reconciler.cloud.api import UkcApi
from reconciler.cloud.model import CloudApi
from reconciler.cloud.trust import Reach, remote_trust
from reconciler.spec import endpoints

if TYPE_CHECKING:
    from reconciler.local.daemon import MetroInfo

__all__ = [
    "MetroConnection",
    "MetroRegistry",
    "local_metro_status",
    "metro_label",
    "running_local_metro",
    "start_local_metro",
    "stop_local_metro",
    "warm_up",
]


def metro_label(metro: str) -> str:
    """The stable label a metro is recorded under in status files."""
    return metro.rstrip("/")


@dataclass
class MetroConnection:
    label: str
    api: CloudApi
    #: how its instances' public ports are reached (the CA to trust, the address mapping)
    reach: Reach
    local: bool


class MetroRegistry:
    """Opens one connection per metro on first use and hands it to every session on it."""

    def __init__(self, environ: Mapping[str, str], *, local_state_dir: Path | None = None) -> None:
        self._environ = environ
        self._local_state_dir = local_state_dir
        self._conns: dict[str, MetroConnection] = {}
        self._lock = threading.Lock()

    def get(self, metro: str) -> MetroConnection:
        label = metro_label(metro)
        with self._lock:
            conn = self._conns.get(label)
            if conn is None:
                conn = self._open(label)
                self._conns[label] = conn
            return conn

    def _open(self, label: str) -> MetroConnection:
        if label == "local":
            return self._open_local()
        if metro_kind(label) is None:
            unknown = unknown_metro_message(label)
            if unknown is not None:
                raise errors.UsageError(unknown)
            raise errors.UsageError(f"metro {label!r} is neither 'local', a metro code nor a URL")
        # why: every connection passes the token routing rule here, whoever named the metro
        # (a spec file, the environment, or a status file from a checkout)
        try:
            endpoint = endpoints.resolve(label, self._environ)
        except endpoints.EndpointRefusedError as err:
            raise errors.UsageError(f"metro {err}") from None
        token = self._environ.get(endpoint.token_var, "")
        if not token:
            raise errors.UsageError(f"metro {label!r} needs a token: set {endpoint.token_var}")
        # why one context: the API and the edge trust the same store (`trust.remote_trust`)
        context, store = remote_trust(self._environ)
        api = UkcApi(endpoint.base_url, token, metro=label, verify=context)
        return MetroConnection(label, api, Reach(context, trust_store=store), local=False)

    def _open_local(self) -> MetroConnection:
        info = running_local_metro(self._local_state_dir) or start_local_metro(
            self._local_state_dir
        )
        context = ssl.create_default_context(cafile=str(info.ca_path))
        edge_host = info.edge_host
        state_dir = info.state_dir

        def address(fqdn: str, port: int) -> tuple[str, int]:
            ports = info.edge_ports
            if port not in ports:
                # The edge opens ports lazily; re-read the daemon's current map once.
                fresh = local_metro_status(state_dir)
                ports = fresh.edge_ports if fresh is not None else ports
            if port not in ports:
                raise errors.TransportError(f"local metro has no edge listener for port {port}")
            return edge_host, ports[port]

        api = UkcApi(info.api_url, info.token, metro="local")
        return MetroConnection(
            "local", api, Reach(context, address, trust_store="local metro CA"), local=True
        )

    def close(self) -> None:
        with self._lock:
            for conn in self._conns.values():
                conn.api.close()
            self._conns.clear()

    def request_count(self) -> int:
        return sum(int(getattr(c.api, "request_count", 0)) for c in self._conns.values())


def start_local_metro(state_dir: Path | None = None) -> MetroInfo:
    """The local metro's address and token, starting its daemon when none runs."""
    from reconciler.local import daemon  # the emulator is loaded only when a metro needs it

    return daemon.ensure_running(state_dir)


def running_local_metro(state_dir: Path | None = None) -> MetroInfo | None:
    """The local metro whose daemon runs, as its own record says (nothing asked of it)."""
    from reconciler.local import daemon

    return daemon.running(state_dir)


def stop_local_metro(state_dir: Path | None = None) -> bool:
    """Stop the local metro and its sandboxes; False when it was not running."""
    from reconciler.local import daemon

    return daemon.stop(state_dir)


def local_metro_status(state_dir: Path | None = None) -> MetroInfo | None:
    """The running local metro, or None."""
    from reconciler.local import daemon

    return daemon.status(state_dir)


def local_metro_report(info: MetroInfo) -> dict[str, object]:
    """What the running local metro says of itself (`/_local/status`): its images, its
    behaviour, its instances by state; {} when it does not answer."""
    import httpx

    try:
        with httpx.Client(
            base_url=info.api_url,
            headers={"Authorization": f"Bearer {info.token}"},
            timeout=5.0,
            trust_env=False,  # why: as `UkcApi` for a plain-HTTP metro, never via a proxy
        ) as client:
            answer = client.get("/_local/status")
            body = answer.json() if answer.status_code == 200 else {}
    except (httpx.HTTPError, ValueError):
        return {}
    data = body.get("data") if isinstance(body, dict) else None
    return data if isinstance(data, dict) else {}


def warm_up() -> None:
    """Load and build, once, what every command would (the warm process does it before it
    forks its commands)."""
    import httpx

    from reconciler.cloud.api import verifying_context
    from reconciler.local import daemon  # noqa: F401

    # why a client: httpx imports its lazy parts (httpcore, h11, anyio: ~20 ms of a command's
    # first request) when a client is made, and `UkcApi` makes its own at its first request;
    # the CA bundle is the remote metros' (SSL_CERT_FILE/SSL_CERT_DIR, which a command may
    # set, build their own)
    httpx.Client(verify=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)).close()
    verifying_context(None, None)
    # the codec a connect to a host by name loads (socket encodes the name with it)
    "localhost".encode("idna")
