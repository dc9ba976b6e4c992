"""Memory and process limits of local sandboxes, and how a sandbox's out-of-memory death is seen.

One mechanism per daemon, chosen once (`Limiter.detect`) and named in the daemon log and in
`ukc local status`:

* `cgroup v2`: the daemon's own cgroup delegates `memory` and `pids`; each sandbox gets a child
  with `memory.max` (no swap), `memory.oom.group` (the kernel kills the whole sandbox at once)
  and `pids.max`.
* `cgroup v1`: a root daemon on a machine with the v1 `memory` and `pids` hierarchies; each
  sandbox gets a child of the daemon's own cgroup in both, with `memory.limit_in_bytes` (and
  the same memory+swap limit) and `pids.max`. v1 kills only the largest process, so the runtime
  arms an eventfd on `memory.oom_control` and stops the rest of the sandbox itself.
* `rlimit`: neither is usable (no delegation, no root): the agent inside limits each process's
  data size and the sandbox user's process count (RLIMIT_DATA, RLIMIT_NPROC). The whole
  sandbox is not bounded and an out-of-memory stop cannot be told apart from a crash.

The sandbox joins its cgroups before bubblewrap runs (the launcher writes its own pid to
`cgroup.procs`), so no process of it ever runs outside them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler._util.pids import pid_alive
from reconciler._util.retry import RetryPolicy, poll

__all__ = ["Cgroup", "Limiter"]

log = logging.getLogger(__name__)

_REMOVE_TIMEOUT_S = 5.0
_REMOVE_PAUSE_S = 0.02


def _cgroup_lines(text: str) -> dict[str, str]:
    """`/proc/self/cgroup` as {controller (or '' for v2): path}."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            found[controller] = parts[2]
    return found


@dataclass(frozen=True)
class _Mount:
    point: Path
    root: str
    fstype: str
    options: frozenset[str]


def _mounts(text: str) -> list[_Mount]:
    """The cgroup mounts of `/proc/self/mountinfo`."""
    found = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        point = fields[4].replace("\\040", " ")
        found.append(_Mount(Path(point), fields[3], tail[0], frozenset(tail[2].split(","))))
    return found


