"""The controller's own terminal as a `transport.base.Terminal` for `ukc ssh`: standard input
and output by file descriptor, raw mode while a session runs, window changes from SIGWINCH."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import termios
import threading
import tty
from collections.abc import Iterator
from types import FrameType

__all__ = ["StdioTerminal"]


class StdioTerminal:
    """Descriptors 0, 1 and 2 (or others, for tests of this class itself)."""

    def __init__(self, stdin: int = 0, stdout: int = 1, stderr: int = 2) -> None:
        self._in, self._out, self._err = stdin, stdout, stderr
        self._resized = threading.Event()

    def size(self) -> tuple[int, int] | None:
        if not (os.isatty(self._in) and os.isatty(self._out)):
            return None
        try:
            cols, rows = os.get_terminal_size(self._out)
        except OSError:
            return None
        return cols, rows

    def term(self) -> str:
        return os.environ.get("TERM") or "xterm-256color"

    @contextlib.contextmanager
    def raw(self) -> Iterator[None]:
        if self.size() is None:
            yield
            return
        saved = termios.tcgetattr(self._in)

        def winch(signum: int, frame: FrameType | None) -> None:
            self._resized.set()

        previous = signal.signal(signal.SIGWINCH, winch)
        # why TCSANOW: the default (TCSAFLUSH) drops what the user typed while we connected
        tty.setraw(self._in, termios.TCSANOW)
        try:
            yield
        finally:
            termios.tcsetattr(self._in, termios.TCSADRAIN, saved)
            signal.signal(signal.SIGWINCH, previous)

    def read(self, timeout_s: float) -> bytes | None:
        try:
            ready, _, _ = select.select([self._in], [], [], timeout_s)
        except InterruptedError:
            return None
        if not ready:
            return None
        return os.read(self._in, 65536)

    def write(self, data: bytes) -> None:
        _write_all(self._out, data)

    def write_err(self, data: bytes) -> None:
        _write_all(self._err, data)

    def resized(self) -> bool:
        if self._resized.is_set():
            self._resized.clear()
            return True
        return False


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
