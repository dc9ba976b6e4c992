"""`ukc watch` as a real process: its output collected, its passes counted, stopped with
Ctrl-C."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable

from tests.support.ukc import Ukc

__all__ = ["WatchProcess"]


class WatchProcess:
    def __init__(self, ukc: Ukc, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "watch", *args],
            cwd=ukc.project,
            env=ukc.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.lines.append(line.rstrip("\n"))

    def passes(self) -> int:
        with self._lock:
            return sum(1 for line in self.lines if re.search(r"\] pass \d+ done", line))

    def idle(self) -> bool:
        """The last thing the watcher said is that a pass finished."""
        with self._lock:
            said = [line for line in self.lines if line.strip()]
        return bool(said) and re.search(r"\] pass \d+ done", said[-1]) is not None

    def output(self) -> str:
        with self._lock:
            return "\n".join(self.lines)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"condition not met in {timeout}s; watch output:\n{self.output()}")

    def settle(self, quiet_s: float = 1.0, timeout: float = 60.0) -> int:
        """Wait until a pass finished and no other pass started for `quiet_s`; the pass count."""
        deadline = time.monotonic() + timeout
        while True:
            self.wait_for(self.idle, timeout=timeout)
            settled = self.passes()
            time.sleep(quiet_s)
            if (self.passes() == settled and self.idle()) or time.monotonic() > deadline:
                return settled

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait()
        return self.proc.returncode
