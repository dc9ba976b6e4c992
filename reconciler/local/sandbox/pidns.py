"""A sandbox's pid namespace, held from boot until its last process is gone.

A sandbox's processes are the members of its pid namespace. The kernel names a namespace by an
inode number, and gives that number to the next namespace created once the old one is freed;
a deleted sandbox's pid 1 may linger as a zombie (its `ns/pid` still naming the namespace)
until its parent reaps it, and the namespace is freed the moment it is reaped. Whoever then
looks for "processes in namespace N" finds the next sandbox's. So a namespace is pinned: an
fd of its `ns/pid` stays open from boot until the reap ends (an open nsfs fd keeps the
namespace, and its number, alive), and members are those whose `ns/pid` is that very inode.

The sandbox's pid 1 is held by a pidfd too: signals reach exactly that process, never one that
reused its pid, and the pidfd says when it exited. When a pid namespace's first process exits,
the kernel has already killed every other member and waited for them, so the sandbox is gone:
no /proc walk, no waiting for a zombie. A daemon that is a child subreaper (`serve`) inherits
the pid 1 of a sandbox whose bwrap died first and reaps it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import signal
import threading
from collections.abc import Iterable

from reconciler._util.retry import RetryPolicy, apoll

__all__ = ["PidNamespace", "become_subreaper", "proc_state"]

_PR_SET_CHILD_SUBREAPER = 36
_GONE_STATES = ("Z", "X", "")


def proc_state(pid: int) -> str:
    """The state letter of `pid` (`R`, `S`, `T`, `Z`...), '' when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    # why: the command name may contain spaces and parentheses; the state follows the last ')'
    return data[data.rfind(b")") + 2 :][:1].decode("ascii", "replace")


def _proc_ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return 0
    fields = data[data.rfind(b")") + 2 :].split()
    return int(fields[1]) if len(fields) > 1 else 0


def become_subreaper() -> bool:
    """Make this process the reaper of its orphaned descendants (false where refused)."""
    libc = ctypes.CDLL(None, use_errno=True)
    return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0


class PidNamespace:
    """The pinned pid namespace of one sandbox and a handle on its first process."""

    def __init__(self, nsfd: int, init_pid: int, pidfd: int | None) -> None:
        self._nsfd: int | None = nsfd
        st = os.fstat(nsfd)
        self.ident = (st.st_dev, st.st_ino)
        self.init_pid = init_pid
        self._pidfd = pidfd
        # why: a /proc walk in a thread must not outlive the pin it compares against
        self._walking = threading.Lock()

    @classmethod
    def pin(cls, init_pid: int, parent_pid: int, *, use_pidfd: bool = True) -> PidNamespace | None:
        """Pin the namespace of `init_pid`, a sandbox's pid 1 and the only child of its bwrap
        `parent_pid`; None when that process is already gone.

        `use_pidfd=False` takes the path of kernels without pidfds (older than 5.3).
        """
        pidfd: int | None = None
        if use_pidfd:
            try:
                pidfd = os.pidfd_open(init_pid)
            except ProcessLookupError:
                return None
            except OSError:
                pidfd = None
        try:
            nsfd = os.open(f"/proc/{init_pid}/ns/pid", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            if pidfd is not None:
                os.close(pidfd)
            return None
        # why: bwrap named the pid before these opens; had that process died and its pid been
        # reused, the fds would hold a stranger (perhaps the host's namespace). bwrap forks
        # exactly one child, so a process whose parent is that bwrap is the one it named.
        if _proc_ppid(init_pid) != parent_pid:
            os.close(nsfd)
            if pidfd is not None:
                os.close(pidfd)
            return None
        return cls(nsfd, init_pid, pidfd)

    @property
    def pinned(self) -> bool:
        return self._nsfd is not None

    def holds(self, pid: int) -> bool:
        """Whether `pid` is a process of this namespace (False once released)."""
        if self._nsfd is None:
            return False
        try:
            st = os.stat(f"/proc/{pid}/ns/pid")
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self.ident

    def members(self, among: Iterable[int] | None = None) -> list[int]:
        """Host pids of every process in the namespace, looked for `among` the given pids (a
        set known to hold them all, such as the sandbox's cgroup), else in a walk of /proc
        (one stat per host process: keep it off the loop)."""
        with self._walking:
            if self._nsfd is None:
                return []
            if among is None:
                among = (int(e) for e in os.listdir("/proc") if e.isdigit())
            return [p for p in among if self.holds(p)]

    def signal_init(self, sig: int) -> None:
        """Send `sig` to the sandbox's pid 1 (SIGKILL there kills the whole namespace)."""
        if self._pidfd is not None:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, sig)
        elif self.holds(self.init_pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(self.init_pid, sig)

    def init_exited(self) -> bool:
        """Whether the sandbox's pid 1 has exited (then no other member is left either)."""
        if self._pidfd is not None:
            poller = select.poll()
            poller.register(self._pidfd, select.POLLIN)
            return bool(poller.poll(0))
        return all(proc_state(p) in _GONE_STATES for p in self.members())

    async def wait_init_exit(self, timeout_s: float) -> bool:
        """Wait until the sandbox's pid 1 has exited; False when it still runs at the timeout."""
        if self._pidfd is None:

            async def gone() -> bool | None:
                return True if await asyncio.to_thread(self.init_exited) else None

            polling = RetryPolicy.every(0.01, deadline_s=timeout_s)
            return await apoll(lambda _: gone(), policy=polling) is not None
        if self.init_exited():
            return True
        loop = asyncio.get_running_loop()
        exited: asyncio.Future[None] = loop.create_future()
        pidfd = self._pidfd

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(pidfd, readable)
        try:
            await asyncio.wait_for(exited, timeout_s)
        except TimeoutError:
            return False
        finally:
            loop.remove_reader(pidfd)
        return True

    def reap_init(self) -> None:
        """Reap the sandbox's pid 1 if it became our child (its bwrap died first)."""
        if self._pidfd is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitid(os.P_PIDFD, self._pidfd, os.WEXITED | os.WNOHANG)
        elif (
            proc_state(self.init_pid) == "Z"
            and _proc_ppid(self.init_pid) == os.getpid()
            and self.holds(self.init_pid)
        ):
            # why: a zombie's pid cannot be reused, and this one is in our namespace
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(self.init_pid, os.WNOHANG)

    def release(self) -> None:
        """Let go of the namespace (its number may then be reused) and of the pidfd."""
        with self._walking:
            for fd in (self._nsfd, self._pidfd):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._nsfd = self._pidfd = None
