"""Run one session command over a `RemoteShell`: env over stdin, streamed output, timeout
with kill. `ShellTransport` makes any `RemoteShell` a `Transport` that runs commands so.

`run_command` returns a `CommandResult`; it never raises for a non-zero exit or a timeout
(that is the caller's policy).

Secrets: the environment holds `secret_env` values, so it never goes on a command line
(where `ps` and `/proc/*/cmdline` would show it). The remote side runs a fixed bootstrap,
`exec sh -s` (`BOOTSTRAP`), and reads from stdin a script of `export K='v'` lines and the
launch, all in one `{ ... }` group: the shell parses the whole group before it runs any of
it, so a script cut short runs nothing.

Timeouts: the script is written from its own thread (a sandbox that never reads its input
cannot block us before the timeout is armed); it first reports the id to kill on a marker
line on stderr; on timeout we kill that whole process group from a second channel (TERM,
then KILL), so no grandchild survives. Where the channel's process already leads its own
process group (sshd, the sandbox plugin and `LocalShell` start each one in a new session),
the script starts the command as its child in that group: the login shell is the only
program between the channel and the command. Elsewhere the command is moved into a session
of its own (`setsid`, when the sandbox has it).
"""

from __future__ import annotations

import re
import shlex
import threading
import time
from collections.abc import Callable, Mapping

from reconciler._util.names import is_env_name
from reconciler.errors import SpecError, UsageError
from reconciler.transport.base import (
    STOP_GRACE_S,
    CommandResult,
    RemoteProcess,
    RemoteShell,
    TerminalProcess,
    kill_group,
)

__all__ = ["BOOTSTRAP", "ShellTransport", "build_script", "export_lines", "run_command"]

_MARKER_LINE = re.compile(rb"__UKC_KILL__ (-?)([0-9]{1,9})\n")
_READ = 256 * 1024
#: after the process exits, how long stray holders of stdout/stderr may keep them open
_DRAIN_S = 5.0
#: how often a running command checks `stop`
_STOP_POLL_S = 0.2


#: the fixed command line of every session command: a shell that reads the script on stdin
#: (`exec`: the channel's own process, so it leads the group its transport gave it)
BOOTSTRAP = "exec sh -s"


# why: where the channel's process leads no group of its own, the command runs in the
# background of the bootstrap shell so it is never a process group leader, which lets `setsid`
# (util-linux) make it one without forking; `$$` is then both its pid and the id of its new
# process group.
def _launch(shell: str) -> str:
    sh = shlex.quote(shell)
    return (
        "if command -v setsid >/dev/null 2>&1; then "
        f'echo "__UKC_KILL__ -$$" >&2; exec setsid {sh} -lc "$0"; '
        f'else echo "__UKC_KILL__ $$" >&2; exec {sh} -lc "$0"; fi'
    )


def export_lines(env: Mapping[str, str]) -> list[str]:
    """`export NAME='value'` for each variable (POSIX-quoted; a name that is not a shell
    variable name, or a NUL in a value, is a `SpecError`)."""
    lines = []
    for name, value in env.items():
        if not is_env_name(name):
            raise SpecError(f"env name {name!r} is not a shell variable name", field="env")
        if "\0" in value:
            raise SpecError(f"env value of {name} contains a nul byte", field="env")
        lines.append(f"export {name}={shlex.quote(value)}")
    return lines


def build_script(command: str, env: Mapping[str, str], cwd: str, shell: str = "sh") -> bytes:
    """The stdin script for `BOOTSTRAP`: exports (POSIX-quoted), then the command launched in
    `cwd` by `shell -lc`, the whole as one group (parsed whole before any of it runs)."""
    lines = ["{\n"]
    lines += [line + "\n" for line in export_lines(env)]
    sh, cmd = shlex.quote(shell), shlex.quote(command)
    lines.append(f"cd {shlex.quote(cwd)} || exit\n")
    # why `kill -0 -$$`: a process group numbered with our pid exists only while we lead it
    # (a pid is not reused while a group or session still bears it), so it asks "do we lead
    # our group" without a program; the command then runs in the foreground (its death by
    # a signal is an exit status, 128+n, as the other branch's `wait` makes it). Not as pid 1
    # of a namespace: `kill -0 -1` asks about every other process, and -1 is no group.
    lines.append(
        'if [ "$$" -gt 1 ] && kill -0 "-$$" 2>/dev/null; then '
        f'echo "__UKC_KILL__ -$$" >&2; {sh} -lc {cmd} </dev/null; '
        f"else sh -c {shlex.quote(_launch(shell))} {cmd} </dev/null & wait $!; fi\n"
    )
    lines.append("exit\n}\n")
    return "".join(lines).encode()


