"""One booted sandbox: its bwrap process, console, limits and pid namespace.

`Box` is what the runtime keeps of a sandbox while it runs: the launcher process (which became
the outer bwrap), the sandbox's pinned pid namespace (`pidns`), its cgroup, and the console
ring its output goes to. Killing a box kills the bwrap process group and the sandbox's pid 1;
killing a pid namespace's first process kills every process in it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

from reconciler.errors import LocalMetroError
from reconciler.local.sandbox.forkserver import Launched
from reconciler.local.sandbox.limits import Cgroup
from reconciler.local.sandbox.pidns import PidNamespace, proc_state

__all__ = ["CONSOLE_MAX", "Box", "read_boot_id", "read_init_pid"]

log = logging.getLogger(__name__)

CONSOLE_MAX = 64 * 1024
GONE_TIMEOUT_S = 5.0
_BOOT_RE = re.compile(r"^ready ([0-9a-f-]{36})$")


@dataclass
class Box:
    uuid: str
    proc: Launched
    #: the console ring (agent and sshd stderr), kept by the runtime after the box is gone
    console: bytearray
    cgroup: Cgroup | None = None
    boot_id: str = ""
    init_pid: int = 0
    #: pinned from the moment bwrap names the sandbox's pid 1 until the box is reaped
    pid_ns: PidNamespace | None = None
    stopping: bool = False
    frozen: bool = False
    out_of_memory: bool = False
    watcher: asyncio.Task[None] | None = None
    console_task: asyncio.Task[None] | None = field(default=None, repr=False)

    def adopt_init(self, pid: int) -> None:
        """bwrap named the host pid of the sandbox's pid 1."""
        self.init_pid = pid
        self.pid_ns = PidNamespace.pin(pid, self.proc.pid)

    def start_console(self) -> None:
        self.console_task = asyncio.create_task(self._read_console())

    async def _read_console(self) -> None:
        stream = self.proc.stdout
        if stream is None:
            return
        ring = self.console
        while True:
            data = await stream.read(65536)
            if not data:
                return
            ring += data
            if len(ring) > CONSOLE_MAX:
                del ring[: len(ring) - CONSOLE_MAX]

    async def console_done(self) -> None:
        """Let the console reader take the last output (at most a second)."""
        if self.console_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self.console_task, 1.0)

    def last_launch_error(self) -> str:
        """The last line the launcher or bwrap printed (why a boot failed), '' if none."""
        lines = [ln.strip() for ln in self.console.decode("utf-8", "replace").splitlines()]
        found = [ln for ln in lines if ln.startswith(("launch:", "bwrap:"))]
        return found[-1][:300] if found else ""

    def watch_memory(self) -> None:
        """cgroup v1: stop the whole sandbox when the kernel kills a process of it for memory."""
        if self.cgroup is None:
            return
        try:
            efd = self.cgroup.oom_eventfd()
        except OSError as exc:
            log.warning("sandbox %s: no out-of-memory notification: %s", self.uuid, exc.strerror)
            return
        if efd is None:
            return
        loop = asyncio.get_running_loop()

        def on_event() -> None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(efd)
            # why: the kernel signals when the cgroup runs out of memory, before it picks and
            # counts a victim; the only other signal, removal, comes after stop() set stopping
            if self.stopping or self.cgroup is None:
                return
            self.out_of_memory = True
            loop.remove_reader(efd)
            self.signal_all(signal.SIGKILL)

        loop.add_reader(efd, on_event)

    def oom_killed(self) -> bool:
        """Whether the kernel killed a process of the sandbox for lack of memory."""
        return self.out_of_memory or (self.cgroup is not None and self.cgroup.oom_kills() > 0)

    async def release_cgroup(self) -> None:
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is None:
            return
        if cgroup.armed_fd is not None:
            asyncio.get_running_loop().remove_reader(cgroup.armed_fd)
        await asyncio.to_thread(cgroup.remove)

    def signal_all(self, sig: int) -> None:
        if self.proc.returncode is None:
            # why: the launch server signals its group only while bwrap is unreaped (its pid
            # surely its own then)
            self.proc.killpg(sig)
        if self.pid_ns is not None:
            self.pid_ns.signal_init(sig)

    async def kill(self) -> None:
        """SIGKILL the bwrap process group and the sandbox's pid 1; wait until all are gone."""
        self.signal_all(signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await self.proc.wait()
        await self.reap_namespace()
        await self.console_done()

    async def reap_namespace(self) -> None:
        """Kill the sandbox's pid 1 (and so its namespace), wait for it, then let the
        namespace go: not before, lest its number name the next sandbox's processes."""
        ns, self.pid_ns = self.pid_ns, None
        if ns is None:
            return
        try:
            ns.signal_init(signal.SIGKILL)
            if not await ns.wait_init_exit(GONE_TIMEOUT_S):
                log.warning(
                    "sandbox %s: pid %d survives SIGKILL for %.0f s",
                    self.uuid,
                    ns.init_pid,
                    GONE_TIMEOUT_S,
                )
            ns.reap_init()
        finally:
            ns.release()

    def members(self) -> list[int]:
        """Host pids of every process in the sandbox's pid namespace: those of its cgroup
        that are in the namespace (its outer bwrap is not), else a walk of /proc."""
        ns, cgroup = self.pid_ns, self.cgroup
        if ns is None:
            return []
        return ns.members(cgroup.pids() if cgroup is not None else None)

    async def _members(self) -> list[int]:
        # why: a walk of /proc stats every process of the host (~5 ms with 50 sandboxes up,
        # twice per suspend of each); a cgroup lists only the sandbox's, cheap on the loop
        ns, cgroup = self.pid_ns, self.cgroup
        among = cgroup.pids() if cgroup is not None else None
        if ns is not None and among is not None:
            return ns.members(among)
        return await asyncio.to_thread(self.members)

    async def freeze(self) -> None:
        """SIGSTOP every process of the sandbox (memory and sockets kept)."""
        self.frozen = True
        # why: a process may fork while we list them; repeat until every member is stopped
        for _ in range(50):
            members = await self._members()
            pending = [p for p in members if proc_state(p) not in ("T", "t", "Z", "X", "")]
            if not pending:
                return
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.002)
        raise LocalMetroError(f"sandbox {self.uuid} could not be frozen: processes keep appearing")

    async def thaw(self) -> None:
        for pid in await self._members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.frozen = False


