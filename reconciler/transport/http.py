"""The `http` transport: session commands through the image's `/exec` HTTP API (`exec: http`).

The opt-in alternative to SSH for images that serve `POST /exec {"cmd": "..."}` on 8080,
published on public port 443 with the `tls`+`http` handlers (docs/PLATFORM.md, "The sandbox image").
It is a composition: the `ssh` transport carries everything but the commands (the sync
helper's byte streams, the staged environment), and `HttpExec` runs the commands. The API is
unauthenticated and returns everything at the end, so output is not streamed: the callbacks
get the whole output once.

`HttpExec` connects like `transport.tls.Dialer` (same address mapping and CA): httpx requests
the mapped address with `sni_hostname` and `Host` set to the FQDN, so SNI routing and
certificate verification are against the FQDN, not against 127.0.0.1.

Secrets: the API can only carry a command line (the image's server runs `sh -lc CMD`), so env
values put into `cmd` would sit in the request to an unauthenticated server and on a command
line in the sandbox. `HttpTransport.run` therefore writes the environment over SSH into a
private file in the sandbox (`stage_env`), and `cmd` only names that file: it is sourced and
removed before the command starts (`unstage_env` removes it too if the request never ran).
Nothing on this side puts env values on any command line: the exports (or the staged file)
run in the server's own shell, and only COMMAND is on the command line of `timeout`.
Everything the server answers is untrusted: types are checked and sizes capped.
"""

from __future__ import annotations

import json
import math
import secrets
import shlex
import ssl
import time
from collections.abc import Callable, Mapping

import httpx

from reconciler._util.text import escape_controls
from reconciler.cloud.model import Service
from reconciler.cloud.trust import AddressMap, same_address
from reconciler.errors import MALFORMED_JSON, RemoteError, TransportError
from reconciler.transport import ssh
from reconciler.transport.base import (
    CommandResult,
    CreateFields,
    Credentials,
    RemoteProcess,
    RemoteShell,
    Target,
    TerminalProcess,
    Transport,
    TransportKind,
)
from reconciler.transport.commands import export_lines
from reconciler.transport.tls import Dialer

__all__ = [
    "KIND",
    "HttpExec",
    "HttpKind",
    "HttpTransport",
    "build_exec_cmd",
    "stage_env",
    "unstage_env",
]

_MAX_BODY = 32 * 1024 * 1024
_MAX_MESSAGE = 200
#: GNU timeout's exit status when it had to stop the command
_TIMEOUT_EXIT = 124
_KILL_AFTER_S = 5


def build_exec_cmd(
    command: str,
    env: Mapping[str, str],
    cwd: str,
    timeout_s: float | None,
    *,
    env_file: str | None = None,
    shell: str = "sh",
) -> str:
    """`cd CWD && export K='v' && ... && (COMMAND)`, COMMAND under `timeout` when one is given
    (and under `shell -c` when it is another shell than the server's `sh`).

    The exports run in the server's own shell (builtins: no process, no argv); only COMMAND
    goes on the command line of `timeout` and its `sh -c`. With `env_file` (see `stage_env`),
    that file is sourced and removed first; `env` should then be empty, so no value is part of
    the request either.
    """
    parts = []
    if env_file is not None:
        path = shlex.quote(env_file)
        parts.append(f"{{ . {path}; s=$?; rm -f {path}; [ $s -eq 0 ]; }}")
    parts.append(f"cd {shlex.quote(cwd)}")
    parts.extend(export_lines(env))
    sh = shlex.quote(shell)
    if timeout_s is None:
        parts.append(f"({command})" if shell == "sh" else f"{sh} -c {shlex.quote(command)}")
    else:
        # why: the HTTP API cannot cancel a command; GNU timeout kills its process group.
        seconds = max(1, math.ceil(timeout_s))
        inner = shlex.quote(f"({command})")
        parts.append(f"exec timeout -k {_KILL_AFTER_S} {seconds} {sh} -c {inner}")
    return " && ".join(parts)


def stage_env(shell: RemoteShell, env: Mapping[str, str], timeout_s: float = 30.0) -> str:
    """Write `env` as `export` lines to a new 0600 file in the sandbox's /tmp; its path.

    The values travel over the SSH channel's stdin, never on a command line.
    """
    script = ("\n".join(export_lines(env)) + "\n").encode()
    path = f"/tmp/ukc-env.{secrets.token_hex(8)}"
    # why noclobber: the file is created, never opened if something already has the name
    proc = shell.start(f"umask 077 && set -C && cat > {path}")
    try:
        proc.write(script)
        proc.close_stdin()
        code = proc.wait(timeout_s)
    except TimeoutError:
        raise RemoteError(
            f"staging the environment for exec: http took over {timeout_s:.0f}s"
        ) from None
    finally:
        proc.kill()
    if code != 0:
        raise RemoteError(
            f"could not stage the environment for exec: http in the sandbox (exit {code})",
            retryable=False,
        )
    return path


