"""The sync watchdog: one thread looks after every helper session's watchdog, and each is still
stopped when its call stalls, whatever the others do."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from reconciler.errors import SyncStalledError
from reconciler.sync.watchdog import Watchdog


class _Session:
    """What a watchdog stops: `kill` records the stop (and may block, as a stuck one would)."""

    def __init__(self, block: threading.Event | None = None) -> None:
        self.killed = threading.Event()
        self.escalated = threading.Event()
        self._block = block

    def kill(self) -> None:
        self.killed.set()
        if self._block is not None:
            self._block.wait(10)

    def dog(self, idle_s: float, total_s: float = 3600.0) -> Watchdog:
        return Watchdog(
            name="push of session 'web'",
            after="nothing more is sent",
            idle_s=idle_s,
            total_s=total_s,
            kill=self.kill,
            escalate=self.escalated.set,
        )


@pytest.fixture
def dogs() -> Iterator[list[Watchdog]]:
    made: list[Watchdog] = []
    yield made
    for dog in made:
        dog.stop()


def _watchdog_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "ukc-sync-watchdog")


def test_the_watchdogs_of_many_sessions_share_one_thread(dogs: list[Watchdog]) -> None:
    dogs += [_Session().dog(idle_s=60) for _ in range(5)]
    assert _watchdog_threads() == 1


def test_a_call_stalled_past_its_idle_time_is_stopped_and_says_why(dogs: list[Watchdog]) -> None:
    session = _Session()
    dog = session.dog(idle_s=0.05)
    dogs.append(dog)
    with pytest.raises(SyncStalledError, match=r"did not answer for 0.05 s"), dog.call():
        assert session.killed.wait(5)
        raise OSError("channel closed")


def test_a_session_past_its_deadline_is_stopped(dogs: list[Watchdog]) -> None:
    session = _Session()
    dogs.append(session.dog(idle_s=60, total_s=0.05))
    assert session.killed.wait(5)
    assert "did not finish within 0.05 s" in (dogs[0].expired or "")


def test_calls_that_end_in_time_are_never_stopped(dogs: list[Watchdog]) -> None:
    session = _Session()
    dog = session.dog(idle_s=0.3)
    dogs.append(dog)
    for _ in range(5):
        with dog.call():
            pass
    assert not session.killed.wait(0.8)
    assert dog.expired is None


def test_a_watchdog_made_while_the_monitor_sleeps_long_is_still_looked_at_in_its_idle_time(
    dogs: list[Watchdog],
) -> None:
    dogs.append(_Session().dog(idle_s=600))  # the monitor's next look: 600 s from now
    quick = _Session()
    dog = quick.dog(idle_s=0.05)
    dogs.append(dog)
    with dog.call():
        assert quick.killed.wait(5)


def test_a_kill_that_blocks_does_not_hold_up_another_sessions_watchdog(
    dogs: list[Watchdog],
) -> None:
    release = threading.Event()
    stuck = _Session(block=release)
    first = stuck.dog(idle_s=0.05)
    dogs.append(first)
    try:
        with first.call():
            assert stuck.killed.wait(5)
            other = _Session()
            t0 = time.monotonic()
            second = other.dog(idle_s=0.05)
            dogs.append(second)
            with second.call():
                assert other.killed.wait(5)
            assert time.monotonic() - t0 < 3
    except OSError:
        pass
    finally:
        release.set()


def test_a_stopped_watchdog_never_kills(dogs: list[Watchdog]) -> None:
    session = _Session()
    dog = session.dog(idle_s=0.05)
    with dog.call():
        dog.stop()
    dog.since = 1.0  # as if a call hung: a stopped watchdog no longer looks
    assert not session.killed.wait(0.5)
