"""A local shell that counts the sync hellos its processes were sent (`tests/sync`)."""

from __future__ import annotations

from reconciler.transport.local_shell import LocalProcess, LocalShell


class _CountingProcess:
    """A helper process whose input is counted: how many hellos it was sent."""

    def __init__(self, proc: LocalProcess, shell: CountingShell) -> None:
        self._proc = proc
        self._shell = shell

    def write(self, data: bytes) -> None:
        self._shell.hellos += bytes(data).count(b'"op":"hello"')
        self._proc.write(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._proc, name)


class CountingShell(LocalShell):
    def __init__(self) -> None:
        super().__init__()
        self.hellos = 0

    def start(self, command: str) -> LocalProcess:
        return _CountingProcess(super().start(command), self)  # type: ignore[return-value]
