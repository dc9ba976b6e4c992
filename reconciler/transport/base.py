"""The transport seam: what the controller and the sync engine need from a way into a sandbox.

* `RemoteShell` starts processes with streamed stdin, stdout and stderr (`RemoteProcess`):
  the byte streams the sync engine's helper runs over.
* `Transport` is one live connection to one sandbox: a `RemoteShell` that also runs a
  session command (streamed output, exit code, timeout with kill) and says what pins the
  sandbox's identity (an SSH host key).
* `Terminal` is the user's end of an interactive session (`ukc ssh`): the controller's
  terminal, or a test's script of keystrokes; `TerminalProcess` the sandbox's end (a process
  on a pseudo-terminal, or on plain pipes when the user's end is no terminal).
* `TransportKind` is how one kind of transport is set up: what an instance must be created
  with (env, public ports, plugins), the session's credentials, and connecting once the
  instance runs. `transport.select` maps a session's `exec` to its kind; nothing else in the
  controller knows which kinds exist.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from reconciler.cloud.model import CloudApi, Plugin, Service
from reconciler.cloud.trust import Reach
from reconciler.errors import RemoteError

__all__ = [
    "STOP_GRACE_S",
    "CommandResult",
    "CreateFields",
    "Credentials",
    "RemoteProcess",
    "RemoteShell",
    "Target",
    "Terminal",
    "TerminalProcess",
    "Transport",
    "TransportKind",
    "kill_group",
]


@dataclass(frozen=True)
class CommandResult:
    """What a command did. `exit_code` is None when it timed out or was interrupted (and was
    stopped)."""

    exit_code: int | None
    timed_out: bool
    stdout_tail: str
    stderr_tail: str
    duration_s: float
    #: stopped because `stop()` said so (Ctrl-C), not by its timeout
    interrupted: bool = False


class RemoteProcess(Protocol):
    """A process started in a sandbox, with its standard streams."""

    def write(self, data: bytes) -> None:
        """Send bytes to the process's stdin (blocks while the peer's window is full)."""
        ...

    def close_stdin(self) -> None: ...

    def read(self, n: int = 65536) -> bytes:
        """Read up to n bytes of stdout; b"" at EOF."""
        ...

    def read_stderr(self, n: int = 65536) -> bytes:
        """Read up to n bytes of stderr; b"" at EOF."""
        ...

    def wait(self, timeout: float | None = None) -> int:
        """Exit status; raises TimeoutError when `timeout` lapses first."""
        ...

    def kill(self) -> None:
        """Stop the process (closes the channel); safe to call twice."""
        ...


class TerminalProcess(RemoteProcess, Protocol):
    """A process the user drives: its output may be a pseudo-terminal's (stderr merged)."""

    def resize(self, cols: int, rows: int) -> None:
        """The user's window changed size (ignored without a pseudo-terminal)."""
        ...


class Terminal(Protocol):
    """The user's end of an interactive session. A terminal (`size` not None) is put in raw
    mode while the session runs, so every key, Ctrl-C included, goes to the sandbox."""

    def size(self) -> tuple[int, int] | None:
        """(columns, rows) of a terminal; None when input or output is not one."""
        ...

    def term(self) -> str:
        """The terminal type to announce (`$TERM`)."""
        ...

    def raw(self) -> AbstractContextManager[None]:
        """Raw mode for the session's duration, restored on exit (a no-op on no terminal)."""
        ...

    def read(self, timeout_s: float) -> bytes | None:
        """Input bytes; b"" at end of input; None when none came within `timeout_s`."""
        ...

    def write(self, data: bytes) -> None: ...

    def write_err(self, data: bytes) -> None: ...

    def resized(self) -> bool:
        """True once after each change of the window's size."""
        ...


class RemoteShell(Protocol):
    """A connection to one sandbox able to start processes.

    `command` is a POSIX shell command line, run by `sh -c` on the remote side with the
    login user's environment. The connection stays open across calls until `close()`.
    A shell may also offer `spare(command)`: `command` does nothing before it reads its
    stdin, so the shell may start it ahead for a later `start` (a kept connection's lender).
    """

    def start(self, command: str) -> RemoteProcess: ...

    def close(self) -> None: ...


