"""`KeptThreads`: jobs handed over one after another run on one kept thread; a job that is
still running never delays the next, which gets a thread of its own."""

from __future__ import annotations

import threading
import time

import pytest

from reconciler._util.threads import KeptThreads, together
from tests.support.waiting import eventually


def test_jobs_one_after_another_run_on_one_kept_thread() -> None:
    kept = KeptThreads("test-kept")
    ran: list[threading.Thread] = []
    for _ in range(3):
        done = threading.Event()
        kept.run(lambda done=done: (ran.append(threading.current_thread()), done.set()))
        assert done.wait(5)
        assert eventually(lambda: kept.idle == 1, 5)
    assert ran[0] is ran[1] is ran[2]
    assert ran[0] is not threading.current_thread() and ran[0].daemon


def test_a_job_still_running_does_not_hold_up_the_next() -> None:
    kept = KeptThreads("test-kept")
    release = threading.Event()

    def held() -> None:
        release.wait(10)

    kept.run(held)
    second = threading.Event()
    kept.run(second.set)
    try:
        assert second.wait(5)
    finally:
        release.set()
    assert eventually(lambda: kept.idle == 2, 5)


def test_two_jobs_run_together_each_begun_before_the_other_ends() -> None:
    # each waits for the other to have begun: run one after the other, both time out
    began = {"aside": threading.Event(), "here": threading.Event()}
    saw: dict[str, bool] = {}

    def job(me: str, other: str) -> None:
        began[me].set()
        saw[me] = began[other].wait(5)

    together(lambda: job("aside", "here"), lambda: job("here", "aside"), "test-together")
    assert saw == {"aside": True, "here": True}


def test_together_waits_for_the_job_aside_and_raises_its_error() -> None:
    ended = threading.Event()

    def aside() -> None:
        time.sleep(0.05)
        ended.set()
        raise ValueError("aside failed")

    with pytest.raises(ValueError, match="aside failed"):
        together(aside, lambda: None, "test-together")
    assert ended.is_set()
