"""Commands started through the plugin API: processes with their output kept for reading."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import threading
import uuid
from typing import Any

from .execapi import WORKSPACE

__all__ = ["MAX_LOG", "Command", "Registry", "parse_signal"]

# why: output is kept in memory for the log endpoints; a runaway command must not exhaust the
# host, so each stream keeps its first 256 MiB (the rest is read and dropped)
MAX_LOG = 256 * 1024 * 1024
#: the size asked for a command's stdin pipe (the default unprivileged maximum)
STDIN_PIPE_BYTES = 1024 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named since Python 3.10


def parse_signal(value: object) -> int | None:
    """A signal number from a number or a name (`15`, `TERM`, `SIGTERM`); None if none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 < value < signal.NSIG else None
    if isinstance(value, str):
        name = value.strip().upper()
        if name.isdigit():
            return parse_signal(int(name))
        if not name.startswith("SIG"):
            name = "SIG" + name
        sig = getattr(signal.Signals, name, None) if name.isidentifier() else None
        return int(sig) if isinstance(sig, signal.Signals) else None
    return None


class Command:
    """One command started through the plugin API, with its collected output."""

    def __init__(
        self, cmdline: str | list[str], cwd: str | None, env: dict[str, str] | None
    ) -> None:
        self.uuid = str(uuid.uuid4())
        self.cmdline = cmdline
        self.cwd = cwd
        self.env = env
        self.lock = threading.Lock()
        self.out = bytearray()
        self.err = bytearray()
        self.exitcode: int | None = None
        self.done = threading.Event()
        self.logs_deleted = False
        self.stdin_closed = False
        argv = ["sh", "-c", cmdline] if isinstance(cmdline, str) else list(cmdline)
        full_env = dict(os.environ)
        full_env.update(env or {})
        # why: a new session lets a signal reach the whole command tree (sh and its children)
        self.proc = subprocess.Popen(
            argv,
            cwd=cwd or WORKSPACE,
            env=full_env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        if self.proc.stdin is not None:
            # why: a stdin request is answered once its bytes are in the pipe; with room for
            # a whole request there, the next one travels while the command reads this one
            with contextlib.suppress(OSError):
                fcntl.fcntl(self.proc.stdin.fileno(), _F_SETPIPE_SZ, STDIN_PIPE_BYTES)
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for t in self._readers:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _read(self, stream: Any, buf: bytearray) -> None:
        fd = stream.fileno()
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            with self.lock:
                if not self.logs_deleted and len(buf) < MAX_LOG:
                    buf += data[: MAX_LOG - len(buf)]
        stream.close()

    def _wait(self) -> None:
        code = self.proc.wait()
        # why: output written just before exit must be collected before a wait answers, but a
        # background child holding the pipe open must not block the exit code forever
        for t in self._readers:
            t.join(timeout=1.0)
        with self.lock:
            self.exitcode = code
        self.done.set()

    def describe(self) -> dict[str, object]:
        return {
            "uuid": self.uuid,
            "cmdline": self.cmdline,
            "cwd": self.cwd,
            "env": self.env,
            "exitcode": self.exitcode,
        }


class Registry:
    """The command registry behind the plugin API; one per agent."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.commands: dict[str, Command] = {}
