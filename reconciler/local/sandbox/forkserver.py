"""The daemon's side of the launch server: one `launch.py --serve` that forks every sandbox's
launcher, instead of a new interpreter per boot (~10 ms of CPU each: start plus imports).

The server is the daemon's child, started on the first launch, and reached only through one
end of a socketpair (CLOEXEC in the daemon; the server closes everything but a child's own
fds before that child runs anything). It reaps its children itself and reports each exit, so
it alone knows whether a pid is still its child's: signals to a sandbox's process group go
through it (`Launched.killpg`), never `os.killpg` from here, which could hit a reused pid.
Nothing secret passes through it: the env travels in a pipe it only hands on.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import marshal
import os
import select
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from reconciler.errors import LocalMetroError

__all__ = ["LaunchServer", "Launched"]

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).resolve().with_name("launch.py")
SEND_TIMEOUT_S = 5.0
#: an exit code for children whose server died before it reported them (SIGKILL)
LOST = -9


class Launched:
    """One launched sandbox process (it became the outer bwrap), as the server reports it."""

    def __init__(self, server: LaunchServer, pid: int) -> None:
        self.pid = pid
        self.stdout: asyncio.StreamReader | None = None
        self.returncode: int | None = None
        self._server = server
        self._exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def wait(self) -> int:
        return await asyncio.shield(self._exited)

    def killpg(self, sig: int) -> None:
        """Signal its process group, through the server (it skips a child it reaped)."""
        if self.returncode is None:
            self._server.signal(self.pid, sig)

    def exited(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._exited.set_result(code)


class LaunchServer:
    """Starts the server when first needed; sends it plans, gets back pids and exit codes."""

    def __init__(self, env: dict[str, str]) -> None:
        self._env = env
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._start_lock = asyncio.Lock()
        self._pending: dict[int, asyncio.Future[Launched]] = {}
        self._children: dict[int, Launched] = {}
        self._next = 0

    @property
    def pid(self) -> int | None:
        """The server's pid while it runs (for tests)."""
        return self._proc.pid if self._proc is not None and self._sock is not None else None

    async def _started(self) -> socket.socket:
        async with self._start_lock:
            if self._sock is not None:
                return self._sock
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", "-S", str(LAUNCHER),
                    "--serve", str(theirs.fileno()), str(os.getpid()),
                    stdin=asyncio.subprocess.DEVNULL,
                    env=self._env,
                    pass_fds=(theirs.fileno(),),
                    start_new_session=True,
                )  # fmt: skip
            except OSError:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            asyncio.get_running_loop().add_reader(ours, self._on_readable, ours)
            self._sock = ours
            return ours

    def _send(self, sock: socket.socket, msg: tuple[Any, ...], fds: list[int]) -> None:
        data = [marshal.dumps(msg)]
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            sock.sendmsg(data, rights)
        except BlockingIOError:
            # why: the server reads as fast as it forks; a full buffer means it is stuck
            if not select.select([], [sock], [], SEND_TIMEOUT_S)[1]:
                raise LocalMetroError("the sandbox launch server does not answer") from None
            sock.sendmsg(data, rights)

    async def launch(self, plan: dict[str, Any], fds: dict[int, int]) -> Launched:
        """Fork a launcher for `plan`; `fds` maps each fd number the plan names to the fd of
        the daemon's that goes there. Its stdout and stderr become the returned stdout."""
        sock = await self._started()
        loop = asyncio.get_running_loop()
        console_r, console_w = os.pipe()
        try:
            self._next += 1
            rid = self._next
            answer: asyncio.Future[Launched] = loop.create_future()
            self._pending[rid] = answer
            try:
                self._send(sock, ("launch", rid, plan, list(fds)), [console_w, *fds.values()])
            finally:
                os.close(console_w)
            child = await answer
        except BaseException:
            os.close(console_r)
            raise
        finally:
            self._pending.pop(rid, None)
        reader = asyncio.StreamReader(limit=256 * 1024, loop=loop)
        await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(console_r, "rb", 0)
        )
        child.stdout = reader
        return child

    def signal(self, pid: int, sig: int) -> None:
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError, LocalMetroError):
            self._send(sock, ("signal", int(pid), int(sig)), [])

    def _on_readable(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost(sock)
                return
            try:
                kind, key, value = marshal.loads(data)
            except (ValueError, TypeError, EOFError):
                log.error("sandbox launch server: an unreadable message")
                continue
            if kind == "exit":
                child = self._children.pop(key, None)
                if child is not None:
                    child.exited(int(value))
                continue
            answer = self._pending.get(key)
            if answer is None or answer.done():
                if kind == "pid":
                    # why: its launch was given up (cancelled) while it forked: nobody will
                    # ever stop that sandbox otherwise
                    self.signal(int(value), signal.SIGKILL)
                continue
            if kind == "pid":
                # why here, not once launch() resumes: its exit may be in this same batch
                child = self._children[int(value)] = Launched(self, int(value))
                answer.set_result(child)
            else:
                answer.set_exception(LocalMetroError(f"cannot launch the sandbox: {value}"))

    def _lost(self, sock: socket.socket) -> None:
        """The server is gone (and its children with it): fail what waits on it."""
        asyncio.get_running_loop().remove_reader(sock)
        sock.close()
        if self._sock is sock:
            self._sock = None
            log.error("sandbox launch server exited")
        for answer in self._pending.values():
            if not answer.done():
                answer.set_exception(LocalMetroError("the sandbox launch server exited"))
        children, self._children = self._children, {}
        for child in children.values():
            child.exited(LOST)

    async def close(self) -> None:
        """End the server (after the sandboxes are stopped: its children die with it)."""
        sock, proc = self._sock, self._proc
        self._sock = None
        if sock is not None:
            self._lost(sock)
        self._proc = None
        if proc is not None:
            with contextlib.suppress(ProcessLookupError, asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 5.0)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