class Transport(RemoteShell, Protocol):
    """One live connection to one sandbox (`start` gives the byte streams of `RemoteShell`)."""

    @property
    def kind(self) -> str:
        """The name of the transport that opened it."""
        ...

    @property
    def pin(self) -> str | None:
        """What identifies the sandbox's end of this connection (an SSH host key
        fingerprint): recorded in the status file, and required of every later connection
        to the same instance."""
        ...

    @property
    def active(self) -> bool:
        """False once the connection is known to be dead (a kept one may die while idle)."""
        ...

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
        """Run a session command (`shell -lc` in `cwd`, with `env`) and stream its output as it
        comes; at `timeout_s`, or as soon as `stop()` is true (polled), the command and its
        children are signalled, given a grace period, then killed. A non-zero exit, a timeout
        or a stop is a result; a broken connection raises a `BackendError`."""
        ...

    def start_terminal(
        self, command: str, *, term: str, size: tuple[int, int] | None
    ) -> TerminalProcess:
        """Start `command` (a shell command line) for a user: on a pseudo-terminal of
        `size` (columns, rows) announcing `term`, or on plain pipes when `size` is None."""
        ...


@dataclass(frozen=True)
class Target:
    """The instance a transport connects to: its name, its public name (None without a service
    group), how its metro is reached, its uuid and its metro's API."""

    instance: str
    fqdn: str | None
    reach: Reach
    uuid: str = ""
    api: CloudApi | None = field(default=None, repr=False)

    def public_name(self) -> str:
        """The FQDN, for a transport that reaches the instance through its public ports."""
        if not self.fqdn:
            raise RemoteError(f"instance {self.instance} has no public fqdn")
        return self.fqdn


@dataclass(frozen=True)
class Credentials:
    """Where a transport keeps one session's secrets: the file `path`, and files beside it
    named `<path>.<suffix>`. They outlive a replacement of the instance and go with the
    session (`forget`). With `seed`, the transport derives them from it instead of making
    random ones (every runner that holds the project's secret derives the same), and the
    files are only a copy of what the seed gives."""

    path: Path
    seed: bytes | None = field(default=None, repr=False, compare=False)

    def forget(self) -> None:
        """Remove them all (the session is deleted)."""
        for found in (self.path, *self.path.parent.glob(f"{self.path.name}.*")):
            with contextlib.suppress(FileNotFoundError):
                found.unlink()


@dataclass(frozen=True)
class CreateFields:
    """What a transport needs an instance to be created with."""

    env: Mapping[str, str] = field(default_factory=dict)
    services: tuple[Service, ...] = ()
    plugins: tuple[Plugin, ...] = ()


class TransportKind(Protocol):
    """How one kind of transport is set up; `transport.select` registers each one."""

    #: the value of the spec's `exec` that selects it (and of the instance's `ukc.exec` tag)
    name: str
    #: what the session loses with its credentials, for messages ("ssh key")
    credentials_noun: str

    def warnings(self, session: str) -> tuple[str, ...]:
        """What `ukc plan` and `apply` warn about a session using this transport."""
        ...

    def credentials_present(self, credentials: Credentials) -> bool:
        """Whether the session's credentials are there (an existing instance only accepts
        the ones it was created with: without them it is replaced)."""
        ...

    def create_fields(self, credentials: Credentials) -> CreateFields:
        """The fields a new instance needs, creating the session's credentials first if
        there are none."""
        ...

    def connect(
        self, target: Target, credentials: Credentials, *, pin: str | None, deadline_s: float
    ) -> Transport:
        """A connection as soon as the sandbox accepts one, retrying what a booting or waking
        sandbox answers; `SandboxNotReadyError` at the deadline. With `pin`, a sandbox that
        does not present it is an error."""
        ...

    def reopen(self, target: Target, credentials: Credentials, *, pin: str) -> Transport:
        """One attempt at a new connection to a sandbox that answered before (the connection
        pool opens one ahead of need); errors are not retried."""
        ...


#: how long a stopped command may clean up before it is killed (a test runner writing its
#: report on SIGTERM)
STOP_GRACE_S = 5.0
_KILL_WAIT_S = 10.0


def kill_group(shell: RemoteShell, target: str, grace_s: float = 2.0) -> None:
    """TERM the process (group) `target` (a pid, `-pgid`, or shell text giving one), give it
    `grace_s`, then KILL; from a separate channel."""
    ticks = max(1, round(grace_s / 0.2))
    script = (
        # why: the kill must outlive our connection (a second Ctrl-C quits at once), and
        # sshd hangs up the session of a channel it closes
        "trap '' HUP PIPE; "
        # why: no "--": dash's kill builtin takes a negative pid right after the signal
        # but refuses "--"; bash accepts both forms.
        f"kill -TERM {target} 2>/dev/null || exit 0; i=0; "
        f"while [ $i -lt {ticks} ] && kill -0 {target} 2>/dev/null; do sleep 0.2; "
        f"i=$((i+1)); done; kill -KILL {target} 2>/dev/null; exit 0"
    )
    killer: RemoteProcess = shell.start(script)
    try:
        killer.close_stdin()
        killer.wait(_KILL_WAIT_S + grace_s)
    except TimeoutError:
        pass
    finally:
        killer.kill()
