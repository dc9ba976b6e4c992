"""The `plugin` transport: commands and sync through the platform's sandbox plugin API.

The instance is created with the `sandbox` plugin and no service group: it publishes no port,
so nothing of it is on the edge and there is no key to keep. Every request goes to the
metro's API, `/v1/instances/{uuid}/plugins/sandbox/...`, with the metro's bearer token, which
only `CloudApi` holds (never a command line, a log line, the status file or an error text).

A process (`RemoteShell.start`) is one plugin command: stdin goes in base64 pieces, stdout and
stderr are read from the command's logs by byte range, waits go in slices under the proxy's
60 s cut (docs/PLATFORM.md, "The sandbox plugin API"). Session commands run over those
processes exactly as over SSH (`commands.ShellTransport`): the environment goes over stdin,
never in the request's `env`, which the plugin hands back to anyone who reads the command.

The pin is the instance uuid: the API routes by it, and the sandbox has nothing else of its
own to show. Everything the plugin answers is the sandbox's: a command id is checked before it
becomes part of a path, every answer is read up to a bound, JSON types are checked, and its
texts are cut to printable characters.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Mapping

from reconciler._util.text import one_line
from reconciler.cloud.model import CloudApi, Plugin, PluginReply
from reconciler.errors import (
    MALFORMED_JSON,
    AuthError,
    RemoteError,
    SandboxNotReadyError,
    TransportError,
    UsageError,
)
from reconciler.transport.base import (
    CreateFields,
    Credentials,
    RemoteProcess,
    Target,
    TerminalProcess,
    Transport,
    TransportKind,
)
from reconciler.transport.commands import ShellTransport

__all__ = ["KIND", "PluginKind", "PluginProcess", "PluginShell"]

PLUGIN_NAME = "sandbox"
PLUGIN_IMAGE = "plugins/sandbox:latest"
#: a command id as the plugin makes them (a uuid); anything else never reaches a path
_COMMAND_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,15})-([0-9]{1,15})/([0-9]{1,15})")
#: the largest JSON answer read (a command's description, an error)
_MAX_JSON = 64 * 1024
#: stdout/stderr bytes asked for per log request
_LOG_CHUNK = 1024 * 1024
#: stdin bytes per request: base64 of it stays well under the plugin's 2 MiB body
_STDIN_CHUNK = 1024 * 1024
#: stdin bytes a writer may be ahead of what was sent
_STDIN_BUFFER = 4 * _STDIN_CHUNK
#: a wait slice, under the proxy's 60 s cut
_WAIT_SLICE_S = 30.0
_REQUEST_S = 30.0
_KILL_S = 5.0
#: a stdin write waits while the process does not read (the proxy cuts it at 60 s)
_STDIN_S = 65.0
#: empty log polls back off from the first to the last delay
_POLL_FIRST_S = 0.001
_POLL_MAX_S = 0.05
_POLLS_BEFORE_EXIT_CHECK = 3
#: failed polls in a row (the proxy answering 502/503/504) before the process counts as lost
_MAX_FAILURES = 3
_READY_FIRST_S = 0.05
_READY_MAX_S = 1.0
_MAX_MESSAGE = 200
#: the answers of a sandbox still booting (the route is not there yet, nothing to forward to)
_NOT_READY = (404, 502, 503, 504)


def _text(raw: object) -> str:
    """Sandbox-sent text for a message: printable, one line, bounded."""
    if not isinstance(raw, str):
        return ""
    return one_line(raw, _MAX_MESSAGE)


def _envelope(reply: PluginReply) -> Mapping[str, object]:
    try:
        decoded: object = json.loads(reply.body) if reply.body.strip() else {}
    except MALFORMED_JSON:
        decoded = {}
    return decoded if isinstance(decoded, Mapping) else {}


def _failure(what: str, reply: PluginReply) -> RemoteError:
    message = _text(_envelope(reply).get("message"))
    detail = f"http {reply.status}" + (f" ({message})" if message else "")
    return RemoteError(f"{what}: {detail}", retryable=reply.status in _NOT_READY)


class _Route:
    """Requests to one instance's sandbox plugin, through its metro's API."""

    def __init__(self, api: CloudApi, uuid: str, instance: str) -> None:
        self.api = api
        self.uuid = uuid
        self.instance = instance
        #: False once a request failed to get any answer
        self.active = True
        #: requests that let the plugin forget an ended process, still under way
        self._cleanups: list[threading.Thread] = []
        self._lock = threading.Lock()

    def in_background(self, work: Callable[[], None]) -> None:
        """Run `work` (clean-up requests) without making the caller wait for it."""
        thread = threading.Thread(target=work, name="ukc-plugin-cleanup", daemon=True)
        with self._lock:
            self._cleanups = [t for t in self._cleanups if t.is_alive()]
            self._cleanups.append(thread)
        thread.start()

    def settle(self) -> None:
        """Wait (bounded) for the clean-ups under way."""
        with self._lock:
            cleanups, self._cleanups = self._cleanups, []
        for thread in cleanups:
            thread.join(_KILL_S)

    def request(
        self,
        method: str,
        path: str,
        body: object = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = _REQUEST_S,
        max_bytes: int = _MAX_JSON,
    ) -> PluginReply:
        try:
            return self.api.plugin_request(
                self.uuid,
                PLUGIN_NAME,
                method,
                path,
                body=body,
                headers=headers,
                timeout_s=timeout_s,
                max_bytes=max_bytes,
            )
        except TransportError:
            self.active = False
            raise

    def data(self, what: str, method: str, path: str, body: object = None) -> object:
        """The `data` of a 2xx JSON answer; a `RemoteError` for any other."""
        reply = self.request(method, path, body)
        if not 200 <= reply.status < 300:
            raise _failure(f"plugin {self.instance}: {what}", reply)
        return _envelope(reply).get("data")


class _StdinSender:
    """Sends what is written to a process's stdin from a thread of its own, joining what
    accumulates while a request is under way into the next one (up to `_STDIN_CHUNK`): a
    writer goes on while its bytes travel, and many small writes cost few requests. A writer
    waits while `_STDIN_BUFFER` bytes are still to go (the process is not reading); a failed
    request is raised to the next `write` or `close`."""

    def __init__(self, send: Callable[[bytes, bool], None], where: str) -> None:
        self._send = send
        self._where = where
        self._cond = threading.Condition()
        self._buf = bytearray()
        self._eof = False
        self._eof_sent = False
        self._stopped = False
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._stopped or self._eof:
            raise BrokenPipeError(f"{self._where}: its input is closed")

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ukc-plugin-stdin", daemon=True)
            self._thread.start()

    def write(self, data: bytes) -> None:
        with self._cond:
            self._check()
            while len(self._buf) >= _STDIN_BUFFER:
                self._cond.wait()
                self._check()
            self._buf += data
            self._ensure_thread()
            self._cond.notify_all()

    def close(self) -> None:
        """Send the end of input once everything before it went; wait until it did."""
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._eof or self._stopped:
                return
            self._eof = True
            self._ensure_thread()
            self._cond.notify_all()
            while not self._eof_sent and self._error is None and not self._stopped:
                self._cond.wait()
            if self._error is not None:
                raise self._error

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._buf and not self._eof and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                chunk = bytes(self._buf[:_STDIN_CHUNK])
                del self._buf[:_STDIN_CHUNK]
                eof = self._eof and not self._buf
                self._cond.notify_all()
            try:
                self._send(chunk, eof)
            except BaseException as err:  # why: the writer raises it; this thread just ends
                with self._cond:
                    self._error = err
                    self._cond.notify_all()
                return
            with self._cond:
                self._eof_sent = eof
                self._cond.notify_all()
                if eof:
                    return


class PluginProcess:
    """A process in the sandbox: one plugin command with its stdin and its logs."""

    def __init__(self, route: _Route, command_id: str) -> None:
        self._route = route
        self._id = command_id
        self._where = f"plugin {route.instance}: command {command_id[:8]}"
        self._offsets = {"stdout": 0, "stderr": 0}
        self._buffers = {"stdout": bytearray(), "stderr": bytearray()}
        self._locks = {"stdout": threading.Lock(), "stderr": threading.Lock()}
        self._exit: int | None = None
        self._killed = threading.Event()
        #: set once it exited or was killed: a reader waiting for output polls at once
        self._ended = threading.Event()
        self._kill_lock = threading.Lock()
        self._sender = _StdinSender(self._stdin, self._where)

    def __repr__(self) -> str:
        return f"PluginProcess({self._where!r})"

    def resize(self, cols: int, rows: int) -> None:
        pass  # plain pipes: no window to size

    # -- stdin

    def write(self, data: bytes) -> None:
        self._sender.write(data)

    def close_stdin(self) -> None:
        self._sender.close()

    def _stdin(self, data: bytes, eof: bool) -> None:
        if self._killed.is_set():
            raise BrokenPipeError(f"{self._where}: stopped")
        # why by hand: base64 needs no JSON escaping, and encoding a MiB of it as a JSON
        # string costs three times the base64 itself
        body = b'{"data":"%s","eof":%s}' % (base64.b64encode(data), b"true" if eof else b"false")
        reply = self._route.request("POST", f"commands/{self._id}/stdin", body, timeout_s=_STDIN_S)
        if reply.status == 410 or (reply.status == 400 and self._finished()):
            # its input is closed: the process has ended (or is ending)
            raise BrokenPipeError(f"{self._where}: its input is closed")
        if not 200 <= reply.status < 300:
            raise _failure(f"{self._where}: stdin", reply)

    # -- stdout, stderr

    def read(self, n: int = 65536) -> bytes:
        return self._read("stdout", n)

    def read_stderr(self, n: int = 65536) -> bytes:
        return self._read("stderr", n)

    def _read(self, stream: str, n: int) -> bytes:
        with self._locks[stream]:
            buf = self._buffers[stream]
            if not buf:
                buf += self._fetch(stream)
            out = bytes(buf[:n])
            del buf[:n]
            return out

    def _fetch(self, stream: str) -> bytes:
        """The next bytes of `stream` (b"" at its end), polling while the process runs."""
        delay = _POLL_FIRST_S
        failures = 0
        empty = 0
        while not self._killed.is_set():
            # why check first: output comes before the exit is known, so a poll after seeing
            # the exit that finds nothing new has seen everything
            finished = self._exit is not None
            offset = self._offsets[stream]
            reply = self._route.request(
                "GET",
                f"commands/{self._id}/logs/raw/{stream}",
                headers={"range": f"bytes={offset}-{offset + _LOG_CHUNK - 1}"},
                max_bytes=_LOG_CHUNK,
            )
            if reply.status == 206:
                data = self._ranged(reply, offset)
                if data:
                    self._offsets[stream] = offset + len(data)
                    return data
            elif reply.status in (404, 410):
                return b""  # the command or its logs are gone
            elif reply.status != 416:
                failures += 1
                if failures >= _MAX_FAILURES or reply.status not in _NOT_READY:
                    raise _failure(f"{self._where}: {stream}", reply)
            else:
                failures = 0
                if finished:
                    return b""
                empty += 1
                # why not at once: while a process runs, most empty polls precede its output
                if empty >= _POLLS_BEFORE_EXIT_CHECK and self._finished():
                    continue
            self._ended.wait(delay)
            delay = min(delay * 2, _POLL_MAX_S)
        return b""

    def _ranged(self, reply: PluginReply, offset: int) -> bytes:
        """The bytes of a 206 answer, checked against the range asked for."""
        match = _CONTENT_RANGE.fullmatch((reply.content_range or "").strip())
        if (
            match is None
            or int(match.group(1)) != offset
            or int(match.group(2)) - offset + 1 != len(reply.body)
        ):
            raise RemoteError(f"{self._where}: logs answered another range than asked")
        return reply.body

    # -- exit

    def _finished(self) -> bool:
        return self._exit_code() is not None

    def _exit_code(self) -> int | None:
        """The exit status once the process has exited (asks the plugin unless known)."""
        if self._exit is None:
            data = self._route.data(self._where, "GET", f"commands/{self._id}")
            code = data.get("exitcode") if isinstance(data, Mapping) else None
            if isinstance(code, int) and not isinstance(code, bool):
                # a signal's death comes as minus its number: report it as a shell does
                self._exit = code if code >= 0 else 128 + min(-code, 127)
                self._ended.set()
        return self._exit

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        failures = 0
        while (code := self._exit) is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                if (code := self._exit_code()) is not None:
                    break
                raise TimeoutError(f"{self._where}: still running after {timeout} s")
            step = _WAIT_SLICE_S if remaining is None else min(remaining, _WAIT_SLICE_S)
            reply = self._route.request(
                "POST",
                f"commands/{self._id}/wait_timeout",
                {"timeout_s": round(step, 3)},
                timeout_s=step + 10.0,
            )
            if 200 <= reply.status < 300:
                if not self._finished():
                    raise RemoteError(f"{self._where}: waited, yet it reports no exit code")
            elif reply.status == 408:
                failures = 0
            elif reply.status == 404 and self._killed.is_set():
                raise RemoteError(f"{self._where}: stopped")
            else:
                failures += 1
                if failures >= _MAX_FAILURES or reply.status not in _NOT_READY:
                    raise _failure(f"{self._where}: wait", reply)
        return code

    def kill(self) -> None:
        """Stop its process group if it runs, and let the plugin forget it (its logs live in
        the sandbox's memory until then)."""
        with self._kill_lock:
            if self._killed.is_set():
                return
            self._killed.set()
            self._ended.set()
        self._sender.stop()
        if not self._route.active:
            return  # no connection: the sandbox's command ends with its stdin
        if self._exit is not None:
            # why in the background: an ended command's record costs the sandbox memory, not
            # the caller time (the next command need not wait for it)
            self._route.in_background(self._forget)
            return
        self._forget()

    def _forget(self) -> None:
        path = f"commands/{self._id}"
        try:
            if self._exit is None:
                self._route.request("POST", f"{path}/signal", {"signal": "KILL"}, timeout_s=_KILL_S)
                # closes its pipes: a stray holder of them no longer keeps it alive
                self._route.request("DELETE", f"{path}/logs", timeout_s=_KILL_S)
                self._route.request(
                    "POST", f"{path}/wait_timeout", {"timeout_s": 2.0}, timeout_s=_KILL_S + 2
                )
            self._route.request("DELETE", path, timeout_s=_KILL_S)
        except (TransportError, AuthError):
            pass

    def forget_if_done(self) -> bool:
        """Let the plugin forget it if it has exited and no one is reading it; True if so."""
        if self._exit is None or self._killed.is_set():
            return self._killed.is_set()
        locks = [lock for lock in self._locks.values() if lock.acquire(blocking=False)]
        try:
            if len(locks) < len(self._locks):
                return False
            self.kill()
            return True
        finally:
            for lock in locks:
                lock.release()


class PluginShell:
    """A `RemoteShell` over the sandbox plugin of one instance."""

    def __init__(self, route: _Route) -> None:
        self._route = route
        self._lock = threading.Lock()
        #: processes the plugin still keeps (with their logs, in the sandbox's memory)
        self._procs: list[PluginProcess] = []

    def __repr__(self) -> str:
        return f"PluginShell({self._route.instance!r})"

    @property
    def active(self) -> bool:
        return self._route.active

    def probe(self) -> None:
        """One readiness probe (`GET /commands`); a `RemoteError` while the plugin is not up."""
        data = self._route.data("ready", "GET", "commands")
        if not isinstance(data, Mapping) or not isinstance(data.get("commands"), list):
            raise RemoteError(f"plugin {self._route.instance}: ready: not a command list")

    def start(self, command: str) -> RemoteProcess:
        with self._lock:
            self._procs = [p for p in self._procs if not p.forget_if_done()]
        data = self._route.data("start a command", "POST", "commands", {"cmd": command})
        command_id = data.get("uuid") if isinstance(data, Mapping) else None
        if not isinstance(command_id, str) or not _COMMAND_ID.fullmatch(command_id):
            raise RemoteError(
                f"plugin {self._route.instance}: start a command: "
                f"answered an id that is not a uuid ({_text(command_id)!r})"
            )
        proc = PluginProcess(self._route, command_id)
        with self._lock:
            self._procs.append(proc)
        return proc

    def start_terminal(
        self, command: str, *, term: str, size: tuple[int, int] | None
    ) -> TerminalProcess:
        """`command` for a user, on plain pipes: the plugin API has no pseudo-terminal."""
        if size is not None:
            raise UsageError(
                f"the plugin transport of {self._route.instance} offers no terminal: run "
                "`ukc exec` for a command, or `ukc ssh` with input that is not a terminal"
            )
        process = self.start(command)
        assert isinstance(process, PluginProcess)
        return process

    def close(self) -> None:
        """Stop what still runs and let the plugin forget every process started here."""
        with self._lock:
            procs, self._procs = self._procs, []
        for proc in procs:
            proc.kill()
        self._route.settle()
        self._route.active = False


def _route(target: Target) -> _Route:
    if target.api is None or not target.uuid:
        raise RemoteError(f"instance {target.instance}: the plugin transport needs its uuid")
    return _Route(target.api, target.uuid, target.instance)


def _pin(target: Target) -> str:
    return f"uuid:{target.uuid}"


def _check_pin(target: Target, pin: str | None) -> None:
    if pin is not None and pin != _pin(target):
        raise RemoteError(
            f"instance {target.instance} is not the sandbox recorded for it ({pin}), refusing"
        )


class PluginKind:
    """Sets up the `plugin` transport."""

    name = "plugin"
    credentials_noun = "plugin access"
    plugins: tuple[Plugin, ...] = (Plugin(PLUGIN_NAME, PLUGIN_IMAGE),)

    def __init__(
        self,
        *,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sleep = sleep
        self._monotonic = monotonic

    def warnings(self, session: str) -> tuple[str, ...]:
        return ()

    def credentials_present(self, credentials: Credentials) -> bool:
        return True  # the metro's token is the only credential

    def create_fields(self, credentials: Credentials) -> CreateFields:
        return CreateFields(plugins=self.plugins)

    def connect(
        self, target: Target, credentials: Credentials, *, pin: str | None, deadline_s: float
    ) -> Transport:
        _check_pin(target, pin)
        shell = PluginShell(_route(target))
        deadline = self._monotonic() + deadline_s
        delay = _READY_FIRST_S
        while True:
            try:
                shell.probe()
                break
            except (RemoteError, TransportError) as err:
                left = deadline - self._monotonic()
                if not err.retryable or left <= 0:
                    if not err.retryable:
                        raise
                    raise SandboxNotReadyError(
                        f"plugin of instance {target.instance} not ready after "
                        f"{deadline_s:.0f}s: {err}"
                    ) from None
                self._sleep(min(delay, left))
                delay = min(delay * 2, _READY_MAX_S)
        return ShellTransport(self.name, shell, pin=_pin(target))

    def reopen(self, target: Target, credentials: Credentials, *, pin: str) -> Transport:
        _check_pin(target, pin)
        shell = PluginShell(_route(target))
        shell.probe()
        return ShellTransport(self.name, shell, pin=_pin(target))


KIND: TransportKind = PluginKind()
