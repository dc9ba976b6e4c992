"""`SshShell`: a `RemoteShell` over paramiko, reached through the sandbox's TLS edge on 2222.

The controller (and the sync engine) get a shell from `wait_ssh_ready` once an instance is
running: it dials `Dialer.open_stream(fqdn, 2222)` and retries the failures a waking or
booting sandbox produces (refused, reset, EOF, TLS handshake errors) until a deadline.
`start(command)` opens one exec channel per process with large windows for throughput.

Host keys: every session's sandbox is new, so there is nothing to pin in advance; the key is
accepted on first use and its fingerprint kept on `shell.host_key_fingerprint` (the caller may
store it and pass it back as `expected_host_key` to make a later mismatch an error).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paramiko

from reconciler._util.retry import RetryPolicy, call_with_retries
from reconciler.errors import (
    KeyRejectedError,
    RemoteError,
    SandboxNotReadyError,
    TransportError,
)
from reconciler.transport.tls import Dialer, TlsStream

__all__ = [
    "AUTH_GRACE_S",
    "START_TIMEOUT_S",
    "SshProcess",
    "SshShell",
    "host_key_fingerprint",
    "wait_ssh_ready",
]

log = logging.getLogger(__name__)

#: channel window and packet sizes: paramiko's defaults (2 MiB / 32 KiB) cap bulk throughput
_WINDOW = 16 * 1024 * 1024
_MAX_PACKET = 256 * 1024 - 1024
# why: OpenSSH sshd caps packets at 256 KiB; we ask for a little less to leave room for headers
#: waits between connection attempts while a sandbox boots or wakes: 0.1 s doubling to 2 s,
#: each between half and all of that
READY_POLICY = RetryPolicy(max_attempts=None, base_s=0.1, cap_s=2.0, jitter=0.5)
#: a key rejected while the sandbox may still be installing it is tried again on the same
#: connection, this often (from one try's start to the next's) and this many times, before
#: the connection is given up. why: a retry there costs sshd one read of its authorized keys,
#: where a new connection costs a process, a TLS and an SSH handshake; and fewer rejections
#: than OpenSSH's MaxAuthTries (6) never get the connection cut (nor counted against the
#: source as a failed login)
KEY_RETRY_STEP_S = 0.1
KEY_RETRIES = 4
#: how long opening a channel and starting a process in it may take. why: paramiko waits for
#: the answer to an exec request without any limit, and a sandbox owns the server it answers
#: from (it can stop its sshd and serve port 2222 itself): a silent one would hang us there
START_TIMEOUT_S = 60.0
#: how long a rejected key is taken for a sandbox still booting. why: on UKC `running` means
#: the app reached its entry point; the image's sshd may install the key from `PUBKEY` a
#: moment later, so a first refusal is not yet a verdict on the key
AUTH_GRACE_S = 20.0


def host_key_fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH-style fingerprint: "SHA256:" + unpadded base64 of the key blob's sha256."""
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


#: AES-GCM does encryption and integrity in one pass: measured 106–138 vs 93–129 MiB/s on
#: push and 195–218 vs 137–152 MiB/s on pull against aes128-ctr + HMAC through the edge
_PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")


def _prefer_aead(transport: paramiko.Transport) -> None:
    """Offer the AEAD ciphers first; the server still picks among what both support."""
    options = transport.get_security_options()
    offered = tuple(options.ciphers)
    first = tuple(c for c in _PREFERRED_CIPHERS if c in offered)
    options.ciphers = first + tuple(c for c in offered if c not in first)