def unstage_env(shell: RemoteShell, path: str, timeout_s: float = 10.0) -> None:
    """Remove a staged environment file (the command removes it itself once it started)."""
    try:
        proc = shell.start(f"rm -f {shlex.quote(path)}")
        try:
            proc.close_stdin()
            proc.wait(timeout_s)
        finally:
            proc.kill()
    except Exception:  # best effort: the file is private to the sandbox
        return


def _tail(text: str, limit: int) -> str:
    data = text.encode(errors="replace")
    return data[-limit:].decode(errors="replace") if limit else ""


class HttpExec:
    """Client of the sandbox image's `/exec` API on public port 443."""

    def __init__(
        self,
        config: Dialer | ssl.SSLContext,
        extra: AddressMap | ssl.SSLContext | None = None,
        *,
        port: int = 443,
        transport: httpx.BaseTransport | None = None,
        max_body_bytes: int = _MAX_BODY,
        connect_timeout: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """`HttpExec(dialer)` (its CA and address map), `HttpExec(dialer, context)` (another
        context), or `HttpExec(context, address)`."""
        address: AddressMap | None
        if isinstance(config, Dialer):
            context = extra if isinstance(extra, ssl.SSLContext) else config.ssl_context
            address = config.address
        else:
            if isinstance(extra, ssl.SSLContext):
                raise TypeError("HttpExec(context, ...) takes an address map second")
            context, address = config, extra
        self.address: AddressMap = address or same_address
        self.port = port
        self._max_body = max_body_bytes
        self._connect_timeout = connect_timeout
        self._monotonic = monotonic
        # why: an instance reached at another address than its name is the local metro's, on
        # this machine's edge, which a proxy from the environment cannot reach (the ssh path
        # dials it directly too); a cloud instance's edge keeps the environment's proxies
        direct = self.address is not same_address
        self._client = httpx.Client(
            verify=context, transport=transport, follow_redirects=False, trust_env=not direct
        )

    @classmethod
    def from_dialer(cls, dialer: Dialer, *, port: int = 443) -> HttpExec:
        """Same CA and address mapping as the SSH path."""
        return cls(dialer, port=port)

    def _scrub(self, text: str, env: Mapping[str, str]) -> str:
        text = " ".join(text.split())[:_MAX_MESSAGE]
        for value in env.values():
            if len(value) >= 4:
                text = text.replace(value, "***")
        # why: the sandbox's text, bound for the terminal (the session's failure message)
        return escape_controls(text)

    def run(
        self,
        fqdn: str,
        command: str,
        env: Mapping[str, str],
        cwd: str = "/workspace",
        timeout_s: float | None = None,
        *,
        env_file: str | None = None,
        on_stdout: Callable[[bytes], None] | None = None,
        on_stderr: Callable[[bytes], None] | None = None,
        tail_bytes: int = 64 * 1024,
        shell: str = "sh",
    ) -> CommandResult:
        """Run `command`; a non-zero exit is a result, a broken API a `RemoteError`."""
        cmd = build_exec_cmd(command, env, cwd, timeout_s, env_file=env_file, shell=shell)
        host, port = self.address(fqdn, self.port)
        url = f"https://{host}:{port}/exec"
        # why: the server holds the request for the whole run; allow the kill grace on top.
        read = None if timeout_s is None else timeout_s + _KILL_AFTER_S + 10
        started = self._monotonic()
        where = f"exec api {fqdn}"
        try:
            with self._client.stream(
                "POST",
                url,
                content=json.dumps({"cmd": cmd}).encode(),
                headers={"host": fqdn, "content-type": "application/json"},
                extensions={"sni_hostname": fqdn},
                timeout=httpx.Timeout(read, connect=self._connect_timeout),
            ) as response:
                status = response.status_code
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if read is not None and self._monotonic() - started > 2 * read:
                        # why: each byte of a trickling answer resets the read timeout, so
                        # the sandbox could hold the command (and its billed instance)
                        # forever; twice the wait leaves a big answer room on a slow link
                        raise httpx.ReadTimeout(f"answer not whole after {2 * read:.0f} s")
                    if len(body) > self._max_body:
                        raise RemoteError(
                            f"{where}: answer exceeds {self._max_body} bytes", retryable=False
                        )
        except httpx.TimeoutException as err:
            if timeout_s is not None and isinstance(err, httpx.ReadTimeout):
                return CommandResult(None, True, "", "", self._monotonic() - started)
            raise TransportError(f"{where}: timed out ({type(err).__name__})") from None
        except httpx.TransportError as err:
            if _is_cert_error(err):
                raise TransportError(
                    f"{where}: certificate rejected for {fqdn}", retryable=False
                ) from None
            raise TransportError(f"{where}: connection failed ({type(err).__name__})") from None
        duration = self._monotonic() - started
        try:
            decoded: object = json.loads(bytes(body))
        except MALFORMED_JSON:
            decoded = None
        if status != 200:
            message = ""
            if isinstance(decoded, Mapping) and isinstance(decoded.get("error"), str):
                message = self._scrub(decoded["error"], env)
            detail = f"http {status}" + (f": {message}" if message else "")
            if status == 504:
                # why not retried: the platform's HTTP gateway cuts a request whose answer
                # takes longer than 60 s while the command goes on running in the sandbox
                raise RemoteError(
                    f"{where}: {detail}: the platform's HTTP gateway cut the request (it "
                    "waits 60 s for an answer); the command may still be running in the "
                    "sandbox; use exec: ssh for commands that run longer",
                    retryable=False,
                )
            if status in (502, 503):
                raise TransportError(f"{where}: {detail}")
            raise RemoteError(f"{where}: {detail}", retryable=False)
        if not isinstance(decoded, Mapping):
            raise RemoteError(f"{where}: 200 answer is not a json object", retryable=False)
        stdout, stderr, code = decoded.get("stdout"), decoded.get("stderr"), decoded.get("code")
        if not isinstance(stdout, str) or not isinstance(stderr, str):
            raise RemoteError(f"{where}: 200 answer lacks string stdout/stderr", retryable=False)
        if not isinstance(code, int) or isinstance(code, bool) or not -1 <= code <= 255:
            raise RemoteError(f"{where}: 200 answer has no exit code in -1..255", retryable=False)
        # why "replace": a JSON string may hold lone surrogates, which UTF-8 cannot encode
        if on_stdout is not None and stdout:
            on_stdout(stdout.encode("utf-8", "replace"))
        if on_stderr is not None and stderr:
            on_stderr(stderr.encode("utf-8", "replace"))
        timed_out = timeout_s is not None and code == _TIMEOUT_EXIT
        return CommandResult(
            exit_code=None if timed_out else code,
            timed_out=timed_out,
            stdout_tail=_tail(stdout, tail_bytes),
            stderr_tail=_tail(stderr, tail_bytes),
            duration_s=duration,
        )

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> HttpExec:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_cert_error(err: BaseException) -> bool:
    seen: BaseException | None = err
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class HttpTransport:
    """`ssh` for processes and the staged environment, the exec API for commands."""

    kind = "http"

    def __init__(self, inner: Transport, client: HttpExec, fqdn: str) -> None:
        self._inner = inner
        self._client = client
        self._fqdn = fqdn

    @property
    def pin(self) -> str | None:
        return self._inner.pin

    @property
    def active(self) -> bool:
        return self._inner.active

    def start(self, command: str) -> RemoteProcess:
        return self._inner.start(command)

    def start_terminal(
        self, command: str, *, term: str, size: tuple[int, int] | None
    ) -> TerminalProcess:
        return self._inner.start_terminal(command, term=term, size=size)

    def run(
        self,
        command: str,
        *,
        env: Mapping[str, str],
        cwd: str,
        timeout_s: float | None,
        on_stdout: Callable[[bytes], None],
        on_stderr: Callable[[bytes], None],
        stop: Callable[[], bool] | None = None,
        shell: str = "sh",
    ) -> CommandResult:
        """The environment goes over SSH into a private file the command sources, so no value
        (secrets included) is in the unauthenticated request or any argv. The exec API holds
        the request for the whole run and offers no way to stop it: `stop` is not polled (the
        command runs to its end or its timeout; Ctrl-C stops the apply after it)."""
        env_file = stage_env(self._inner, env) if env else None
        try:
            return self._client.run(
                self._fqdn,
                command,
                env={},
                env_file=env_file,
                cwd=cwd,
                timeout_s=timeout_s,
                on_stdout=on_stdout,
                on_stderr=on_stderr,
                shell=shell,
            )
        finally:
            if env_file is not None:
                unstage_env(self._inner, env_file)

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            self._client.close()


class HttpKind:
    """Sets up the `http` transport: the `ssh` transport's instance with the exec API's
    public port 443 added."""

    name = "http"
    credentials_noun = ssh.KIND.credentials_noun
    exec_api = Service(443, 8080, ("tls", "http"))

    def warnings(self, session: str) -> tuple[str, ...]:
        return (
            f"session {session}: exec: http runs commands through the image's unauthenticated "
            "exec API on public port 443: on Unikraft Cloud anyone who knows the instance's "
            "FQDN can run commands in it and read its files and env; use exec: ssh for "
            "anything private",
        )

    def credentials_present(self, credentials: Credentials) -> bool:
        return ssh.KIND.credentials_present(credentials)

    def create_fields(self, credentials: Credentials) -> CreateFields:
        fields = ssh.KIND.create_fields(credentials)
        return CreateFields(env=fields.env, services=(*fields.services, self.exec_api))

    def connect(
        self, target: Target, credentials: Credentials, *, pin: str | None, deadline_s: float
    ) -> Transport:
        inner = ssh.KIND.connect(target, credentials, pin=pin, deadline_s=deadline_s)
        return HttpTransport(inner, HttpExec(Dialer.to(target.reach)), target.public_name())

    def reopen(self, target: Target, credentials: Credentials, *, pin: str) -> Transport:
        inner = ssh.KIND.reopen(target, credentials, pin=pin)
        return HttpTransport(inner, HttpExec(Dialer.to(target.reach)), target.public_name())


KIND: TransportKind = HttpKind()
