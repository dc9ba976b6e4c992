"""`LocalShell`: a `RemoteShell` that runs commands as local subprocesses (`sh -c`).

For running the sync engine (or anything else that speaks to a sandbox through `RemoteShell`)
against this machine. The command line is run exactly as the SSH transport would run it
remotely, so the same remote programs are exercised; only the transport differs.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path

__all__ = ["LocalProcess", "LocalShell"]


class LocalProcess:
    """One `sh -c` subprocess with piped standard streams (a `RemoteProcess`)."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._stderr = bytearray()
        self._stderr_eof = False
        self._cond = threading.Condition()
        # why: a process that fills its stderr pipe while we only read stdout would deadlock;
        # a drain thread keeps stderr flowing and buffers it for read_stderr().
        self._drain = threading.Thread(target=self._drain_stderr, daemon=True)
        self._drain.start()
        # why: Popen.wait(timeout) polls with sleeps (milliseconds lost per call); a thread
        # blocked in wait() lets wait(timeout) return the moment the process exits
        self._exited = threading.Event()
        self._waiter = threading.Thread(target=self._wait_exit, daemon=True)
        self._waiter.start()

    def _wait_exit(self) -> None:
        self._popen.wait()
        self._exited.set()

    def _drain_stderr(self) -> None:
        stream = self._popen.stderr
        assert stream is not None
        try:
            while True:
                chunk = stream.read(65536)
                if not chunk:
                    break
                with self._cond:
                    self._stderr += chunk
                    self._cond.notify_all()
        except (OSError, ValueError):
            pass
        finally:
            with self._cond:
                self._stderr_eof = True
                self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self._popen.pid

    def write(self, data: bytes) -> None:
        stdin = self._popen.stdin
        if stdin is None:
            raise BrokenPipeError("stdin of local process is closed")
        view = memoryview(data)
        while view:
            written = stdin.write(view)
            if written is None:  # pragma: no cover - only for non-blocking pipes
                continue
            view = view[written:]

    def close_stdin(self) -> None:
        stdin = self._popen.stdin
        if stdin is not None and not stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()

    def read(self, n: int = 65536) -> bytes:
        stdout = self._popen.stdout
        if stdout is None or stdout.closed:
            return b""
        # why the cap: os.read allocates all of `n` first, and callers may ask for megabytes
        # (a pipe never holds more than 1 MiB)
        data = stdout.read(min(n, 1 << 20))
        return data or b""

    def read_stderr(self, n: int = 65536) -> bytes:
        with self._cond:
            while not self._stderr and not self._stderr_eof:
                self._cond.wait()
            data = bytes(self._stderr[:n])
            del self._stderr[:n]
            return data

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited.wait(timeout):
            raise TimeoutError(f"local process {self._popen.pid} still running")
        self._drain.join(timeout=5)
        code = self._popen.returncode
        assert code is not None
        return code

    def kill(self) -> None:
        if not self._exited.is_set():
            # the whole process group (it has its own session): `sh -c` may have children
            # holding the pipes open
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._popen.pid, signal.SIGKILL)
            self._exited.wait(10)
        self.close_stdin()
        if self._popen.stdout is not None:
            self._popen.stdout.close()
        # stderr once its drain has read the end (closing it under a blocked read could hand
        # the descriptor's number to another file while the read still waits on it)
        self._drain.join(timeout=1)
        if self._popen.stderr is not None and not self._drain.is_alive():
            self._popen.stderr.close()


class LocalShell:
    """Runs each command as `sh -c command` on this machine (a `RemoteShell`).

    `cwd` and `env` let tests give the "sandbox" its own working directory and PATH (for
    instance to put /usr/bin/python3 before a slow pyenv shim).
    """

    def __init__(self, *, cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self._cwd = cwd
        self._env = dict(env) if env is not None else None
        self._procs: list[LocalProcess] = []
        self.started: list[str] = []  # commands started, so tests can count round trips

    def start(self, command: str) -> LocalProcess:
        popen = subprocess.Popen(
            ["sh", "-c", command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
            cwd=self._cwd,
            env=self._env,
            start_new_session=True,
        )
        proc = LocalProcess(popen)
        self._procs.append(proc)
        self.started.append(command)
        return proc

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()
        self._procs.clear()
