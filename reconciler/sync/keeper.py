"""Trees kept watched between commands, so a one-shot scan re-stats what changed since the last
one instead of walking the tree.

A long-lived process (the warm process, between the commands it forks) holds a `TreeKeeper`:
inotify watches on every directory of each tree a command scanned, and per session the paths
changed since. A command's scan asks (`take`) with the identity of the index it loaded (the
journal's inode and length); the keeper answers with the changed paths only when it vouches
for exactly that index: it watched the tree before the scan that wrote it began, and heard
nothing it could not name (no queue overflow, no refused watch). Otherwise the answer is
"everything" and the scan walks. After the scan, `done` tells it which index now stands.

Paths taken by a command that never says `done` (it died) are handed out again. A directory
that appears is watched at once with everything under it, and named with a trailing "/": a
scan walks it afresh, since changes inside it before its watch existed have no event.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from reconciler.sync.inotify import Inotify

__all__ = ["MAX_DIRS", "MAX_PENDING", "Keeper", "TreeKeeper"]

#: a tree with more directories is not kept (inotify watches are a per-user budget)
MAX_DIRS = 50_000
#: more changed paths than this: "everything" (a walk costs less than re-stating them all)
MAX_PENDING = 100_000


class Keeper(Protocol):
    """What a scan asks (a client of a `TreeKeeper`, possibly in another process)."""

    def take(
        self, state_dir: str, root: str, ident: list[int] | None, skip: Sequence[str] = ()
    ) -> tuple[int, set[str] | None]:
        """`skip`: paths under the root that are never scanned (sync-back paths: a sync-back
        writes there, and its events would only bury the ones that matter). Returns
        (token, changed paths since the index `ident`, or None: anything may have)."""
        ...

    def done(self, state_dir: str, token: int, ident: list[int] | None) -> None:
        """The scan that took `token` ended, leaving the index `ident`."""
        ...


@dataclass
class _Kept:
    root: str
    #: the index this tree's changes are counted from; None: not vouched for
    ident: list[int] | None = None
    pending: set[str] = field(default_factory=set)
    everything: bool = True
    inflight: dict[int, set[str]] = field(default_factory=dict)
    dirs: int = 0
    keeper: TreeKeeper | None = None

    #: paths never scanned: not watched, their events dropped
    skip: tuple[str, ...] = ()

    def note(self, rel: str) -> None:
        if self.everything or self.skipped(rel):
            return
        self.pending.add(rel)
        if len(self.pending) > MAX_PENDING:
            self.note_all()

    def note_all(self) -> None:
        self.everything = True
        self.pending.clear()

    def skipped(self, rel: str) -> bool:
        return any(rel == p or rel.startswith(p + "/") for p in self.skip)

    def note_dir(self, rel: str) -> None:
        """A directory appeared: watch what is under it, and have it walked afresh."""
        if self.keeper is not None and not self.everything and not self.skipped(rel):
            self.keeper.watch_tree(self, os.path.join(self.root, rel), rel)
            self.note(rel + "/")


class TreeKeeper:
    """The keeper's side: watches and pending paths by session state dir. Not thread-safe:
    one thread (the warm process's loop) calls it."""

    def __init__(self, inotify: Inotify) -> None:
        self.inotify = inotify
        self.trees: dict[str, _Kept] = {}
        self._tokens = itertools.count(1)
        #: scans answered with the paths changed (no walk), and with "everything"
        self.named = 0
        self.everything = 0

    def pump(self) -> None:
        self.inotify.pump()

    def take(
        self, state_dir: str, root: str, ident: list[int] | None, skip: Sequence[str] = ()
    ) -> tuple[int, set[str] | None]:
        self.pump()
        skip = tuple(skip)
        token = next(self._tokens)
        kept = self.trees.get(state_dir)
        # "everything" may mean watches were lost (the root replaced, a queue overflow, a
        # refused watch): start over, watching the tree as it is now
        if kept is None or kept.root != root or kept.everything or kept.skip != skip:
            if kept is not None:
                self.inotify.forget(kept)
            kept = _Kept(root, keeper=self, skip=skip)
            self.trees[state_dir] = kept
            kept.everything = False
            # watched before the scan that follows lists anything: nothing falls between
            if not self.watch_tree(kept, root, ""):
                self.inotify.forget(kept)
                del self.trees[state_dir]
                self.everything += 1
                return token, None
            kept.inflight[token] = set()
            self.everything += 1
            return token, None
        answer: set[str] | None
        if ident is None or kept.ident != ident:
            answer = None
            self.everything += 1
        else:
            self.named += 1
            answer = set(kept.pending)
            for earlier in kept.inflight.values():
                answer |= earlier  # taken by a scan that never said it was done
        kept.inflight[token] = set(kept.pending)
        kept.pending = set()
        kept.everything = False
        kept.ident = None
        return token, answer

    def done(self, state_dir: str, token: int, ident: list[int] | None) -> None:
        self.pump()
        kept = self.trees.get(state_dir)
        if kept is None or kept.inflight.pop(token, None) is None:
            return
        if kept.inflight:
            kept.ident = None  # another scan is running: which index stands is not known
            return
        kept.ident = list(ident) if ident is not None else None

    def request(self, req: dict[str, Any]) -> dict[str, Any]:
        """One request of the wire form (`{"op": "tree-take" | "tree-done", ...}`)."""
        state_dir, op = str(req.get("state_dir", "")), req.get("op")
        ident = _ident(req.get("ident"))
        if op == "tree-take":
            raw = req.get("skip")
            skip = [p for p in raw if isinstance(p, str)] if isinstance(raw, list) else []
            token, paths = self.take(state_dir, str(req.get("root", "")), ident, skip)
            return {"token": token, "paths": None if paths is None else sorted(paths)}
        given = req.get("token")
        if op == "tree-done" and type(given) is int:
            self.done(state_dir, given, ident)
        return {}

    def watch_tree(self, kept: _Kept, path: str, rel: str) -> bool:
        """Watch `path` and every directory under it (not following links); False (and the
        tree marked "everything") when the kernel refused a watch or the tree is too big."""
        stack = [(path, rel)]
        # why link counts: listing every directory to find the ones below is most of watching
        # a big tree (and the first scan of a tree waits for it). A directory's count is
        # 2 + its subdirectories where the filesystem keeps it so (ext4, xfs, tmpfs; others
        # say 1): a count of 2 is trusted once a listing of this tree agreed with its count,
        # per filesystem (a mount inside the tree may be one whose counts mean something else)
        counted: dict[int, bool] = {}
        while stack:
            p, r = stack.pop()
            if r and kept.skipped(r):
                continue
            kept.dirs += 1
            if kept.dirs > MAX_DIRS or not self.inotify.watch(p, r, kept):
                kept.note_all()
                return False
            try:
                # read once watched: a subdirectory made after it has an event of its own
                st = os.lstat(p)
                links, agreed = st.st_nlink, counted.get(st.st_dev)
                if agreed and links == 2:
                    continue  # no subdirectory: nothing to list
                found = 0
                with os.scandir(p) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            found += 1
                            stack.append((e.path, f"{r}/{e.name}" if r else e.name))
                if agreed is None and found:
                    counted[st.st_dev] = links == 2 + found
            except OSError:
                continue  # gone meanwhile: its parent's event names it
        return True


def _ident(raw: object) -> list[int] | None:
    if isinstance(raw, list) and len(raw) == 2 and all(type(v) is int for v in raw):
        return [int(v) for v in raw]
    return None
