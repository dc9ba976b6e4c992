"""`KeptThreads`: jobs handed over one after another run on one kept thread; a job that is
still running never delays the next, which gets a thread of its own."""

from __future__ import annotations

import threading

from reconciler._util.threads import KeptThreads
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
