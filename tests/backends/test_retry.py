"""Pure tests of the retry policy: injected clock, sleep and rng; no real waiting."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from reconciler._util.retry import RetryPolicy, apoll, backoff_delays, call_with_retries, poll
from reconciler.errors import ApiError, RateLimitedError, SpecError, TransportError


class FakeClock:
    """A monotonic clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def monotonic(self) -> float:
        return self.now


def failing_then(errors: list[Exception], value: str = "ok") -> tuple[list[int], Callable[[], str]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return value

    return calls, fn


class TestBackoffDelays:
    def test_delays_are_full_jitter_below_the_doubling_capped_ceiling(self) -> None:
        policy = RetryPolicy(max_attempts=8, base_s=1.0, cap_s=10.0, deadline_s=1000)
        delays = list(backoff_delays(policy, random.Random(7)))
        assert len(delays) == 7
        ceilings = [1, 2, 4, 8, 10, 10, 10]
        assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))

    def test_the_same_seed_gives_the_same_delays(self) -> None:
        policy = RetryPolicy(max_attempts=5, base_s=0.5, cap_s=4.0, deadline_s=100)
        rng = random.Random(3)
        expected = [rng.uniform(0, c) for c in (0.5, 1.0, 2.0, 4.0)]
        assert list(backoff_delays(policy, random.Random(3))) == expected

    def test_half_jitter_waits_between_half_and_all_of_the_ceiling(self) -> None:
        policy = RetryPolicy(max_attempts=None, base_s=0.2, cap_s=2.0, jitter=0.5)
        delays = backoff_delays(policy, random.Random(5))
        ceilings = [0.2, 0.4, 0.8, 1.6, 2.0, 2.0]
        for ceiling in ceilings:
            assert ceiling / 2 <= next(delays) <= ceiling

    def test_a_policy_without_an_attempt_limit_yields_the_cap_forever(self) -> None:
        policy = RetryPolicy(max_attempts=None, base_s=1, cap_s=3, jitter=0)
        delays = backoff_delays(policy, random.Random(0))
        assert [next(delays) for _ in range(200)][-3:] == [3, 3, 3]

    def test_a_fixed_interval_policy_waits_the_same_every_time(self) -> None:
        delays = backoff_delays(RetryPolicy.every(0.25), random.Random(1))
        assert [next(delays) for _ in range(4)] == [0.25, 0.25, 0.25, 0.25]

    def test_a_jitter_outside_zero_to_one_is_refused(self) -> None:
        with pytest.raises(ValueError, match=r"jitter 1\.5"):
            RetryPolicy(jitter=1.5)

    def test_a_policy_with_zero_attempts_is_refused(self) -> None:
        with pytest.raises(ValueError, match="max_attempts 0"):
            RetryPolicy(max_attempts=0)


class TestCallWithRetries:
    def test_retryable_errors_are_retried_with_the_jittered_delays(self) -> None:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=4, base_s=1.0, cap_s=8.0, deadline_s=100)
        calls, fn = failing_then([TransportError("t1"), ApiError("5xx", status=503)])
        result = call_with_retries(
            fn,
            policy=policy,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
            rng=random.Random(11),
        )
        assert result == "ok"
        assert len(calls) == 3
        assert clock.sleeps == list(backoff_delays(policy, random.Random(11)))[:2]

    def test_a_validation_error_is_never_retried(self) -> None:
        clock = FakeClock()
        calls, fn = failing_then([ApiError("bad request", status=400)])
        with pytest.raises(ApiError, match="bad request"):
            call_with_retries(
                fn,
                policy=RetryPolicy(),
                sleep=clock.sleep,
                monotonic=clock.monotonic,
                rng=random.Random(1),
            )
        assert len(calls) == 1
        assert clock.sleeps == []

    def test_errors_outside_the_backend_tree_are_not_retried(self) -> None:
        clock = FakeClock()
        calls, fn = failing_then([SpecError("broken")])
        with pytest.raises(SpecError):
            call_with_retries(
                fn,
                policy=RetryPolicy(),
                sleep=clock.sleep,
                monotonic=clock.monotonic,
                rng=random.Random(1),
            )
        assert len(calls) == 1

    def test_retry_after_is_a_floor_for_the_wait(self) -> None:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=3, base_s=0.1, cap_s=0.2, deadline_s=100)
        calls, fn = failing_then([RateLimitedError("429", retry_after=7.5)])
        assert (
            call_with_retries(
                fn,
                policy=policy,
                sleep=clock.sleep,
                monotonic=clock.monotonic,
                rng=random.Random(2),
            )
            == "ok"
        )
        assert clock.sleeps == [7.5]
        assert len(calls) == 2

    def test_giving_up_at_the_deadline_raises_the_last_error_without_sleeping_past_it(
        self,
    ) -> None:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=10, base_s=1.0, cap_s=1.0, deadline_s=5.0)
        errors: list[Exception] = [RateLimitedError("first", retry_after=3.0)]
        errors.append(RateLimitedError("second", retry_after=3.0))
        calls, fn = failing_then(errors)
        with pytest.raises(RateLimitedError, match="second"):
            call_with_retries(
                fn,
                policy=policy,
                sleep=clock.sleep,
                monotonic=clock.monotonic,
                rng=random.Random(2),
            )
        assert clock.sleeps == [3.0]
        assert len(calls) == 2

    def test_running_out_of_attempts_raises_the_last_error(self) -> None:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=3, base_s=0.0, cap_s=0.0, deadline_s=100)
        calls, fn = failing_then([TransportError(f"t{i}") for i in range(5)])
        with pytest.raises(TransportError, match="t2"):
            call_with_retries(
                fn,
                policy=policy,
                sleep=clock.sleep,
                monotonic=clock.monotonic,
                rng=random.Random(2),
            )
        assert len(calls) == 3
        assert clock.sleeps == [0.0, 0.0]

    def test_giving_up_can_raise_an_error_of_the_callers_choosing(self) -> None:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=3, base_s=1.0, cap_s=1.0, jitter=0.0)
        _calls, fn = failing_then([TransportError(f"t{i}") for i in range(5)])
        told: list[tuple[str, int, float]] = []
        with pytest.raises(SpecError, match="gave up after 3: t2"):
            call_with_retries(
                fn,
                policy=policy,
                sleep=clock.sleep,
                monotonic=clock.monotonic,
                give_up=lambda err, n: SpecError(f"gave up after {n}: {err}"),
                on_retry=lambda err, n, delay: told.append((str(err), n, delay)),
            )
        assert told == [("t0", 1, 1.0), ("t1", 2, 1.0)]
        assert clock.sleeps == [1.0, 1.0]


