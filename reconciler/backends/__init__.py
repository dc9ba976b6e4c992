"""Narrow I/O interfaces between the controller and the world.

The controller talks to exactly two kinds of remote thing, through these Protocols only:

* `CloudApi`: the UKC platform API of one metro (list / create / start / stop / delete / wait).
  Implemented over httpx by `backends.ukc.UkcApi`; the local metro speaks the same wire protocol.
* `RemoteShell`: a shell inside one sandbox that can start processes with streamed stdin,
  stdout and stderr. Implemented over paramiko (through the TLS edge) by `backends.ssh`, and,
  for tests, by `backends.localshell.LocalShell` which runs the same commands as local
  subprocesses.

Only modules under `reconciler/backends/` import httpx or paramiko.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "CloudApi",
    "CreateRequest",
    "Instance",
    "RemoteProcess",
    "RemoteShell",
    "Service",
]


@dataclass(frozen=True)
class Service:
    """One public port of an instance's service group."""

    port: int
    destination_port: int
    handlers: tuple[str, ...]


@dataclass(frozen=True)
class Instance:
    """An instance as observed through the API (already parsed tolerantly from the wire).

    `state` is kept as the raw string the API sent: unknown states must not crash us.
    `start_count` and `started_at` together identify one boot as far as the API can tell.
    """

    uuid: str
    name: str
    state: str
    fqdn: str | None = None
    tags: tuple[str, ...] = ()
    image: str | None = None
    memory_mb: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    start_count: int | None = None
    metro: str = ""


@dataclass(frozen=True)
class CreateRequest:
    """Everything `ukc` sends when it creates a session instance."""

    name: str
    image: str
    env: Mapping[str, str]
    tags: Sequence[str]
    memory_mb: int | None = None
    services: Sequence[Service] = field(default_factory=tuple)
    scale_to_zero: Mapping[str, object] | None = None
    autostart: bool = True


class CloudApi(Protocol):
    """The platform API of one metro. Every method is one logical operation (retries inside)."""

    #: the metro label results are tagged with (e.g. "local", "fra", or a URL)
    metro: str

    def list_instances(self, tags: Sequence[str]) -> list[Instance]:
        """All instances carrying every tag in `tags`, across all pages."""
        ...

    def get_instance(self, name: str) -> Instance | None:
        """One instance by name, or None when it does not exist."""
        ...

    def create_instance(self, request: CreateRequest) -> Instance:
        """Create; raises `AlreadyExistsError` when the name is taken."""
        ...

    def start_instance(self, name: str) -> None: ...

    def stop_instance(self, name: str) -> None: ...

    def delete_instance(self, name: str, *, uuid: str | None = None) -> bool:
        """Delete (exactly the instance `uuid` when given); False when it was already gone."""
        ...

    def wait_instance(self, name: str, state: str, timeout_s: float) -> Instance:
        """Block until the instance is in `state`; raises `SandboxNotReadyError` at the deadline."""
        ...

    def close(self) -> None: ...


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
