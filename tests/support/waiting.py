"""Waiting in a test for something another process does, with the controller's one poll."""

from __future__ import annotations

from collections.abc import Callable

from reconciler._util.retry import RetryPolicy, poll


def eventually(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.02) -> bool:
    """Whether `predicate()` became true within `timeout_s` (it is asked once more at the end)."""
    policy = RetryPolicy.every(interval_s, deadline_s=timeout_s)
    return poll(lambda _: True if predicate() else None, policy=policy) is not None
