"""Reporters: how apply/watch tell a person (or a machine) what is happening.

The executor emits events to a `Reporter`; it never prints. Three implementations:
`PlainReporter` (one line per event, `[session]` prefixed, for pipes and CI logs),
`LiveReporter` (a redrawn per-session table on a TTY, command output streamed above it) and
`RecordingReporter` (keeps events; used by `--output json` and by tests).
Secrets are redacted before any text reaches a reporter.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol, TextIO

__all__ = [
    "Event",
    "LiveReporter",
    "PlainReporter",
    "RecordingReporter",
    "Reporter",
]


@dataclass(frozen=True)
class Event:
    session: str
    kind: str  # "action" | "done" | "failed" | "output" | "info" | "session"
    text: str
    stream: str = ""


class Reporter(Protocol):
    def event(self, event: Event) -> None: ...

    def close(self) -> None: ...


class PlainReporter:
    """One line per event; command output lines prefixed with the session name."""

    def __init__(self, out: TextIO | None = None, *, quiet: bool = False) -> None:
        self._out = out or sys.stdout
        self._quiet = quiet
        self._lock = threading.Lock()
        self._partial: dict[tuple[str, str], str] = {}

    def event(self, event: Event) -> None:
        with self._lock:
            if event.kind == "output":
                key = (event.session, event.stream)
                text = self._partial.pop(key, "") + event.text
                *lines, rest = text.split("\n")
                if rest:
                    self._partial[key] = rest
                for line in lines:
                    mark = "|" if event.stream == "stdout" else "!"
                    self._out.write(f"[{event.session}] {mark} {line}\n")
            elif not self._quiet or event.kind in ("failed",):
                self._out.write(f"[{event.session}] {event.text}\n")
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            for (session, stream), rest in self._partial.items():
                mark = "|" if stream == "stdout" else "!"
                self._out.write(f"[{session}] {mark} {rest}\n")
            self._partial.clear()
            self._out.flush()


@dataclass
class _Row:
    state: str = "waiting"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class LiveReporter:
    """A live per-session table at the bottom of a TTY; finished lines scroll above it."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._rows: dict[str, _Row] = {}
        self._drawn = 0
        self._lock = threading.Lock()
        self._plain = PlainReporter(self._out)

    def _clear(self) -> None:
        if self._drawn:
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        now = time.monotonic()
        for name, row in self._rows.items():
            took = (row.ended or now) - row.started
            line = f"  {name:<20} {row.state:<10} {took:6.1f}s  {row.detail}"
            self._out.write(line[: width - 1] + "\n")
        self._drawn = len(self._rows)
        self._out.flush()

    def event(self, event: Event) -> None:
        with self._lock:
            row = self._rows.setdefault(event.session, _Row())
            self._clear()
            if event.kind == "action":
                row.state, row.detail = "working", event.text
            elif event.kind == "done":
                row.state, row.detail, row.ended = "ready", event.text, time.monotonic()
            elif event.kind == "failed":
                row.state, row.detail, row.ended = "FAILED", event.text, time.monotonic()
            if event.kind in ("output", "failed", "done", "info", "session"):
                self._plain.event(event)
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self._plain.close()
            self._draw()


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
