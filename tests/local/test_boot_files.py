"""A sandbox boot's file work runs in a worker thread, never on the daemon's event loop."""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import LocalMetroError
from reconciler.local.sandbox.hostids import HostIds
from reconciler.local.sandbox.layout import SandboxLayout
from reconciler.local.sandbox.limits import Cgroup, Limiter
from reconciler.local.sandbox.runtime import SandboxRuntime
from tests.support.sandbox_harness import drop_control_dirs, needs_metro_tools

pytestmark = [needs_metro_tools]

UUID = "boot-files-uuid"


@pytest.fixture(autouse=True)
def _control_dir_dropped(tmp_path: Path) -> Iterator[None]:
    """These runtimes are never closed: their boots' control dirs go here."""
    yield
    drop_control_dirs(SandboxLayout(tmp_path / "state"))


class SlowCgroups(Limiter):
    """Cgroups whose creation waits (a busy cgroup file system) until `go` is set, then
    fails (`fail`) or makes a directory that stands for the cgroup."""

    def __init__(self, root: Path, *, fail: bool) -> None:
        super().__init__("cgroup v2", {"memory+pids": root})
        self.root = root
        self.fail = fail
        self.entered = threading.Event()
        self.go = threading.Event()

    def create(self, memory_bytes: int, max_pids: int) -> Cgroup:
        self.entered.set()
        self.go.wait(10)
        if self.fail:
            raise OSError(errno.EBUSY, "busy")
        d = self.root / "made"
        d.mkdir()
        return Cgroup(2, [d], d)


def _runtime(tmp_path: Path, limiter: Limiter) -> SandboxRuntime:
    return SandboxRuntime(
        tmp_path / "state",
        lambda *_: None,
        limiter=limiter,
        host_ids=HostIds(registry=tmp_path / "ids"),
    )


async def _longest_pause(task: asyncio.Task[object]) -> float:
    """The longest the loop went without running a 10 ms ticker while `task` ran."""
    longest = 0.0
    last = time.monotonic()
    while not task.done():
        await asyncio.sleep(0.01)
        now = time.monotonic()
        longest = max(longest, now - last)
        last = now
    return longest


def test_the_event_loop_runs_on_while_a_boots_cgroup_is_slow_to_make(tmp_path: Path) -> None:
    limiter = SlowCgroups(tmp_path, fail=True)
    runtime = _runtime(tmp_path, limiter)

    async def main() -> float:
        boot = asyncio.ensure_future(runtime.start(UUID, env={}))
        threading.Timer(0.6, limiter.go.set).start()
        longest = await _longest_pause(boot)
        with pytest.raises(LocalMetroError, match="cannot set up its cgroup v2 limits"):
            await boot
        return longest

    assert asyncio.run(main()) < 0.3, "the cgroup's creation held the event loop"


def test_a_boot_cancelled_during_its_file_work_leaves_no_cgroup_behind(tmp_path: Path) -> None:
    limiter = SlowCgroups(tmp_path, fail=False)
    runtime = _runtime(tmp_path, limiter)

    async def main() -> None:
        boot = asyncio.ensure_future(runtime.start(UUID, env={}))
        await asyncio.to_thread(limiter.entered.wait, 10)
        boot.cancel()
        with pytest.raises(asyncio.CancelledError):
            await boot
        limiter.go.set()
        deadline = time.monotonic() + 5
        made = False
        while time.monotonic() < deadline and not (made and not (tmp_path / "made").exists()):
            made = made or (tmp_path / "made").exists()
            await asyncio.sleep(0.005)

    asyncio.run(main())
    assert not (tmp_path / "made").exists(), "the cancelled boot's cgroup was left behind"