class SshProcess:
    """One exec channel: the `RemoteProcess` of `SshShell.start`."""

    def __init__(self, channel: paramiko.Channel, shell: SshShell, *, pty: bool = False) -> None:
        self._channel = channel
        self._shell = shell
        self._pty = pty
        self.bytes_in = 0
        self.bytes_out = 0

    def write(self, data: bytes) -> None:
        try:
            self._send(data)
        except (OSError, paramiko.SSHException) as err:
            raise RemoteError(f"ssh {self._shell.fqdn}: stdin write failed ({err})") from None
        self.bytes_out += len(data)
        self._shell.bytes_out += len(data)

    def _send(self, data: bytes) -> None:
        """All of `data` into the channel. Over a `TlsStream`, as much as the channel's window
        takes now goes out gathered (one TLS write and one socket send per few packets); a
        shut window is waited for outside a gather (the held bytes may be what the peer needs
        before it opens it again)."""
        channel = self._channel
        sock = self._shell._sock
        if not isinstance(sock, TlsStream):
            channel.sendall(data)
            return
        # a view: paramiko's sendall re-slices what is left after every 32 KiB packet, and it
        # takes any buffer (its `asbytes` passes one through to the message's BytesIO)
        view: Any = memoryview(data)
        while view:
            # only this thread takes from the window (one writer per process); others add
            room = min(channel.out_window_size, len(view))
            if room <= 0:
                sent = channel.send(view)  # waits for the window, then one packet
                if sent <= 0:
                    raise OSError("channel closed")
                view = view[sent:]
                continue
            with sock.gathered():
                channel.sendall(view[:room])
            view = view[room:]

    def close_stdin(self) -> None:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._channel.shutdown_write()

    def read(self, n: int = 65536) -> bytes:
        data = self._channel.recv(n)
        self.bytes_in += len(data)
        self._shell.bytes_in += len(data)
        return data

    def read_stderr(self, n: int = 65536) -> bytes:
        data = self._channel.recv_stderr(n)
        self.bytes_in += len(data)
        self._shell.bytes_in += len(data)
        return data

    def wait(self, timeout: float | None = None) -> int:
        if not self._channel.status_event.wait(timeout):
            raise TimeoutError(f"ssh {self._shell.fqdn}: process still running after {timeout} s")
        return self._channel.recv_exit_status()

    def kill(self) -> None:
        _close_quietly(self._channel)

    def resize(self, cols: int, rows: int) -> None:
        if self._pty:
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                self._channel.resize_pty(width=cols, height=rows)


def _close_quietly(channel: paramiko.Channel) -> None:
    # why: a close sends a message; on a connection that just died that write raises, and
    # the channel is as closed as it will get
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        channel.close()


