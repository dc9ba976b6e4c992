"""Waiting for a condition with a deadline, the one way the local metro polls.

Private to the emulator (the controller has its own retry helper): `poll_until` for the
daemon's client side (waiting for a daemon to come up or go), `apoll_until` on the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

__all__ = ["apoll_until", "poll_until"]

T = TypeVar("T")


def poll_until(
    check: Callable[[], T | None],
    *,
    timeout_s: float,
    interval_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """Call `check` every `interval_s` until it answers (not None) or `timeout_s` has passed.

    `check` is called at least once, and once more at the deadline; None means timed out.
    """
    deadline = clock() + timeout_s
    while True:
        got = check()
        if got is not None or clock() >= deadline:
            return got
        sleep(interval_s)


async def apoll_until(
    check: Callable[[], Awaitable[T | None]],
    *,
    timeout_s: float,
    interval_s: float,
    clock: Callable[[], float] = time.monotonic,
) -> T | None:
    """`poll_until` for an awaitable check, sleeping on the event loop."""
    deadline = clock() + timeout_s
    while True:
        got = await check()
        if got is not None or clock() >= deadline:
            return got
        await asyncio.sleep(interval_s)
