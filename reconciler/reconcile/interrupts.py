"""`StopFlag`: "stop starting actions", known the moment Ctrl-C arrives, from any thread.

Why: Python runs signal handlers in the main thread, between bytecodes. While a worker holds
the interpreter lock (an SSH handshake, a sync), the main thread learns of a SIGINT only when
the worker lets go; on a busy machine that was long enough for the worker to finish its
action and start the next one after Ctrl-C. The interpreter's C-level handler writes the
signal number to the wakeup fd at once, whatever thread receives it, so the action-boundary
check reads it there instead of waiting for the main thread.

The apply loop arms one per apply and sets it on KeyboardInterrupt; the executor checks it
before each action.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

__all__ = ["StopFlag"]


class StopFlag:
    """An event that is also set by a SIGINT received while armed."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()  # one reader of the pipe at a time
        self._read_fd: int | None = None
        self._write_fd: int | None = None
        self._previous = -1

    def arm(self) -> bool:
        """Watch for SIGINT from now on; False where that is impossible (not the main thread,
        or SIGINT is not handled by Python): then only `set()` sets it."""
        if signal.getsignal(signal.SIGINT) in (signal.SIG_IGN, signal.SIG_DFL, None):
            return False  # no Python-level handler: the C handler never runs for it
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self._previous = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        except ValueError:  # not the main thread
            os.close(r)
            os.close(w)
            return False
        self._read_fd, self._write_fd = r, w
        return True

    def disarm(self) -> None:
        if self._read_fd is None or self._write_fd is None:
            return
        with contextlib.suppress(ValueError):
            signal.set_wakeup_fd(self._previous)
        self.is_set()  # a SIGINT that came in meanwhile still counts
        with self._lock:
            read_fd, write_fd = self._read_fd, self._write_fd
            self._read_fd = self._write_fd = None
        os.close(read_fd)
        os.close(write_fd)

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        if self._event.is_set():
            return True
        with self._lock:
            if self._read_fd is None:
                return False
            try:
                data = os.read(self._read_fd, 64)
            except OSError:  # empty (non-blocking)
                data = b""
            if int(signal.SIGINT) in data:
                self._event.set()
        return self._event.is_set()

    def __enter__(self) -> StopFlag:
        self.arm()
        return self

    def __exit__(self, *exc: object) -> None:
        self.disarm()