def _own_dir(mount: _Mount, path: str) -> Path | None:
    """The directory of cgroup `path` under `mount` (None when the mount does not show it)."""
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None
    rel = path[len(root) :].lstrip("/")
    return mount.point / rel if rel else mount.point


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class Cgroup:
    """The cgroup(s) of one sandbox boot."""

    version: int
    dirs: list[Path]
    memory_dir: Path
    _oom_fd: int | None = field(default=None, repr=False)

    @property
    def procs(self) -> list[Path]:
        """The `cgroup.procs` files a process writes its pid to, to join."""
        return [d / "cgroup.procs" for d in self.dirs]

    @property
    def armed_fd(self) -> int | None:
        """The eventfd `oom_eventfd` armed, if it did."""
        return self._oom_fd

    def pids(self) -> list[int] | None:
        """Every process in the cgroup (one `cgroup.procs` read); None when it cannot be read.

        A sandbox's processes cannot leave it: they joined before bwrap ran, forks inherit it,
        and nothing inside can write to a cgroup file of the host.
        """
        try:
            text = (self.memory_dir / "cgroup.procs").read_text()
        except OSError:
            return None
        return [int(p) for p in text.split()]

    def oom_kills(self) -> int:
        """How many processes the kernel killed for lack of memory in this cgroup."""
        name = "memory.events" if self.version == 2 else "memory.oom_control"
        try:
            text = (self.memory_dir / name).read_text()
        except OSError:
            return 0
        counts = dict(line.split(None, 1) for line in text.splitlines() if " " in line)
        return max(int(counts.get("oom_kill", "0")), int(counts.get("oom_group_kill", "0")))

    def oom_eventfd(self) -> int | None:
        """v1: an eventfd that becomes readable when the cgroup runs out of memory."""
        if self.version != 1:
            return None
        if self._oom_fd is None:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            ctl = os.open(self.memory_dir / "memory.oom_control", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _write(self.memory_dir / "cgroup.event_control", f"{efd} {ctl}")
            except OSError:
                os.close(efd)
                raise
            finally:
                os.close(ctl)
            self._oom_fd = efd
        return self._oom_fd

    def remove(self) -> None:
        """Remove the cgroup dirs once their processes are gone (they take a moment to exit)."""
        if self._oom_fd is not None:
            os.close(self._oom_fd)
            self._oom_fd = None
        for d in self.dirs:
            gone = poll(
                functools.partial(_removed, d),
                policy=RetryPolicy.every(_REMOVE_PAUSE_S, deadline_s=_REMOVE_TIMEOUT_S),
            )
            if gone is None:
                log.warning("cgroup %s still busy; left behind", d)


def _removed(d: Path, _remaining_s: float) -> bool | None:
    """rmdir `d`; None while the kernel still counts exiting processes in it (EBUSY)."""
    try:
        d.rmdir()
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            return None
        log.warning("cgroup %s: %s", d, exc.strerror)
    return True


class Limiter:
    """The limit mechanism of one daemon; `create` makes the cgroup(s) of one sandbox boot."""

    def __init__(self, mechanism: str, parents: dict[str, Path] | None = None) -> None:
        self.mechanism = mechanism
        self._parents = parents or {}

    @property
    def uses_cgroups(self) -> bool:
        return bool(self._parents)

    def describe(self) -> str:
        where = ", ".join(f"{c} {p}" for c, p in sorted(self._parents.items()))
        return f"{self.mechanism} ({where})" if where else self.mechanism

    # ---- detection

    @classmethod
    def detect(
        cls,
        *,
        mountinfo: str | None = None,
        cgroup: str | None = None,
        euid: int | None = None,
    ) -> Limiter:
        """The best mechanism this process can use (the arguments exist for tests)."""
        try:
            mountinfo = (
                mountinfo if mountinfo is not None else Path("/proc/self/mountinfo").read_text()
            )
            cgroup = cgroup if cgroup is not None else Path("/proc/self/cgroup").read_text()
        except OSError as exc:
            log.info("sandbox limits: rlimit (cgroups unreadable: %s)", exc.strerror)
            return cls("rlimit")
        mounts = _mounts(mountinfo)
        paths = _cgroup_lines(cgroup)
        euid = os.geteuid() if euid is None else euid
        reasons: list[str] = []
        v2 = cls._detect_v2(mounts, paths, reasons)
        if v2 is not None:
            return v2
        v1 = cls._detect_v1(mounts, paths, euid, reasons)
        if v1 is not None:
            return v1
        log.info("sandbox limits: rlimit (%s)", "; ".join(reasons))
        return cls("rlimit")

    @classmethod
    def _detect_v2(
        cls, mounts: list[_Mount], paths: dict[str, str], reasons: list[str]
    ) -> Limiter | None:
        mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
        if mount is None or "" not in paths:
            reasons.append("no cgroup v2 mount")
            return None
        own = _own_dir(mount, paths[""])
        try:
            available = set((own / "cgroup.controllers").read_text().split()) if own else set()
        except OSError:
            available = set()
        if own is None or not {"memory", "pids"} <= available:
            reasons.append("cgroup v2 without memory and pids controllers")
            return None
        try:
            enabled = set((own / "cgroup.subtree_control").read_text().split())
            if not {"memory", "pids"} <= enabled:
                cls._enable_v2(own)
        except OSError as exc:
            reasons.append(f"cgroup v2 {own} not delegated: {exc.strerror}")
            return None
        limiter = cls("cgroup v2", {"memory+pids": own})
        return limiter if limiter._probe(reasons) else None

    @staticmethod
    def _enable_v2(own: Path) -> None:
        try:
            _write(own / "cgroup.subtree_control", "+memory +pids")
        except OSError as exc:
            # why: a cgroup with processes cannot enable controllers for children ("no
            # internal processes"); a daemon alone in its delegated cgroup moves to a leaf
            members = (own / "cgroup.procs").read_text().split()
            if exc.errno != errno.EBUSY or members != [str(os.getpid())]:
                raise
            leaf = own / "ukc-daemon"
            leaf.mkdir(exist_ok=True)
            _write(leaf / "cgroup.procs", str(os.getpid()))
            _write(own / "cgroup.subtree_control", "+memory +pids")

    @classmethod
    def _detect_v1(
        cls, mounts: list[_Mount], paths: dict[str, str], euid: int, reasons: list[str]
    ) -> Limiter | None:
        if euid != 0:
            reasons.append("cgroup v1 needs a root daemon")
            return None
        parents: dict[str, Path] = {}
        for controller in ("memory", "pids"):
            mount = next(
                (m for m in mounts if m.fstype == "cgroup" and controller in m.options), None
            )
            own = _own_dir(mount, paths[controller]) if mount and controller in paths else None
            if own is None:
                reasons.append(f"no cgroup v1 {controller} hierarchy")
                return None
            parents[controller] = own
        limiter = cls("cgroup v1", parents)
        return limiter if limiter._probe(reasons) else None

    def _probe(self, reasons: list[str]) -> bool:
        """Create, limit and remove a throwaway cgroup: delegation on paper is not enough."""
        try:
            probe = self.create(64 * 1024 * 1024, 64)
        except OSError as exc:
            reasons.append(f"{self.mechanism} not writable: {exc.strerror}")
            return False
        probe.remove()
        self._collect_stale()
        return True

    # ---- per sandbox

    def create(self, memory_bytes: int, max_pids: int) -> Cgroup:
        """A fresh cgroup (one per hierarchy) with the limits set; OSError when refused."""
        name = f"ukc-{os.getpid()}-{secrets.token_hex(6)}"
        dirs: list[Path] = []
        try:
            if self.mechanism == "cgroup v2":
                d = self._parents["memory+pids"] / name
                d.mkdir()
                dirs.append(d)
                _write(d / "memory.max", str(memory_bytes))
                with contextlib.suppress(FileNotFoundError):
                    _write(d / "memory.swap.max", "0")
                _write(d / "memory.oom.group", "1")
                _write(d / "pids.max", str(max_pids))
                return Cgroup(2, dirs, d)
            mem = self._parents["memory"] / name
            pids = self._parents["pids"] / name
            for d in (mem, pids):
                d.mkdir()
                dirs.append(d)
            _write(mem / "memory.limit_in_bytes", str(memory_bytes))
            # why: the memory+swap limit must be set after (and be at least) the memory limit
            with contextlib.suppress(FileNotFoundError):
                _write(mem / "memory.memsw.limit_in_bytes", str(memory_bytes))
            _write(pids / "pids.max", str(max_pids))
            return Cgroup(1, dirs, mem)
        except OSError:
            Cgroup(0, dirs, Path()).remove()
            raise

    def _collect_stale(self) -> None:
        """Remove the empty sandbox cgroups of daemons that died without removing them."""
        for parent in set(self._parents.values()):
            for child in _children(parent):
                pid = child.name.split("-")[1]
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    with contextlib.suppress(OSError):
                        child.rmdir()


def _children(parent: Path) -> Iterable[Path]:
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    return [e for e in entries if e.name.startswith("ukc-") and e.name.count("-") == 2]
