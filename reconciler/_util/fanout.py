"""One piece of work done for many sessions at once (boot markers, journals, wakes, suspends)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["each", "those_where"]

T = TypeVar("T")
R = TypeVar("R")


def each(items: Sequence[T], do: Callable[[T], R], *, concurrency: int, name: str) -> list[R]:
    """`do(item)` for each of `items`, answers in their order; up to `concurrency` at once on
    threads named `name` (one item, or a concurrency of 1, runs on this thread)."""
    if len(items) <= 1 or concurrency <= 1:
        return [do(item) for item in items]
    with ThreadPoolExecutor(min(concurrency, len(items)), name) as workers:
        return list(workers.map(do, items))


def those_where(
    items: Sequence[T], holds: Callable[[T], bool], *, concurrency: int, name: str
) -> list[T]:
    """The `items` for which `holds` is true, in their order (asked as `each` does)."""
    answers = each(items, holds, concurrency=concurrency, name=name)
    return [item for item, yes in zip(items, answers, strict=True) if yes]
