"""One question asked of many sessions at once: which of them it holds for."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["those_where"]

T = TypeVar("T")


def those_where(
    items: Sequence[T], holds: Callable[[T], bool], *, concurrency: int, name: str
) -> list[T]:
    """The `items` for which `holds` is true, in their order; up to `concurrency` asked at once
    on threads named `name` (one item, or a concurrency of 1, is asked on this thread)."""
    if len(items) <= 1 or concurrency <= 1:
        answers = [holds(item) for item in items]
    else:
        with ThreadPoolExecutor(min(concurrency, len(items)), name) as workers:
            answers = list(workers.map(holds, items))
    return [item for item, yes in zip(items, answers, strict=True) if yes]
