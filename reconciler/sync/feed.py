"""Paths a watcher saw change, so that a scan re-stats those instead of walking the tree.

Whoever watches a session's tree (`ukc watch`) attaches a feed under the session's sync state
dir and notes what changed; `scan_local` takes what a feed holds. A feed narrows a scan only
when the index is the one the previous scan through it left (nothing else wrote it since);
it starts out, and falls back to, "everything": a new feed, a scan that failed, the periodic
resync, a changed ignore file. Events that arrive while a scan runs stay for the next one.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from reconciler.sync import inotify
from reconciler.sync.inotify import Inotify

__all__ = ["ChangeFeed", "attach", "detach", "feed_for", "tracking"]


class ChangeFeed:
    """Relative paths noted since the last `take` (thread-safe: events arrive on another
    thread than the scan's). With `inotify`, the scan itself watches each directory it lists,
    and `take` first collects what the kernel queued."""

    def __init__(self, inotify: Inotify | None = None) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        self._all = True
        #: the index state the last scan through this feed left (compared by identity)
        self.basis: object | None = None
        self.inotify = inotify

    def watch(self, path: str, rel_dir: str) -> None:
        """Watch a directory the scan is about to list (see `inotify`)."""
        if self.inotify is not None and not self.inotify.watch(path, rel_dir, self):
            self.note_all()  # no events from there: the next scan must walk

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
        if self.inotify is not None:
            self.inotify.pump()
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


@contextlib.contextmanager
def tracking(state_dirs: Iterable[Path]) -> Iterator[None]:
    """For the block, scans of these sessions watch what they list (inotify), so a later scan
    in the block re-stats only what changed since (an apply's converged round). Sessions that
    already have a feed (a running `ukc watch`) keep it."""
    ino = inotify.shared()
    mine: list[tuple[Path, ChangeFeed]] = []
    if ino is not None:
        with _LOCK:
            for d in state_dirs:
                d = Path(d)
                if d not in _FEEDS:
                    _FEEDS[d] = ChangeFeed(ino)
                    mine.append((d, _FEEDS[d]))
    try:
        yield
    finally:
        with _LOCK:
            for d, f in mine:
                if _FEEDS.get(d) is f:
                    del _FEEDS[d]
        for _d, f in mine:
            if f.inotify is not None:
                f.inotify.forget(f)
