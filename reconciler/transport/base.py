"""What the controller and the sync engine need from a connection into a sandbox.

`RemoteShell` starts processes with streamed stdin, stdout and stderr (`RemoteProcess`): the
byte streams the sync engine's helper and the session commands run over. Implemented over
paramiko through the TLS edge (`transport.sshclient`) and, for tests, by local subprocesses
(`transport.local_shell`), which run the same command lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["CommandResult", "RemoteProcess", "RemoteShell"]


@dataclass(frozen=True)
class CommandResult:
    """What a command did. `exit_code` is None when it timed out (and was killed)."""

    exit_code: int | None
    timed_out: bool
    stdout_tail: str
    stderr_tail: str
    duration_s: float


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


class RemoteShell(Protocol):
    """A connection to one sandbox able to start processes.

    `command` is a POSIX shell command line, run by `sh -c` on the remote side with the
    login user's environment. The connection stays open across calls until `close()`.
    """

    def start(self, command: str) -> RemoteProcess: ...

    def close(self) -> None: ...