class TestPoll:
    def test_a_poll_waits_the_interval_until_the_probe_answers(self) -> None:
        clock = FakeClock()
        answers = iter([None, None, "up"])
        left: list[float] = []

        def probe(remaining: float) -> str | None:
            left.append(remaining)
            return next(answers)

        got = poll(
            probe,
            policy=RetryPolicy.every(0.5, deadline_s=10),
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
        assert got == "up"
        assert clock.sleeps == [0.5, 0.5]
        assert left == [10, 9.5, 9.0]

    def test_a_poll_asks_once_more_at_the_deadline_and_then_gives_up(self) -> None:
        clock = FakeClock()
        asked: list[float] = []

        def probe(remaining: float) -> str | None:
            asked.append(clock.now)
            return None

        got = poll(
            probe,
            policy=RetryPolicy.every(2.0, deadline_s=5.0),
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
        assert got is None
        assert asked == [0.0, 2.0, 4.0, 5.0]
        assert clock.sleeps == [2.0, 2.0, 1.0]

    def test_a_poll_backs_off_like_a_retry(self) -> None:
        clock = FakeClock()
        policy = RetryPolicy(max_attempts=None, base_s=1.0, cap_s=4.0, jitter=0.0, deadline_s=60)
        answers = iter([None] * 5 + [True])
        got = poll(
            lambda _: next(answers),
            policy=policy,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
        assert got is True
        assert clock.sleeps == [1.0, 2.0, 4.0, 4.0, 4.0]

    def test_a_long_polling_probe_is_not_slept_after(self) -> None:
        clock = FakeClock()
        answers = iter([None, None, "running"])

        def probe(remaining: float) -> str | None:
            clock.now += min(remaining, 5.0)  # the probe itself waits on the server
            return next(answers)

        got = poll(
            probe,
            policy=RetryPolicy.every(0.0, deadline_s=60),
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
        assert got == "running"
        assert clock.sleeps == []

    def test_an_error_the_probe_raises_ends_the_poll(self) -> None:
        clock = FakeClock()

        def probe(remaining: float) -> str | None:
            raise TransportError("gone")

        with pytest.raises(TransportError, match="gone"):
            poll(probe, policy=RetryPolicy.every(1.0), sleep=clock.sleep, monotonic=clock.monotonic)
        assert clock.sleeps == []

    def test_an_event_loop_poll_gives_up_at_the_deadline_like_a_blocking_one(self) -> None:
        clock = FakeClock()
        asked: list[float] = []

        async def probe(remaining: float) -> str | None:
            asked.append(remaining)
            clock.now += 0.75  # the awaited waits are real but tiny; the probe spends time
            return None

        policy = RetryPolicy.every(0.001, deadline_s=1.0)
        got = asyncio.run(apoll(probe, policy=policy, monotonic=clock.monotonic))
        assert got is None
        assert asked == [1.0, 0.25, -0.5]  # the last one asked at the deadline