class SshShell:
    """An authenticated SSH connection to one sandbox (a `RemoteShell`)."""

    #: seconds `start` may take before it gives up (`START_TIMEOUT_S`)
    start_timeout_s: float = START_TIMEOUT_S

    def __init__(
        self,
        transport: paramiko.Transport,
        sock: socket.socket | TlsStream,
        *,
        fqdn: str,
        host_key_fingerprint: str,
    ) -> None:
        self._transport = transport
        self._sock = sock
        self.fqdn = fqdn
        self.host_key_fingerprint = host_key_fingerprint
        self.bytes_in = 0
        self.bytes_out = 0
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SshShell(fqdn={self.fqdn!r}, host_key={self.host_key_fingerprint!r})"

    @classmethod
    def connect(
        cls,
        dialer: Dialer,
        fqdn: str,
        *,
        key_path: Path,
        user: str = "root",
        port: int = 2222,
        timeout: float = 10,
        keepalive_s: int = 15,
        expected_host_key: str | None = None,
        key_retries: int = 0,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> SshShell:
        """Dial, negotiate, check the host key, authenticate with `key_path`; a rejected key
        is tried `key_retries` more times on this connection (`KEY_RETRY_STEP_S` apart)."""
        try:
            pkey = paramiko.PKey.from_path(key_path)
        except (OSError, paramiko.SSHException, ValueError) as err:
            # why: never echo the key material; the path and the class are enough
            raise RemoteError(
                f"ssh key {key_path} unreadable ({type(err).__name__})", retryable=False
            ) from None
        sock = dialer.open_stream(fqdn, port, timeout)
        transport = paramiko.Transport(
            sock,  # type: ignore[arg-type]  # paramiko takes any socket-like object
            default_window_size=_WINDOW,
            default_max_packet_size=_MAX_PACKET,
        )
        _prefer_aead(transport)
        transport.banner_timeout = timeout
        transport.handshake_timeout = timeout
        transport.auth_timeout = timeout
        try:
            try:
                transport.start_client(timeout=timeout)
            except (paramiko.SSHException, EOFError, OSError) as err:
                raise TransportError(
                    f"ssh {fqdn}:{port}: handshake failed ({type(err).__name__}: {err})"
                ) from None
            try:
                server_key = transport.get_remote_server_key()
            except paramiko.SSHException as err:
                # why: a server that hangs up right after the key exchange (an sshd still
                # starting, one over its start-up limit) leaves no session to ask
                raise TransportError(
                    f"ssh {fqdn}:{port}: closed after the handshake ({err})"
                ) from None
            fingerprint = host_key_fingerprint(server_key)
            if expected_host_key is not None and fingerprint != expected_host_key:
                raise RemoteError(
                    f"ssh {fqdn}: host key {fingerprint} differs from the expected "
                    f"{expected_host_key}",
                    retryable=False,
                )
            if not _accepted_on_a_grid(
                lambda: _authenticated(transport, user, pkey, fqdn, port),
                key_retries + 1,
                sleep=sleep,
                monotonic=monotonic,
            ):
                raise KeyRejectedError(
                    f"ssh {fqdn}: public key of {key_path.name} rejected for user {user}",
                    retryable=False,
                )
        except BaseException:
            transport.close()
            sock.close()
            raise
        transport.set_keepalive(keepalive_s)
        return cls(transport, sock, fqdn=fqdn, host_key_fingerprint=fingerprint)

    def start(self, command: str) -> SshProcess:
        """Run `command` (a shell command line) in a fresh exec channel."""
        return self._start(command, None)

    def start_terminal(
        self, command: str, *, term: str, size: tuple[int, int] | None
    ) -> SshProcess:
        """Run `command` for a user: on a pseudo-terminal of `size` (columns, rows), or on
        plain pipes when `size` is None."""
        return self._start(command, None if size is None else (term, *size))

    def _start(self, command: str, pty: tuple[str, int, int] | None) -> SshProcess:
        limit = self.start_timeout_s
        try:
            channel = self._transport.open_session(
                window_size=_WINDOW, max_packet_size=_MAX_PACKET, timeout=limit
            )
        except (paramiko.SSHException, EOFError, OSError) as err:
            raise TransportError(f"ssh {self.fqdn}: cannot start a process ({err})") from None
        # closing the channel is what ends paramiko's unbounded wait for the exec answer
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            _close_quietly(channel)

        timer = threading.Timer(limit, expire)
        timer.daemon = True
        timer.start()
        try:
            if pty is not None:
                term, cols, rows = pty
                channel.get_pty(term=term, width=cols, height=rows)
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as err:
            _close_quietly(channel)
            if expired.is_set():
                raise TransportError(
                    f"ssh {self.fqdn}: the sandbox did not start a process within {limit:g} s"
                ) from None
            raise TransportError(f"ssh {self.fqdn}: cannot start a process ({err})") from None
        finally:
            timer.cancel()
        return SshProcess(channel, self, pty=pty is not None)

    @property
    def active(self) -> bool:
        return self._transport.is_active()

    def close(self) -> None:
        with self._lock:
            self._transport.close()
            # why: wait for paramiko's reader thread, and `sock.close` for any other thread
            # inside a call on the socket, so none touches its fd number after we return.
            if self._transport is not threading.current_thread():
                self._transport.join(5.0)
            self._sock.close()

    def __enter__(self) -> SshShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _accepted_on_a_grid(
    attempt: Callable[[], bool],
    tries: int,
    *,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
) -> bool:
    """Call `attempt` (one key try) up to `tries` times, each `KEY_RETRY_STEP_S` after the
    previous one began, until it is accepted (True).

    why from the start of a try, not from its answer: sshd answers a rejection only after
    its failure delay (OpenSSH evens out the time of failed logins: ~5-10 ms, more over a
    distant link); waiting a whole step after each answer put every try that much later
    than the last, and the try that finds the key late by the sum.
    """
    first = monotonic()
    for k in range(tries):
        if k:
            sleep(max(0.0, first + k * KEY_RETRY_STEP_S - monotonic()))
        if attempt():
            return True
    return False


def _authenticated(
    transport: paramiko.Transport,
    user: str,
    pkey: paramiko.PKey,
    fqdn: str,
    port: int,
) -> bool:
    """One public-key authentication: True when accepted, False when the key was rejected;
    `TransportError` when the server hung up or never answered."""
    try:
        transport.auth_publickey(user, pkey)
    except paramiko.AuthenticationException as err:
        if not transport.is_active() or "timeout" in str(err).lower():
            # why: paramiko reports a server that hung up, or never answered, during
            # authentication as a failed one; that is a sandbox still starting, not a verdict
            # on the key
            raise TransportError(f"ssh {fqdn}:{port}: no answer to the authentication") from None
        return False
    except (paramiko.SSHException, EOFError, OSError) as err:
        raise TransportError(
            f"ssh {fqdn}:{port}: authentication interrupted ({type(err).__name__})"
        ) from None
    return True


def wait_ssh_ready(
    dialer: Dialer,
    fqdn: str,
    *,
    key_path: Path,
    deadline_s: float,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    user: str = "root",
    port: int = 2222,
    expected_host_key: str | None = None,
    connect_timeout: float = 10.0,
    rng: random.Random | None = None,
    auth_grace_s: float = AUTH_GRACE_S,
) -> SshShell:
    """Connect as soon as the sandbox accepts SSH; `SandboxNotReadyError` at the deadline.

    Refused, reset, EOF and TLS errors are expected while a sandbox boots or wakes from
    standby (the first connection is what wakes it), so they are retried with backoff. A
    rejected key is retried for `auth_grace_s` from the first attempt (sshd may be up before
    the image installed the key), then it is a `KeyRejectedError`; host-key errors never are.
    """
    start = monotonic()

    def attempt() -> SshShell:
        remaining = deadline_s - (monotonic() - start)
        # a rejection within the grace is retried on the connection (cheaper than a new one);
        # none past it, so a server that cuts the connection after fewer rejections than ours
        # still ends in a rejected key
        within = min(remaining, auth_grace_s - (monotonic() - start))
        try:
            return SshShell.connect(
                dialer,
                fqdn,
                key_path=key_path,
                user=user,
                port=port,
                timeout=max(0.5, min(connect_timeout, remaining)),
                expected_host_key=expected_host_key,
                key_retries=max(0, min(KEY_RETRIES, int(within / KEY_RETRY_STEP_S))),
                sleep=sleep,
                monotonic=monotonic,
            )
        except KeyRejectedError as err:
            waited = monotonic() - start
            if waited < auth_grace_s:
                raise KeyRejectedError(str(err), retryable=True) from None
            raise KeyRejectedError(
                f"{err}, still {waited:.0f} s after the first attempt", retryable=False
            ) from None

    def not_ready(last: Exception, attempts: int) -> Exception:
        if isinstance(last, KeyRejectedError):
            return KeyRejectedError(
                f"{last}, still after {deadline_s:g} s ({attempts} attempts)", retryable=False
            )
        return SandboxNotReadyError(
            f"sandbox {fqdn} did not accept ssh within {deadline_s:g} s "
            f"({attempts} attempts, last: {last})"
        )

    def waiting(err: Exception, attempts: int, delay: float) -> None:
        log.debug("ssh %s not ready (attempt %d): %s", fqdn, attempts, err)

    return call_with_retries(
        attempt,
        policy=READY_POLICY.until(deadline_s),
        sleep=sleep,
        monotonic=monotonic,
        rng=rng,
        give_up=not_ready,
        on_retry=waiting,
    )
