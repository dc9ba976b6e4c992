"""The local metro's TLS edge: one TLS listener per public port, routing by SNI.

Ports 2222 and 443 open at start, other public ports when a service group first declares them.
Each accepted connection is TLS-terminated with the metro CA's leaf; the SNI name and the
public port go to `resolve`, which answers a `Route` (instance uuid + destination port inside
the sandbox) and wakes a standby instance on the way. The edge then opens a byte stream into
the sandbox through the runtime's `open_connection` and pumps both ways, reporting connection
starts and ends to `on_activity` for scale-to-zero.

The edge serves only the metro's owner: before any byte is read, the uid owning the client's
socket (`peercred`) must be the daemon's own uid or root. Anyone else's connection is
closed unanswered (tls ports) or, on 443, answered with a short HTTP 403 once TLS is up; either
way nothing reaches a sandbox, and the daemon log says who was refused. (Not client
certificates: the kernel's answer needs nothing from the client, so the original workflow's
`openssl s_client`, `curl` and ssh ProxyCommand lines keep working unchanged for the owner.)

Clients: `openssl s_client -connect 127.0.0.1:P -servername FQDN -CAfile ca.pem` (ssh, rsync)
and `curl --cacert ca.pem --connect-to FQDN:443:127.0.0.1:P https://FQDN/exec`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pwd
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from reconciler._util.retry import RetryPolicy, apoll
from reconciler.errors import LocalMetroError
from reconciler.local.ca import CertificateAuthority
from reconciler.local.peercred import loopback_peer_uid

__all__ = ["Edge", "Route"]

log = logging.getLogger(__name__)

BUF = 256 * 1024
HANDSHAKE_TIMEOUT_S = 10.0
# why: a standby wake may take some 100 ms after resolve returned; beyond this the client is
# closed, which is what "the first connection during wake may be refused" means
WAKE_RETRY_S = 2.0
WAKE_RETRY_STEP_S = 0.025
NOT_FOUND_BODY = (
    b"<!DOCTYPE html>\n<html><head><title>404 Service not found</title></head>\n"
    b"<body><h1>Service not found</h1></body></html>\n"
)
# why: an attacker can open connections in a loop; one log line per user a minute is enough
REFUSAL_LOG_EVERY_S = 60.0


@dataclass(frozen=True)
class Route:
    """Where a TLS connection goes: which instance, which port inside its sandbox."""

    uuid: str
    destination_port: int


class _Runtime(Protocol):
    async def open_connection(
        self, uuid: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...


def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        writer.close()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, half_close: bool
) -> None:
    """Copy until EOF; then half-close (plain sockets) or close (TLS cannot half-close)."""
    try:
        while True:
            data = await reader.read(BUF)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
        half_close = False
    finally:
        if half_close and writer.can_write_eof():
            with contextlib.suppress(Exception):
                writer.write_eof()
        else:
            _close(writer)


GATEWAY_TIMEOUT_BODY = b"<html><body><h1>504 Gateway Time-out</h1></body></html>\n"


async def _gateway_pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, cutoff_s: float
) -> None:
    """The HTTP gateway's copy of the sandbox's answer: silent for `cutoff_s`, the request is
    cut (a 504 when nothing was answered yet), as UKC's gateway does; the sandbox side may
    still be working."""
    answered = False
    try:
        while True:
            try:
                data = await asyncio.wait_for(reader.read(BUF), cutoff_s)
            except TimeoutError:
                if not answered:
                    head = (
                        "HTTP/1.1 504 Gateway Time-out\r\nContent-Type: text/html\r\n"
                        f"Content-Length: {len(GATEWAY_TIMEOUT_BODY)}\r\n"
                        "Connection: close\r\n\r\n"
                    ).encode()
                    writer.write(head + GATEWAY_TIMEOUT_BODY)
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(writer.drain(), 2.0)
                break
            if not data:
                break
            answered = True
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError, asyncio.IncompleteReadError):
        pass
    finally:
        _close(writer)


def _who(uid: int | None) -> str:
    if uid is None:
        return "an unknown local user (its socket was not found)"
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


class Edge:
    """TLS listeners on `host`, one per public port, forwarding into sandboxes by SNI."""

    def __init__(
        self,
        *,
        ca: CertificateAuthority,
        runtime: _Runtime,
        resolve: Callable[[str, int], Awaitable[Route | None]],
        on_activity: Callable[[str, int], None],
        should_drop: Callable[[], bool],
        host: str = "127.0.0.1",
        owner_uid: int | None = None,
        peer_uid: Callable[[tuple[str, int], tuple[str, int]], int | None] = loopback_peer_uid,
        refusal_log_every_s: float = REFUSAL_LOG_EVERY_S,
        gateway_timeout: Callable[[], float] = lambda: 0.0,
    ) -> None:
        #: the only users served: the daemon's own uid (or `owner_uid`) and root
        self.owner_uid = os.getuid() if owner_uid is None else owner_uid
        self._peer_uid = peer_uid
        self._refusals: dict[int | None, tuple[float, int]] = {}
        self._refusal_log_every_s = refusal_log_every_s
        self._runtime = runtime
        self._resolve = resolve
        self._on_activity = on_activity
        self._should_drop = should_drop
        #: seconds the HTTP gateway (443) waits for the sandbox's next bytes; 0: forever
        self._gateway_timeout = gateway_timeout
        self._host = host
        self._sni: weakref.WeakKeyDictionary[ssl.SSLObject, str] = weakref.WeakKeyDictionary()
        self._ctx = ca.server_context()
        self._ctx.sni_callback = self._record_sni
        self._servers: dict[int, asyncio.Server] = {}
        self._ports: dict[int, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._closed = False

    def _record_sni(
        self, sslobj: ssl.SSLSocket | ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        if isinstance(sslobj, ssl.SSLObject) and name:
            self._sni[sslobj] = name.lower().rstrip(".")

    @property
    def ports(self) -> dict[int, int]:
        """Public port → local port of every open listener."""
        return dict(self._ports)

    async def open_port(self, public_port: int, host_port: int = 0) -> int:
        """Listen for `public_port` (on `host_port`, 0 = any free one); idempotent."""
        async with self._lock:
            if self._closed:
                raise LocalMetroError(f"edge is closed; cannot open public port {public_port}")
            if public_port in self._ports:
                return self._ports[public_port]

            async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                try:
                    await self._track(self._handle(public_port, r, w))
                except asyncio.CancelledError:
                    # why: close() cancels live connections; Python 3.11's stream server logs a
                    # traceback for a connection task that ends cancelled
                    w.transport.abort()

            try:
                server = await asyncio.start_server(handler, self._host, host_port, limit=BUF)
            except OSError as exc:
                raise LocalMetroError(
                    f"edge cannot listen for public port {public_port} on "
                    f"{self._host}:{host_port}: {exc.strerror}"
                ) from None
            local_port = int(server.sockets[0].getsockname()[1])
            self._servers[public_port] = server
            self._ports[public_port] = local_port
            return local_port

    async def _track(self, coro: Awaitable[None]) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await coro
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def _handle(
        self, public_port: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if self._should_drop():
            writer.transport.abort()
            return
        uid = self._client_uid(writer)
        if uid not in (0, self.owner_uid):
            self._log_refusal(uid, public_port)
            await self._refuse(public_port, uid, reader, writer)
            return
        try:
            await writer.start_tls(self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        sslobj = writer.get_extra_info("ssl_object")
        sni = self._sni.pop(sslobj, "") if isinstance(sslobj, ssl.SSLObject) else ""
        try:
            route = await self._resolve(sni, public_port)
        except Exception:
            log.exception("edge: resolve(%r, %d) failed", sni, public_port)
            route = None
        if route is None:
            if public_port == 443:
                await self._not_found(reader, writer)
            _close(writer)
            return
        upstream = await self._connect(route)
        if upstream is None:
            _close(writer)
            return
        up_reader, up_writer = upstream
        self._on_activity(route.uuid, +1)
        try:
            to_sandbox = asyncio.create_task(_pump(reader, up_writer, True))
            # why: the sandbox side ending (sshd exit, HTTP close) ends the whole connection
            cutoff = self._gateway_timeout() if public_port == 443 else 0.0
            if cutoff > 0:
                await _gateway_pump(up_reader, writer, cutoff)
            else:
                await _pump(up_reader, writer, False)
            to_sandbox.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await to_sandbox
        finally:
            _close(up_writer)
            _close(writer)
            self._on_activity(route.uuid, -1)

    def _client_uid(self, writer: asyncio.StreamWriter) -> int | None:
        peer = writer.get_extra_info("peername")
        ours = writer.get_extra_info("sockname")
        if not isinstance(peer, tuple) or not isinstance(ours, tuple):
            return None
        try:
            return self._peer_uid((str(peer[0]), int(peer[1])), (str(ours[0]), int(ours[1])))
        except (OSError, ValueError):
            return None

    def _log_refusal(self, uid: int | None, public_port: int) -> None:
        now = time.monotonic()
        every = self._refusal_log_every_s
        last, suppressed = self._refusals.get(uid, (now - every, 0))
        if now - last < every:
            self._refusals[uid] = (last, suppressed + 1)
            return
        self._refusals[uid] = (now, 0)
        more = f" ({suppressed} more refused since the last line)" if suppressed else ""
        log.warning(
            "edge: refused a connection to public port %d from %s: this local metro serves "
            "only its owner (%s) and root%s",
            public_port,
            _who(uid),
            _who(self.owner_uid),
            more,
        )

    async def _refuse(
        self,
        public_port: int,
        uid: int | None,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        """Close a connection from a user the metro does not serve; 443 gets an HTTP 403."""
        if public_port != 443:
            writer.transport.abort()
            return
        try:
            await writer.start_tls(self._ctx, ssl_handshake_timeout=HANDSHAKE_TIMEOUT_S)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError):
            writer.transport.abort()
            return
        sslobj = writer.get_extra_info("ssl_object")
        if isinstance(sslobj, ssl.SSLObject):
            self._sni.pop(sslobj, None)
        # why: plain uids here, no user-database lookup on a path anyone can trigger at will
        came_from = "an unknown local user" if uid is None else f"uid {uid}"
        body = (
            f"403 Forbidden: this local ukc metro serves only its owner (uid {self.owner_uid}) "
            f"and root; this connection came from {came_from}\n"
        ).encode()
        await self._answer(reader, writer, "403 Forbidden", "text/plain", body)
        _close(writer)

    async def _connect(
        self, route: Route
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        async def attempt() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
            try:
                return await self._runtime.open_connection(route.uuid, route.destination_port)
            except OSError:
                return None

        polling = RetryPolicy.every(WAKE_RETRY_STEP_S, deadline_s=WAKE_RETRY_S)
        return await apoll(lambda _: attempt(), policy=polling)

    async def _not_found(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer an HTTP 404 "Service not found" page, as the metro's HTTP front does."""
        await self._answer(reader, writer, "404 Not Found", "text/html", NOT_FOUND_BODY)

    @staticmethod
    async def _answer(
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        status: str,
        content_type: str,
        body: bytes,
    ) -> None:
        with contextlib.suppress(Exception):
            # why: read the request head first so closing does not reset the client mid-send
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        with contextlib.suppress(Exception):
            writer.write(head + body)
            await asyncio.wait_for(writer.drain(), 2.0)

    async def close(self) -> None:
        """Stop listening and cut every connection."""
        async with self._lock:
            self._closed = True
            servers = list(self._servers.values())
            self._servers.clear()
            self._ports.clear()
        for server in servers:
            server.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 2.0)
