"""Peak RSS and CPU of a `ukc` command's process tree, read from /proc while it runs.

A `ukc` command is two processes when the warm process serves it: the launcher the user
started (small: interpreter built-ins and `warmclient`) and the child the warm server forks,
which does the work. The child is not a descendant of the launcher, so `wait4`'s rusage cannot
see it, and the warm server reaps its children through SIGCHLD=SIG_IGN, so its `cutime` never
counts them either. `TreeMeter` therefore samples: every `period_s` it reads VmHWM (the
kernel's own high-water mark of the resident set, monotonic) and utime+stime of every process
it knows, and it finds new ones by scanning /proc for children of those processes and for
children of the warm server started after the meter. VmHWM is a high-water mark, so sampling
misses only growth in the last period before an exit; CPU ticks are 10 ms anyway.

The forked child's RSS counts the pages it shares with the warm server (its imports): that is
what the kernel reports as its resident set, and what a user sees in `ps`.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [0] is field 3 (state)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2 :].decode("ascii", "replace").split()


_SIGCHLD_BIT = 1 << 16  # signal 17 in a /proc status signal mask


def _hwm_kib(pid: int) -> tuple[int, bool]:
    """(VmHWM in KiB, whether the process ignores SIGCHLD: its children are auto-reaped and
    never reach its cutime)."""
    hwm, ign = 0, False
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    hwm = int(line.split()[1])
                elif line.startswith(b"SigIgn:"):
                    ign = bool(int(line.split()[1], 16) & _SIGCHLD_BIT)
    except (OSError, ValueError):
        pass
    return hwm, ign


def _uptime_ticks() -> int:
    with open("/proc/uptime", encoding="ascii") as f:
        return int(float(f.read().split()[0]) * CLK_TCK)


def cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of one process, in clock ticks (0 if it is gone)."""
    st = _stat(pid)
    if st is None:
        return 0
    return int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a live process tree: each member's own and its reaped children's.

    Children that a parent never waits for (auto-reaped) vanish from the sum when they exit;
    take a snapshot before and after and subtract, for a long-lived tree such as the metro.
    """
    members = descendants(pid) | {pid}
    return sum(cpu_ticks(p) for p in members) / CLK_TCK


class TreeCpu:
    """CPU seconds of a long-lived process tree and every process it ever forks (the metro:
    daemon, sandboxes, and the ~600 short processes a 50-session fan-out makes in them).

    Why not `tree_cpu_s`: a before/after difference of the live tree's own and reaped ticks
    missed more than half of the metro's CPU (bench/PROFILE.md, h28-fan: 1.74 s where a
    cpuacct cgroup around the tree said 4.05 s). So, where it can, this puts the tree in a
    cgroup of its own and reads the kernel's total for it (every task that ever ran in it,
    exited or not): a cgroup v1 `cpuacct` hierarchy, else a cgroup v2 one with no controllers
    enabled (as the `unified` mount of a hybrid layout; a cgroup v2 hierarchy that carries
    controllers is left alone, since the metro's sandbox limits may live there). Both need
    root. Elsewhere it falls back to `tree_cpu_s` (`method` says which).
    """

    def __init__(self, root: int) -> None:
        self.root = root
        self._dir: Path | None = None
        self._usage = lambda: tree_cpu_s(root)
        self.method = "tree"
        for base, method in (
            (Path("/sys/fs/cgroup/cpuacct"), "cgroup-v1-cpuacct"),
            (Path("/sys/fs/cgroup/unified"), "cgroup-v2"),
            (Path("/sys/fs/cgroup"), "cgroup-v2"),
        ):
            if self._adopt(base, method):
                break

    def _adopt(self, base: Path, method: str) -> bool:
        if method == "cgroup-v1-cpuacct":
            # why not with `cpu` mounted beside it: a cgroup there is also a scheduling group
            # (its own cpu.shares), which would change how the metro competes for the CPU
            if not (base / "cpuacct.usage").exists() or (base / "cpu.shares").exists():
                return False
        elif (
            not (base / "cgroup.controllers").exists()
            or (base / "cgroup.subtree_control").read_text().strip()
        ):
            return False
        here = base / f"ukc-bench-{os.getpid()}-{self.root}"
        left: list[str] = []
        try:
            here.mkdir()
            (here / "cgroup.procs").write_text(str(self.root))
        except OSError:
            self._release(here, base)
            return False
        # what the root already runs follows it (what it starts later is born inside)
        for pid in descendants(self.root):
            try:
                (here / "cgroup.procs").write_text(str(pid))
            except ProcessLookupError:
                pass
            except OSError as exc:
                left.append(f"{_comm(pid)}:{exc.strerror}")
        self._dir, self._base = here, base
        self.method = method + (f" (not moved: {','.join(left)})" if left else "")
        if method.startswith("cgroup-v1"):
            self._usage = lambda: int((here / "cpuacct.usage").read_text()) / 1e9
        else:
            self._usage = lambda: _usage_usec(here) / 1e6
        return True

    def seconds(self) -> float:
        """The tree's CPU so far (a difference of two readings is what ran between them)."""
        return self._usage()

    def close(self) -> None:
        """Back to the hierarchy's root, the cgroup removed."""
        if self._dir is not None:
            self._release(self._dir, self._base)
            self._dir = None

    @staticmethod
    def _release(here: Path, base: Path) -> None:
        try:
            for pid in (here / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (base / "cgroup.procs").write_text(pid)
            here.rmdir()
        except OSError:
            pass


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"


def _usage_usec(cgroup: Path) -> int:
    for line in (cgroup / "cpu.stat").read_text().splitlines():
        name, _, value = line.partition(" ")
        if name == "usage_usec":
            return int(value)
    return 0


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(int(st[1]), []).append(int(entry))
    out: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


@dataclass
class _Proc:
    ppid: int = 0
    hwm_kib: int = 0
    #: utime + stime, and cutime + cstime (the children it reaped), at the last sample
    own_ticks: int = 0
    reaped_ticks: int = 0
    #: it ignores SIGCHLD (what it forks is reaped by the kernel, not added to its cutime)
    auto_reaps: bool = False
    #: its /proc entry vanished: its parent reaped it
    gone: bool = False


@dataclass
class Measured:
    """One command: wall seconds, exit code, output, and its process tree's figures."""

    elapsed_s: float
    returncode: int
    stdout: str
    stderr: str
    #: sum over the tree's processes of each one's peak RSS (an upper bound of the tree's peak)
    rss_peak_kib: int
    #: the largest single process's peak RSS (the warm child, or the cold ukc process)
    rss_max_kib: int
    #: user + system CPU seconds of the tree
    cpu_s: float
    pids: list[int] = field(default_factory=list)

    @property
    def rss_peak_mb(self) -> float:
        return self.rss_peak_kib / 1024


class TreeMeter:
    """Samples a process tree (plus a warm server's new children) until `stop()`."""

    def __init__(self, warm_pid: int | None = None, period_s: float = 0.01) -> None:
        self.warm_pid = warm_pid
        self.period_s = period_s
        self.procs: dict[int, _Proc] = {}
        self._roots: set[int] = set()
        self._t0 = _uptime_ticks() - 1
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="treemeter")

    def start(self, root_pid: int) -> None:
        self._roots.add(root_pid)
        self.procs[root_pid] = _Proc()
        self._thread.start()

    def _scan(self) -> None:
        watched = set(self.procs)
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in self.procs:
                continue
            st = _stat(pid)
            if st is None:
                continue
            ppid, started = int(st[1]), int(st[19])
            if ppid in watched or (ppid == self.warm_pid and started >= self._t0):
                self.procs[pid] = _Proc(ppid=ppid)

    def _sample(self) -> None:
        for pid, proc in self.procs.items():
            st = _stat(pid)
            if st is None:
                proc.gone = True  # reaped: its last sample stands
                continue
            if st[0] in ("Z", "X"):
                continue  # exited, not reaped yet: its last sample stands
            proc.own_ticks = int(st[11]) + int(st[12])
            proc.reaped_ticks = int(st[13]) + int(st[14])
            hwm, proc.auto_reaps = _hwm_kib(pid)
            proc.hwm_kib = max(proc.hwm_kib, hwm)

    def ticks_once(self, exclude: int | None = None) -> int:
        """CPU ticks of every process seen, each counted once (without `exclude`'s own and
        reaped ticks, for a caller that has them exactly). A member reaped by a member that
        waits for it is already in that parent's cutime (or in `exclude`'s), so its own
        figures are not added again."""
        total = 0
        for pid, p in self.procs.items():
            if pid != exclude:
                total += p.own_ticks + p.reaped_ticks
            parent = self.procs.get(p.ppid)
            if p.gone and parent is not None and not parent.auto_reaps:
                total -= p.own_ticks + p.reaped_ticks
        return total

    def _loop(self) -> None:
        n = 0
        while not self._stop.is_set():
            # until the warm child is found, look for it at every tick (a no-op apply lives
            # ~0.1 s); afterwards new descendants are rare (ukc spawns no programs)
            found_child = len(self.procs) > len(self._roots)
            if n % 10 == 0 or (self.warm_pid is not None and not found_child):
                self._scan()
            self._sample()
            n += 1
            self._stop.wait(self.period_s if found_child or self.warm_pid is None else 0.002)

    def stop(self) -> None:
        self._scan()
        self._sample()
        self._stop.set()
        self._thread.join()


def run_measured(
    argv: list[str],
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    warm_pid: int | None = None,
    check: bool = True,
    timeout_s: float | None = None,
) -> Measured:
    """Run `argv` to its end; wall time from spawn to exit, peak RSS and CPU of its tree.

    The root process's CPU comes exactly from `wait4` (its reaped descendants included); its
    peak RSS from the samples (`ru_maxrss` would carry the bench's own high-water mark over
    fork + exec); the warm child's figures from the samples.
    """
    meter = TreeMeter(warm_pid)
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    meter.start(proc.pid)
    chunks: dict[str, bytes] = {}

    def drain(name: str, stream: Any) -> None:
        chunks[name] = stream.read()

    readers = [
        threading.Thread(target=drain, args=(n, s), daemon=True)
        for n, s in (("out", proc.stdout), ("err", proc.stderr))
    ]
    for r in readers:
        r.start()
    timer = threading.Timer(timeout_s, proc.kill) if timeout_s else None
    if timer is not None:
        timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if timer is not None:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for r in readers:
        r.join()
    meter.stop()
    # the root's CPU exactly (wait4, its reaped descendants included); the others' (the warm
    # child) from their last sample
    cpu = usage.ru_utime + usage.ru_stime + meter.ticks_once(exclude=proc.pid) / CLK_TCK
    m = Measured(
        elapsed_s=elapsed,
        returncode=proc.returncode,
        stdout=chunks.get("out", b"").decode("utf-8", "replace"),
        stderr=chunks.get("err", b"").decode("utf-8", "replace"),
        rss_peak_kib=sum(p.hwm_kib for p in meter.procs.values()),
        rss_max_kib=max((p.hwm_kib for p in meter.procs.values()), default=0),
        cpu_s=cpu,
        pids=sorted(meter.procs),
    )
    if check and proc.returncode != 0:
        raise SystemExit(
            f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{m.stderr[-2000:]}"
        )
    return m


def rss_of(pid: int) -> dict[str, Any]:
    """VmHWM and VmRSS of a live process, KiB."""
    out: dict[str, Any] = {}
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith((b"VmHWM:", b"VmRSS:")):
                    out[line.split(b":")[0].decode()] = int(line.split()[1])
    except OSError:
        pass
    return out


def _kind(pid: int, root: int) -> str:
    if pid == root:
        return "daemon"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read(4096)
    except OSError:
        return "gone"
    if b"/run/ukc-host/agent/" in cmd:
        return "agent"
    if b"marshal" in cmd or b"ukc sync helper" in cmd:
        return "sync-helper"
    if cmd.startswith(b"sshd") or b"/sshd" in cmd.split(b"\0")[0]:
        return "sshd"
    if b"bwrap" in cmd.split(b"\0")[0]:
        return "bwrap"
    return "command"


class KindCpu:
    """CPU seconds of a process tree (the metro daemon and its sandboxes) by kind of process:
    daemon (API, TLS edge), agent (relay to sshd), sshd, sync-helper, bwrap, command.

    Samples every `period_s` (own utime+stime of each member, by pid); a process that exits
    between samples loses at most one period of CPU.
    """

    def __init__(self, root: int, period_s: float = 0.1) -> None:
        self.root = root
        self.period_s = period_s
        self.start: dict[int, int] = {}
        self.last: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="kindcpu")
        for pid in descendants(root) | {root}:
            st = _stat(pid)
            if st is not None:
                self.start[pid] = int(st[11]) + int(st[12])
        self._thread.start()

    def _sample(self) -> None:
        for pid in descendants(self.root) | {self.root}:
            st = _stat(pid)
            if st is None:
                continue
            kind = self.last[pid][0] if pid in self.last else _kind(pid, self.root)
            self.last[pid] = (kind, int(st[11]) + int(st[12]))

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample()

    def stop(self) -> dict[str, float]:
        self._sample()
        self._stop.set()
        self._thread.join()
        out: dict[str, float] = {}
        for pid, (kind, ticks) in self.last.items():
            out[kind] = out.get(kind, 0.0) + (ticks - self.start.get(pid, 0)) / CLK_TCK
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))
