"""`KeptThreads`: daemon threads kept to run short jobs one after another; `background`: one
job on a thread of its own, its result asked for later.

why: starting a thread waits until the new thread runs, a scheduling delay of a millisecond or
more on a loaded machine; a job handed to a thread kept idle starts without that wait. A job
that never ends keeps its thread (the next job gets another); daemon threads never hold up an
exit. A forked child (the warm process's commands) starts with none of its parent's threads.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

__all__ = ["KeptThreads", "background"]

_T = TypeVar("_T")


def background(job: Callable[[], _T], name: str) -> Future[_T]:
    """`job` run on a daemon thread of its own; its result (or its error) when asked."""
    future: Future[_T] = Future()

    def run() -> None:
        try:
            future.set_result(job())
        except BaseException as err:  # handed to whoever asks for the result
            future.set_exception(err)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


class KeptThreads:
    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[queue.SimpleQueue[Callable[[], None]]] = []
        os.register_at_fork(after_in_child=self._forget)

    @property
    def idle(self) -> int:
        """Threads waiting for a job."""
        with self._lock:
            return len(self._idle)

    def run(self, job: Callable[[], None]) -> None:
        """Run `job` on an idle thread, or on a new one when none is idle. A job that raises
        ends its thread, as it would a thread of its own."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name=self.name, daemon=True).start()
        inbox.put(job)

    def _serve(self, inbox: queue.SimpleQueue[Callable[[], None]]) -> None:
        while True:
            inbox.get()()
            with self._lock:
                self._idle.append(inbox)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._idle = []
