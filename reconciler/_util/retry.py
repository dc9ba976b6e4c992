"""Retry with capped exponential backoff, full jitter, Retry-After and an overall deadline.

Fed by the backends (`backends.ukc.UkcApi`, `backends.ssh.wait_ssh_ready`) which wrap one
logical operation in `call_with_retries`. Time and randomness are injected (`sleep`,
`monotonic`, `rng`) so tests assert the exact list of waits without sleeping.

Policy: an error is retried only when `is_retryable(err)` says so (by default: a
`BackendError` whose `retryable` flag is set, i.e. 429, 5xx and transport errors; 4xx
validation errors never). A 429's `retry_after` is a floor for the next wait. When the next
wait would carry us past the deadline we give up at once and raise the last error, rather
than sleeping only to fail later.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from reconciler.errors import BackendError, RateLimitedError

__all__ = [
    "RetryPolicy",
    "backoff_delays",
    "call_with_retries",
    "default_is_retryable",
]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts (including the first), backoff base and cap, total deadline."""

    max_attempts: int = 6
    base_s: float = 0.5
    cap_s: float = 15.0
    deadline_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"retry policy max_attempts {self.max_attempts} is below 1")
        if self.base_s < 0 or self.cap_s < 0 or self.deadline_s < 0:
            raise ValueError("retry policy times must not be negative")


def backoff_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """The waits between attempts: full jitter, uniform in [0, min(cap, base * 2**k)].

    Yields `max_attempts - 1` values (one before each retry). Pure given `rng`.
    """
    for k in range(policy.max_attempts - 1):
        ceiling = min(policy.cap_s, policy.base_s * (2**k))
        yield rng.uniform(0.0, ceiling)


def default_is_retryable(err: BaseException) -> bool:
    """Retry exactly what the error tree marks retryable (429, 5xx, transport)."""
    return isinstance(err, BackendError) and err.retryable


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None],
    monotonic: Callable[[], float],
    rng: random.Random,
    is_retryable: Callable[[BaseException], bool] = default_is_retryable,
) -> T:
    """Call `fn` until it succeeds, a non-retryable error occurs, attempts or deadline run out.

    The last error is re-raised unchanged when giving up.
    """
    start = monotonic()
    delays = backoff_delays(policy, rng)
    while True:
        try:
            return fn()
        except Exception as err:
            if not is_retryable(err):
                raise
            delay = next(delays, None)
            if delay is None:
                raise
            if isinstance(err, RateLimitedError) and err.retry_after is not None:
                # why: the server told us when it will accept again; coming back sooner only
                # spends another request on a certain refusal.
                delay = max(delay, err.retry_after)
            elapsed = monotonic() - start
            if elapsed + delay > policy.deadline_s:
                raise
            sleep(delay)
