"""The lifecycle's transitions in flight: each a task, finished or cancelled at shutdown.

A teardown (what removes a deleted instance's sandbox and files) is awaited at shutdown, never
cancelled: a delete already answered must not leave its workspace behind. Every other
transition is cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

__all__ = ["Transitions"]


class Transitions:
    """The tasks one `LocalMetro` runs on its event loop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._teardowns: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        # the coroutine itself is the task: one cancelled before its first step is closed by
        # the cancel (a wrapper around it would leave it never awaited)
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def spawn_teardown(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """A task that `close` waits for and never cancels."""
        task = self.spawn(coro)
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)
        return task

    async def close(self) -> None:
        """Let the teardowns finish, then cancel every other task and wait for it to end."""
        teardowns = [t for t in self._teardowns if not t.done()]
        if teardowns:
            await asyncio.wait(teardowns)
        tasks = [t for t in self._tasks if not t.done()]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
