"""Events: what apply, delete and watch say while they work, and who they say it to.

The executor emits events to a `Reporter`; it never prints. The command line's reporters
render them (`cli.render`); `RecordingReporter` keeps them (`--output json`, tests). Secrets
are redacted before any text reaches a reporter.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

__all__ = ["Event", "RecordingReporter", "Reporter"]


@dataclass(frozen=True)
class Event:
    session: str
    kind: str  # "action" | "done" | "failed" | "output" | "info" | "session"
    text: str
    stream: str = ""


class Reporter(Protocol):
    def event(self, event: Event) -> None: ...

    def close(self) -> None: ...


class RecordingReporter:
    """Keeps every event; for `--output json` and tests."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._lock = threading.Lock()

    def event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def close(self) -> None:
        return None
