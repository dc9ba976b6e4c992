"""A stand-in for a sandbox behind the TLS edge: a throwaway CA, an asyncio TLS forwarder, sshd.

The forwarder stands in for the UKC / local-metro TLS edge: it terminates TLS with a
certificate for `*.sbx.test` issued by a test CA and forwards plain TCP to a target port.
sshd runs as the current user on 127.0.0.1 with its own host key and authorized_keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reconciler.transport.keys import generate_keypair
from reconciler.transport.tls import Dialer

FQDN = "box1.sbx.test"
BUF = 256 * 1024


@dataclass(frozen=True)
class CaFiles:
    ca_path: Path
    cert_path: Path
    key_path: Path

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(self.cert_path), str(self.key_path))
        return ctx


def make_ca(directory: Path) -> CaFiles:
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ukc test ca")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "*.sbx.test")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("*.sbx.test"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (
        directory / "ca.pem",
        directory / "tls.crt",
        directory / "tls.key",
    )
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return CaFiles(ca_path, cert_path, key_path)


@contextlib.contextmanager
def https_front(ca: CaFiles, handler: type[BaseHTTPRequestHandler]) -> Iterator[TlsForwarder]:
    """`handler` served on a free port behind a `TlsForwarder` signed by `ca` (a metro's or an
    exec server's front), until the block ends."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    fwd = TlsForwarder(ca, server.server_address[1]).start()
    try:
        yield fwd
    finally:
        fwd.stop()
        server.shutdown()
        server.server_close()


class TlsForwarder:
    """TLS on 127.0.0.1:port → plain TCP to 127.0.0.1:target, in a background event loop."""

    def __init__(self, ca: CaFiles, target_port: int, port: int = 0) -> None:
        self._ctx = ca.server_context()
        self.target_port = target_port
        self.port = port
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        # what stop() ends: a handler's pipes not yet started when the loop stopped were
        # garbage then ("coroutine never awaited"), its sockets unclosed
        self._handlers: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        #: set by stop(): a handler that begins from then on hangs up at once
        self._stopping = False

    def start(self) -> TlsForwarder:
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(10)
        return self

    async def _listen(self) -> asyncio.Server:
        server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self._ctx, reuse_address=True
        )
        self.port = server.sockets[0].getsockname()[1]
        return server

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._stopping:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._writers.add(writer)
        try:
            await self._forward(reader, writer)
        finally:
            self._handlers.discard(task)
            self._writers.discard(writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            await _closed(writer)
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(BUF):
                    dst.write(data)
                    await dst.drain()
                if dst.can_write_eof():
                    dst.write_eof()
            except (OSError, ssl.SSLError):
                pass

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self._writers.discard(up_writer)
            await _closed(writer)
            await _closed(up_writer)

    def stop(self) -> None:
        """Stop listening, cut every forwarded connection, let the handlers end, close the loop."""

        async def close() -> None:
            self._stopping = True
            if self._server is not None:
                self._server.close()
            for writer in list(self._writers):
                writer.transport.abort()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=5)
            if self._server is not None:
                await self._server.wait_closed()

        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._end_late_handlers()
            self._loop.close()

    def _end_late_handlers(self) -> None:
        """Run to their end, on the stopped loop, the handlers close() did not wait for.

        why: a connection whose TLS handshake ended after close() began gets a handler then
        (3.11's `wait_closed` waits for no connection); left pending when the loop closed, it
        was closed by the garbage collector mid-connect, in whatever test ran then (an
        unraisable "Event loop is closed")."""
        for _ in range(10):
            pending = asyncio.all_tasks(self._loop)
            if not pending:
                return
            # a handler that begins now hangs up at once (`_stopping`); one still forwarding
            # is cancelled after a while, and closes its sockets on its way out
            self._loop.run_until_complete(asyncio.wait(pending, timeout=5))
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


async def _closed(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.02)
    raise TimeoutError(f"port {port} not accepting after {deadline_s} s")


@dataclass(frozen=True)
class Sshd:
    port: int
    host_key_path: Path
    client_key: Path
    user: str


def current_user() -> str:
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def dialer_to(ca: CaFiles, port: int) -> Dialer:
    """A dialer that sends every FQDN to 127.0.0.1:port (like the local metro's edge)."""
    return Dialer(ca.client_context(), lambda fqdn, public_port: ("127.0.0.1", port))


@contextlib.contextmanager
def running_sshd(cfg: Path, extra_config: str = "") -> Iterator[Sshd]:
    """sshd on 127.0.0.1 with its own host key, accepting one fresh client key; files in `cfg`
    (`extra_config`: more sshd_config lines)."""
    host_key = cfg / "hostkey"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True)
    client_key = cfg / "clientkey"
    (cfg / "authorized_keys").write_text(generate_keypair(client_key, "test-client") + "\n")
    port = free_port()
    conf = cfg / "sshd.conf"
    conf.write_text(
        f"ListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {cfg}/authorized_keys\n"
        "PubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n"
        "MaxStartups 100\nMaxSessions 50\nLogLevel ERROR\nPrintLastLog no\n" + extra_config
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    with (
        open(cfg / "sshd.log", "wb") as log,
        subprocess.Popen(
            ["/usr/sbin/sshd", "-D", "-e", "-f", str(conf), "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=log,
        ) as proc,
    ):
        try:
            wait_port(port)
            yield Sshd(port, host_key, client_key, current_user())
        finally:
            proc.terminate()
            proc.wait(10)
