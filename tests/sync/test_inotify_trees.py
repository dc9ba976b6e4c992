"""`inotify.Trees`: whole trees watched by one thread of their own (`ukc watch`); directories
that appear are watched with what is under them, and one that moved away no longer speaks
for its old paths."""

from __future__ import annotations

import os
import queue
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.sync import inotify
from reconciler.sync.inotify import Trees


class _Seen:
    def __init__(self) -> None:
        self.events: queue.Queue[tuple[str, bool]] = queue.Queue()
        self.lost = 0

    def deliver(self, path: str, writing: bool) -> None:
        self.events.put((path, writing))

    def overflow(self) -> None:
        self.lost += 1

    def paths(self, wait_s: float = 0.5) -> set[str]:
        out: set[str] = set()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                out.add(self.events.get(timeout=0.02)[0])
            except queue.Empty:
                continue
        return out


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[tuple[Trees, _Seen, Path]]:
    root = tmp_path / "root"
    (root / "old" / "deep").mkdir(parents=True)
    seen = _Seen()
    trees = Trees.open(seen.deliver, seen.overflow)
    assert trees is not None
    assert trees.add(str(root), True)
    try:
        yield trees, seen, root
    finally:
        trees.stop()


def test_a_file_deep_in_the_tree_is_seen(watched: tuple[Trees, _Seen, Path]) -> None:
    _trees, seen, root = watched
    (root / "old" / "deep" / "f.txt").write_text("x")
    assert str(root / "old" / "deep" / "f.txt") in seen.paths()


def test_a_write_in_directories_made_after_the_watch_began_is_seen(
    watched: tuple[Trees, _Seen, Path],
) -> None:
    # the inner directories are made before the watch of the outer one is in place: its walk
    # finds them
    _trees, seen, root = watched
    os.makedirs(root / "new" / "a" / "b")
    assert str(root / "new") in seen.paths()
    (root / "new" / "a" / "b" / "f.txt").write_text("x")
    assert str(root / "new" / "a" / "b" / "f.txt") in seen.paths()


def test_a_directory_moved_within_the_tree_speaks_for_its_new_paths_only(
    watched: tuple[Trees, _Seen, Path],
) -> None:
    _trees, seen, root = watched
    os.rename(root / "old", root / "moved")
    assert {str(root / "old"), str(root / "moved")} <= seen.paths()
    (root / "moved" / "deep" / "f.txt").write_text("x")
    paths = seen.paths()
    assert str(root / "moved" / "deep" / "f.txt") in paths
    assert not any(p.startswith(str(root / "old")) for p in paths)


def test_a_directory_moved_out_of_the_tree_is_no_longer_heard(
    watched: tuple[Trees, _Seen, Path], tmp_path: Path
) -> None:
    _trees, seen, root = watched
    os.rename(root / "old", tmp_path / "outside")
    assert str(root / "old") in seen.paths()
    (tmp_path / "outside" / "deep" / "f.txt").write_text("x")
    assert seen.paths() == set()


def test_a_queue_overflow_says_events_were_lost(watched: tuple[Trees, _Seen, Path]) -> None:
    trees, seen, _root = watched
    trees._handle(struct.pack("iIII", -1, inotify.IN_Q_OVERFLOW, 0, 0))
    assert seen.lost == 1


def test_a_stopped_watch_delivers_nothing_more(watched: tuple[Trees, _Seen, Path]) -> None:
    trees, seen, root = watched
    trees.stop()
    (root / "f.txt").write_text("x")
    assert seen.paths() == set()
    assert seen.lost == 0


def test_a_watch_stopped_in_a_slow_delivery_delivers_nothing_more_and_leaves_the_next_inotify_alone(
    tmp_path: Path,
) -> None:
    # A rename queues two events at once (moved from, moved to): the reader is held inside
    # the first one's delivery while the watch is stopped. Its descriptors then must stay its
    # own: closed by `stop`, their numbers go to the next inotify instance opened, and the
    # reader's next step (watching the directory moved in) would add watches to that one.
    root = tmp_path / "root"
    (root / "old" / "deep").mkdir(parents=True)
    entered, release = threading.Event(), threading.Event()
    delivered: list[str] = []

    def deliver(path: str, writing: bool) -> None:
        delivered.append(path)
        entered.set()
        release.wait(10)

    trees = Trees.open(deliver, lambda: None)
    assert trees is not None
    before = set(threading.enumerate())
    assert trees.add(str(root), True)
    [reader] = [t for t in threading.enumerate() if t not in before and t.name == "ukc-inotify"]
    os.rename(root / "old", root / "moved")
    assert entered.wait(5)
    trees.stop()
    stopped_with = list(delivered)
    other = inotify._open()
    assert other is not None
    other_fd, libc = other
    try:
        assert libc.inotify_add_watch(other_fd, os.fsencode(tmp_path), inotify.MASK) >= 0
        release.set()
        reader.join(5)
        assert not reader.is_alive()
        assert delivered == stopped_with == [str(root / "old")]
        # inotify queues an event within the write itself: none is pending for `other` but
        # what it watches (tmp_path, unchanged)
        (root / "moved" / "f.txt").write_text("x")
        (root / "moved" / "deep" / "g.txt").write_text("x")
        with pytest.raises(BlockingIOError):
            os.read(other_fd, 1 << 16)
    finally:
        release.set()
        os.close(other_fd)
