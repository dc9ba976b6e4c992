"""One way to try again: capped exponential backoff with jitter, Retry-After, and a deadline.

`call_with_retries` repeats an operation that failed with a retryable error (by default a
`BackendError` whose `retryable` flag is set: 429, 5xx and transport errors; 4xx validation
errors never); `poll` repeats a probe until it has an answer. Both wait the delays of one
`RetryPolicy` and stop at its deadline. Time and randomness are injected (`sleep`,
`monotonic`, `rng`) so tests assert the exact list of waits without sleeping.

A 429's `retry_after` is a floor for the next wait. When the next wait would carry a retry
past the deadline it gives up at once and raises the last error, rather than sleeping only
to fail later; a poll sleeps until the deadline at most and asks once more.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from typing import TypeVar

from reconciler.errors import BackendError, RateLimitedError

__all__ = [
    "RetryPolicy",
    "apoll",
    "backoff_delays",
    "call_with_retries",
    "default_is_retryable",
    "poll",
]

T = TypeVar("T")

#: past this many doublings every wait is the cap anyway (and 2**k stays a small float)
_MAX_DOUBLINGS = 62


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: attempts (including the first; None: until the deadline), the
    backoff's base and cap, its jitter, and the total deadline."""

    max_attempts: int | None = 6
    base_s: float = 0.5
    cap_s: float = 15.0
    deadline_s: float = 120.0
    #: the random share of each wait w: 1.0 waits uniformly in [0, w] ("full jitter": many
    #: clients retrying at once spread out), 0.5 in [w/2, w], 0 exactly w
    jitter: float = 1.0

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"retry policy max_attempts {self.max_attempts} is below 1")
        if self.base_s < 0 or self.cap_s < 0 or self.deadline_s < 0:
            raise ValueError("retry policy times must not be negative")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError(f"retry policy jitter {self.jitter} is not between 0 and 1")

    def until(self, deadline_s: float) -> RetryPolicy:
        """The same policy with another deadline."""
        return replace(self, deadline_s=deadline_s)

    @classmethod
    def every(cls, interval_s: float, *, deadline_s: float = math.inf) -> RetryPolicy:
        """The same wait every time, until the deadline (a poll of local state)."""
        return cls(
            max_attempts=None,
            base_s=interval_s,
            cap_s=interval_s,
            jitter=0.0,
            deadline_s=deadline_s,
        )


def backoff_delays(policy: RetryPolicy, rng: random.Random) -> Iterator[float]:
    """The waits between attempts: w = min(cap, base * 2**k), jittered (see `jitter`).

    Yields `max_attempts - 1` values (one before each retry), endlessly when there is no
    limit. Pure given `rng`; a policy without jitter draws nothing from it.
    """
    k = 0
    while policy.max_attempts is None or k < policy.max_attempts - 1:
        ceiling = min(policy.cap_s, policy.base_s * (2 ** min(k, _MAX_DOUBLINGS)))
        if policy.jitter:
            yield rng.uniform(ceiling * (1.0 - policy.jitter), ceiling)
        else:
            yield ceiling
        k += 1


def default_is_retryable(err: BaseException) -> bool:
    """Retry exactly what the error tree marks retryable (429, 5xx, transport)."""
    return isinstance(err, BackendError) and err.retryable


def call_with_retries(
    fn: Callable[[], T],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    is_retryable: Callable[[BaseException], bool] = default_is_retryable,
    give_up: Callable[[Exception, int], Exception] | None = None,
    on_retry: Callable[[Exception, int, float], None] | None = None,
) -> T:
    """Call `fn` until it succeeds, a non-retryable error occurs, attempts or deadline run out.

    When giving up, the last error is re-raised unchanged, or `give_up(last error, attempts)`
    is raised instead. `on_retry(error, attempt, delay)` is told before each wait.
    """
    start = monotonic()
    delays = backoff_delays(policy, rng or random.Random())
    attempts = 0
    while True:
        attempts += 1
        try:
            return fn()
        except Exception as err:
            if not is_retryable(err):
                raise
            delay = next(delays, None)
            if delay is not None and isinstance(err, RateLimitedError) and err.retry_after:
                # why: the server told us when it will accept again; coming back sooner only
                # spends another request on a certain refusal.
                delay = max(delay, err.retry_after)
            if delay is None or monotonic() - start + delay > policy.deadline_s:
                if give_up is None:
                    raise
                raise give_up(err, attempts) from None
            if on_retry is not None:
                on_retry(err, attempts, delay)
            sleep(delay)


class _PollClock:
    """The deadline and the waits of one poll (shared by `poll` and `apoll`)."""

    def __init__(
        self, policy: RetryPolicy, monotonic: Callable[[], float], rng: random.Random | None
    ) -> None:
        self._policy = policy
        self._monotonic = monotonic
        self._start = monotonic()
        self._delays = backoff_delays(policy, rng or random.Random())

    def remaining(self) -> float:
        return self._policy.deadline_s - (self._monotonic() - self._start)

    def wait_after(self, remaining: float) -> float | None:
        """How long to sleep before the next probe (never past the deadline); None: stop."""
        delay = next(self._delays, None)
        if remaining <= 0 or delay is None:
            return None
        return max(0.0, min(delay, self.remaining()))


def poll(
    probe: Callable[[float], T | None],
    *,
    policy: RetryPolicy,
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T | None:
    """Call `probe(seconds left)` until it answers (anything but None); None once a probe
    called at or after the deadline had no answer either, or the attempts ran out.

    A probe may wait itself (a long poll): with a zero interval nothing sleeps in between.
    Errors the probe raises end the poll.
    """
    clock = _PollClock(policy, monotonic, rng)
    while True:
        remaining = clock.remaining()
        answer = probe(remaining)
        if answer is not None:
            return answer
        wait = clock.wait_after(remaining)
        if wait is None:
            return None
        if wait > 0:
            sleep(wait)


async def apoll(
    probe: Callable[[float], Awaitable[T | None]],
    *,
    policy: RetryPolicy,
    monotonic: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> T | None:
    """`poll` on an event loop: an awaitable probe, and the waits do not block the loop."""
    import asyncio  # why here: most users of this module never run an event loop

    clock = _PollClock(policy, monotonic, rng)
    while True:
        remaining = clock.remaining()
        answer = await probe(remaining)
        if answer is not None:
            return answer
        wait = clock.wait_after(remaining)
        if wait is None:
            return None
        await asyncio.sleep(wait)
