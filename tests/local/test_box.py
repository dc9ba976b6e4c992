"""What the runtime reads from a booting sandbox: bwrap's child pid and the agent's ready line."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import pytest

from reconciler.local.sandbox.box import read_boot_id, read_init_pid

T = TypeVar("T")
BOOT = "0b5e6c1a-3f0d-4c55-9a57-1d2e3f405162"


async def _with_no_free_worker(coro_fn: Callable[[int], Awaitable[T]], writes: list[bytes]) -> T:
    """Run `coro_fn(read end)` while the loop's only worker thread is busy, writing `writes`
    to the pipe one by one from another thread."""
    loop = asyncio.get_running_loop()
    pool = ThreadPoolExecutor(max_workers=1)
    loop.set_default_executor(pool)
    release = threading.Event()
    busy = loop.run_in_executor(None, release.wait)
    r, w = os.pipe()

    def writer() -> None:
        for chunk in writes:
            os.write(w, chunk)
        os.close(w)

    try:
        threading.Thread(target=writer, daemon=True).start()
        return await asyncio.wait_for(coro_fn(r), 10)
    finally:
        release.set()
        await busy
        os.close(r)


def test_the_ready_line_is_read_while_every_worker_thread_is_busy() -> None:
    # why it matters: a boot that held a worker while its agent started let only a few
    # sandboxes boot at once (the default executor has cpu count + 4 threads)
    got = asyncio.run(_with_no_free_worker(read_boot_id, [b"ready ", BOOT.encode(), b"\nrest"]))
    assert got == BOOT


def test_bwraps_child_pid_is_read_while_every_worker_thread_is_busy() -> None:
    info = [b'{\n  "child-pid": 4', b"242", b',\n  "cgroup-namespace": 1\n}']
    assert asyncio.run(_with_no_free_worker(read_init_pid, info)) == 4242


def test_a_pipe_closed_before_a_ready_line_gives_no_boot_id() -> None:
    assert asyncio.run(_with_no_free_worker(read_boot_id, [b"ready abc"])) == ""
    assert asyncio.run(_with_no_free_worker(read_boot_id, [b"nonsense line\n"])) == ""


def test_a_pipe_closed_before_the_child_pid_is_an_error() -> None:
    with pytest.raises(ValueError, match="no child pid"):
        asyncio.run(_with_no_free_worker(read_init_pid, [b'{"other": 1}']))