async def _read_pipe(fd: int, done: Callable[[bytes], bool], limit: int) -> bytes:
    """What the pipe `fd` holds until `done(bytes so far)`, EOF or `limit` bytes.

    Read on the event loop (the read end made non-blocking), not in a worker thread: a thread
    blocked on a booting sandbox's pipe is one of the default executor's few (cpu count + 4)
    held for the whole boot, and with a few sandboxes booting at once every other boot, file
    preparation and teardown waited for one, so the sandboxes booted a few at a time.
    """
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    buf = b""
    while not done(buf) and len(buf) < limit:
        readable: asyncio.Future[None] = loop.create_future()

        def wake(fut: asyncio.Future[None] = readable) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await readable
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, limit - len(buf))
        except BlockingIOError:
            continue
        if not chunk:
            break
        buf += chunk
    return buf


def _child_pid(buf: bytes) -> int | None:
    try:
        return int(json.loads(buf)["child-pid"])
    except (ValueError, KeyError, TypeError):
        return None


async def read_init_pid(fd: int) -> int:
    """The host pid of the sandbox's pid 1, from bwrap's --info-fd JSON."""
    pid = _child_pid(await _read_pipe(fd, lambda buf: _child_pid(buf) is not None, 4096))
    if pid is None:
        raise ValueError("no child pid")
    return pid


async def read_boot_id(fd: int) -> str:
    """The boot id from the agent's `ready <boot id>` line ('' if the pipe closed)."""
    buf = await _read_pipe(fd, lambda buf: b"\n" in buf, 256)
    if b"\n" not in buf:
        return ""
    m = _BOOT_RE.match(buf.split(b"\n", 1)[0].decode("ascii", "replace"))
    return m.group(1) if m else ""
