"""`StopFlag`: a SIGINT is seen at the next action boundary, whichever thread checks."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator

import pytest

from reconciler.reconcile.interrupts import StopFlag


@pytest.fixture
def quiet_sigint() -> Iterator[list[int]]:
    """A Python-level SIGINT handler that only records (the real one raises
    KeyboardInterrupt in the main thread, which the apply loop turns into `set()`)."""
    seen: list[int] = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: seen.append(signum))
    try:
        yield seen
    finally:
        signal.signal(signal.SIGINT, old)


def check_from_a_worker(flag: StopFlag) -> bool:
    result: list[bool] = []
    worker = threading.Thread(target=lambda: result.append(flag.is_set()))
    worker.start()
    worker.join()
    return result[0]


def test_a_sigint_while_armed_sets_the_flag_for_a_worker_thread(quiet_sigint: list[int]) -> None:
    flag = StopFlag()
    assert flag.arm()
    try:
        assert not check_from_a_worker(flag)
        os.kill(os.getpid(), signal.SIGINT)
        # the worker sees it from the wakeup pipe, however late the main thread runs handlers
        assert check_from_a_worker(flag)
        assert flag.is_set()  # and it stays set
    finally:
        flag.disarm()


def test_set_works_without_arming_and_disarm_restores_the_previous_wakeup_fd(
    quiet_sigint: list[int],
) -> None:
    r, w = os.pipe()
    os.set_blocking(w, False)
    previous = signal.set_wakeup_fd(w)
    try:
        flag = StopFlag()
        assert flag.arm()
        flag.disarm()
        assert signal.set_wakeup_fd(w) == w  # ours was put back
        other = StopFlag()
        assert not other.is_set()
        other.set()
        assert other.is_set()
    finally:
        signal.set_wakeup_fd(previous)
        os.close(r)
        os.close(w)


def test_arming_outside_the_main_thread_is_refused_quietly() -> None:
    flag = StopFlag()
    armed: list[bool] = []
    worker = threading.Thread(target=lambda: armed.append(flag.arm()))
    worker.start()
    worker.join()
    assert armed == [False]
    assert not flag.is_set()
