"""Paths a watcher saw change, so that a scan re-stats those instead of walking the tree.

Whoever watches a session's tree (`ukc watch`) attaches a feed under the session's sync state
dir and notes what changed; `scan_local` takes what a feed holds. A feed narrows a scan only
when the index is the one the previous scan through it left (nothing else wrote it since: the
same file, inode and length; journals are only appended to or replaced whole);
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
from reconciler.sync.keeper import Keeper

__all__ = ["ChangeFeed", "attach", "detach", "feed_for", "tracking", "use_keeper"]


class ChangeFeed:
    """Relative paths noted since the last `take` (thread-safe: events arrive on another
    thread than the scan's). With `inotify`, the scan itself watches each directory it lists,
    and `take` first collects what the kernel queued. With a `keeper` (another process that
    keeps the tree watched), `take` asks it instead."""

    def __init__(
        self,
        inotify: Inotify | None = None,
        keeper: tuple[Keeper, str, str, tuple[str, ...]] | None = None,
    ) -> None:
        self._lock = threading.Lock()
        self._paths: set[str] = set()
        # a feed of its own knows nothing before its first scan; a keeper may know already
        self._all = keeper is None
        #: the index (inode, length) the last scan through this feed left. Not its state: a
        #: feed holding 100,000 loaded entries kept them alive through a sync-back (~40 MB)
        self.ident: list[int] | None = None
        self.inotify = inotify
        #: (keeper, state dir, root, paths never scanned) and the token of the scan in progress
        self.keeper = keeper
        self._token: int | None = None

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

    def note_dir(self, rel: str) -> None:
        """A directory appeared (the scan that finds it new walks it)."""
        self.note(rel)

    def take(self, ident: list[int] | None = None) -> set[str] | None:
        """What changed since the last scan through this feed, if it left the index `ident`
        (its inode and length); None: anything may have."""
        if self.inotify is not None:
            self.inotify.pump()
        with self._lock:
            paths, everything = self._paths, self._all
            self._paths, self._all = set(), False
        if self.keeper is not None:
            keeper, state_dir, root, skip = self.keeper
            try:
                self._token, kept = keeper.take(state_dir, root, ident, skip)
            except OSError:
                self._token, kept = None, None  # the keeper is gone: walk
            return None if kept is None or everything else kept | paths
        if everything or ident is None or self.ident != ident:
            return None
        return paths

    def settle(self, ident: list[int] | None) -> None:
        """The scan ended and left the index `ident` (its inode and length)."""
        self.ident = list(ident) if self.keeper is None and ident is not None else None
        if self.keeper is not None and self._token is not None:
            keeper, state_dir, _root, _skip = self.keeper
            token, self._token = self._token, None
            with contextlib.suppress(OSError):
                keeper.done(state_dir, token, ident)


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


_KEEPER: list[Keeper] = []


def use_keeper(keeper: Keeper | None) -> None:
    """Scans in `tracking` blocks ask `keeper` (a process that keeps trees watched between
    commands) what changed, instead of watching for themselves."""
    _KEEPER[:] = [keeper] if keeper is not None else []


@contextlib.contextmanager
def tracking(
    sessions: Iterable[tuple[Path, Path, tuple[str, ...]]], *, watch: bool = True
) -> Iterator[None]:
    """For the block, scans of these sessions (state dir, local root, the sync-back paths
    under it, which no scan enters) re-stat only what
    changed since the previous scan: told by the keeper (`use_keeper`), else (`watch`) watched
    by the scans themselves (inotify) from the first scan on (an apply's converged round; a
    block that scans once, `ukc plan`, gains nothing from that). Sessions that already have a
    feed (a running `ukc watch`) keep it."""
    keeper = _KEEPER[0] if _KEEPER else None
    ino = inotify.shared() if keeper is None and watch else None
    mine: list[tuple[Path, ChangeFeed]] = []
    if keeper is not None or ino is not None:
        with _LOCK:
            for d, root, skip in sessions:
                d = Path(d)
                if d not in _FEEDS:
                    kept = (keeper, str(d), str(root), skip) if keeper is not None else None
                    _FEEDS[d] = ChangeFeed(ino, kept)
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