class _Tail:
    """The last `limit` bytes of a stream."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.buf = bytearray()

    def add(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > 2 * self.limit:
            del self.buf[: len(self.buf) - self.limit]

    def text(self) -> str:
        return bytes(self.buf[-self.limit :] if self.limit else b"").decode(errors="replace")


class _Reader(threading.Thread):
    """Drains one stream as data arrives; on stderr, strips our kill marker line first."""

    def __init__(
        self,
        read: Callable[[int], bytes],
        sink: Callable[[bytes], None],
        tail: _Tail,
        *,
        marker: bool,
    ) -> None:
        super().__init__(name="ukc-cmd-reader", daemon=True)
        self._read = read
        self._sink = sink
        self._tail = tail
        self._marker = marker
        self.kill_target: str | None = None
        self.marker_seen = threading.Event()
        #: the first exception a callback raised (re-raised by run_command)
        self.error: BaseException | None = None

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        self._tail.add(data)
        if self.error is None:
            try:
                self._sink(data)
            except Exception as err:
                # why: keep draining even so; a stalled stream would block the process.
                self.error = err

    def run(self) -> None:
        head = b""
        try:
            while True:
                data = self._read(_READ)
                eof = not data
                if self._marker:
                    head += data
                    if not eof and b"\n" not in head and len(head) < 64:
                        continue
                    self._marker = False
                    match = _MARKER_LINE.match(head)
                    if match and int(match.group(2)) > 1:
                        self.kill_target = match.group(1).decode() + match.group(2).decode()
                        head = head[match.end() :]
                    self.marker_seen.set()
                    data, head = head, b""
                self._deliver(data)
                if eof:
                    break
        except Exception:
            # why: the channel broke or we closed it (timeout, stray pipe holder); the exit
            # status tells the caller what happened, the tails hold what arrived.
            pass
        finally:
            self.marker_seen.set()


def _join(
    a: threading.Thread, b: threading.Thread, deadline: float, now: Callable[[], float]
) -> None:
    for thread in (a, b):
        thread.join(max(0.0, deadline - now()))


def run_command(
    shell: RemoteShell,
    command: str,
    *,
    env: Mapping[str, str],
    cwd: str = "/workspace",
    timeout_s: float | None,
    on_stdout: Callable[[bytes], None],
    on_stderr: Callable[[bytes], None],
    tail_bytes: int = 64 * 1024,
    monotonic: Callable[[], float] = time.monotonic,
    stop: Callable[[], bool] | None = None,
    shell_name: str = "sh",
) -> CommandResult:
    """Run `command` via `shell_name -lc` in `cwd` with `env`; stream output; kill at `timeout_s`,
    or once `stop()` is true (TERM, `STOP_GRACE_S`, KILL).

    `on_stdout` / `on_stderr` are called from two reader threads as data arrives (each
    stream in order; the two streams concurrently).
    """
    script = build_script(command, env, cwd, shell_name)
    started = monotonic()
    proc = shell.start(BOOTSTRAP)
    out_tail, err_tail = _Tail(tail_bytes), _Tail(tail_bytes)
    out = _Reader(proc.read, on_stdout, out_tail, marker=False)
    err = _Reader(proc.read_stderr, on_stderr, err_tail, marker=True)
    out.start()
    err.start()
    timed_out = False
    interrupted = False
    exit_code: int | None = None
    # why a thread: the script goes through the channel's window, and a sandbox that never
    # reads its input would block this write before the timeout below is even armed
    fed: list[BaseException] = []

    def feed() -> None:
        try:
            proc.write(script)
            proc.close_stdin()
        except Exception as exc:
            fed.append(exc)

    feeder = threading.Thread(target=feed, name="ukc-cmd-stdin", daemon=True)
    try:
        feeder.start()
        deadline = None if timeout_s is None else started + timeout_s
        while True:
            remaining = None if deadline is None else max(0.0, deadline - monotonic())
            step = remaining
            if stop is not None:
                step = _STOP_POLL_S if remaining is None else min(remaining, _STOP_POLL_S)
            try:
                exit_code = proc.wait(step)
                break
            except TimeoutError:
                if stop is not None and stop():
                    interrupted = True
                elif deadline is None or monotonic() < deadline:
                    continue
                else:
                    timed_out = True
            err.marker_seen.wait(2.0)
            if err.kill_target is not None:
                kill_group(shell, err.kill_target, STOP_GRACE_S if interrupted else 2.0)
            proc.kill()
            break
        _join(out, err, monotonic() + _DRAIN_S, monotonic)
    finally:
        # why: closing the channel ends readers stuck on a stray holder of stdout/stderr.
        proc.kill()
        _join(out, err, monotonic() + _DRAIN_S, monotonic)
    feeder.join(_DRAIN_S)
    stopped = timed_out or interrupted
    if fed and not stopped:
        raise fed[0]
    for reader in (out, err):
        if reader.error is not None and not stopped:
            raise reader.error
    return CommandResult(
        exit_code=None if stopped else exit_code,
        timed_out=timed_out,
        stdout_tail=out_tail.text(),
        stderr_tail=err_tail.text(),
        duration_s=monotonic() - started,
        interrupted=interrupted,
    )


class ShellTransport:
    """A `Transport` over a `RemoteShell`: processes and commands both run through it."""

    def __init__(self, kind: str, shell: RemoteShell, *, pin: str | None = None) -> None:
        self.kind = kind
        self.shell = shell
        self.pin = pin

    def __repr__(self) -> str:
        return f"ShellTransport({self.kind!r}, {self.shell!r})"

    @property
    def active(self) -> bool:
        return bool(getattr(self.shell, "active", True))

    def start(self, command: str) -> RemoteProcess:
        return self.shell.start(command)

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
        return run_command(
            self.shell,
            command,
            env=env,
            cwd=cwd,
            timeout_s=timeout_s,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
            stop=stop,
            shell_name=shell,
        )

    def start_terminal(
        self, command: str, *, term: str, size: tuple[int, int] | None
    ) -> TerminalProcess:
        starter = getattr(self.shell, "start_terminal", None)
        if starter is None:
            raise UsageError(f"the {self.kind} transport offers no terminal")
        process: TerminalProcess = starter(command, term=term, size=size)
        return process

    def close(self) -> None:
        self.shell.close()
