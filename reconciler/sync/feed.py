"""Paths a watcher saw change, so that a scan re-stats those instead of walking the tree.

Whoever watches a session's tree (`ukc watch`) attaches a feed under the session's sync state
dir and notes what changed; `scan_local` takes what a feed holds. A feed narrows a scan only
when the index is the one the previous scan through it left (nothing else wrote it since);
it starts out, and falls back to, "everything": a new feed, a scan that failed, the periodic
resync, a changed ignore file. Events that arrive while a scan runs stay for the next one.
"""

from __future__ import annotations

import threading
from pathlib import Path

__all__ = ["ChangeFeed", "attach", "detach", "feed_for"]


class ChangeFeed:
    """Relative paths noted since the last `take` (thread-safe: events arrive on another
    thread than the scan's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._all = True
        #: the index state the last scan through this feed left (compared by identity)
        self.basis: object | None = None

    def note(self, rel: str) -> None:
        with self._lock:
            if rel in ("", "."):
                self._all = True
            elif not self._all:
                self._paths.add(rel)

    def note_all(self) -> None:
        with self._lock:
            self._all = True
            self._paths.clear()

    def take(self) -> set[str] | None:
        """What changed since the last take; None: anything may have."""
        with self._lock:
            paths, everything = self._paths, self._all
            self._paths, self._all = set(), False
        return None if everything else paths


_FEEDS: dict[Path, ChangeFeed] = {}
_LOCK = threading.Lock()


def attach(state_dir: Path) -> ChangeFeed:
    """The feed of the session whose sync state lives in `state_dir` (made on first use)."""
    with _LOCK:
        return _FEEDS.setdefault(Path(state_dir), ChangeFeed())


def detach(state_dir: Path) -> None:
    with _LOCK:
        _FEEDS.pop(Path(state_dir), None)


def feed_for(state_dir: Path) -> ChangeFeed | None:
    with _LOCK:
        return _FEEDS.get(Path(state_dir))
