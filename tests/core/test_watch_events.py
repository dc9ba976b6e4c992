"""What wakes `ukc watch`: writes in a session's tree do; reads (opening a file and closing it
unwritten: a build's reads, a pass's own hashing and sending) are not even asked of the kernel.
The trees are watched through inotify directly (`sync.inotify.Trees`), through the `watchdog`
package only where there is none."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import InotifyConstants

from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.watch import Watcher, WatchOptions
from reconciler.sync import feed


def _drain(events: queue.Queue[tuple[Path, bool] | None], wait_s: float) -> list[Path]:
    seen: list[Path] = []
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            item = events.get(timeout=0.05)
        except queue.Empty:
            continue
        if item is not None:
            seen.append(item[0])
    return seen


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    (tmp_path / "session.yaml").write_text("name: web\ndirectory: ./tree\n")
    return tree


def _watcher(tree: Path, *, native: bool) -> Iterator[Watcher]:
    w = Watcher(
        WatchOptions(paths=[tree.parent / "session.yaml"]),
        metros=None,  # type: ignore[arg-type]
        reporter=RecordingReporter(),
        environ={},
    )
    w._native = native
    w._load()
    w._schedule()
    try:
        yield w
    finally:
        if w._trees is not None:
            w._trees.stop()
        if w._observer is not None:
            w._observer.stop()
            w._observer.join(2)
        for s in w._state.sessions.values():
            if s.state_dir is not None:
                feed.detach(s.state_dir)


def _reads_queue_nothing_and_a_write_does(w: Watcher, tree: Path) -> None:
    time.sleep(0.2)  # the watches are in place
    _drain(w._events, 0.1)
    for _ in range(20):
        assert (tree / "a.txt").read_text() == "a\n"
    assert _drain(w._events, 0.5) == []
    (tree / "a.txt").write_text("edited\n")
    assert tree / "a.txt" in _drain(w._events, 2.0)


def test_reading_files_in_a_watched_tree_queues_no_event_and_a_write_does(tree: Path) -> None:
    for w in _watcher(tree, native=True):
        assert w._trees is not None and w._observer is None
        _reads_queue_nothing_and_a_write_does(w, tree)


def test_without_inotify_of_its_own_the_watch_asks_watchdog_for_no_reads(tree: Path) -> None:
    for w in _watcher(tree, native=False):
        emitters = list(w._observer.emitters)
        assert emitters
        for emitter in emitters:
            # the inotify mask: the kernel queues no event for a read
            mask = emitter.get_event_mask_from_filter()
            assert mask & (InotifyConstants.IN_OPEN | InotifyConstants.IN_CLOSE_NOWRITE) == 0
            assert mask & InotifyConstants.IN_CLOSE_WRITE and mask & InotifyConstants.IN_MODIFY
        _reads_queue_nothing_and_a_write_does(w, tree)


def test_all_of_a_writes_events_reach_the_watch_before_its_pass_and_the_last_says_closed(
    tree: Path,
) -> None:
    # why: a write's bytes and its close, noted before the pass starts, leave nothing pending
    # for a second pass a quiet window later
    for w in _watcher(tree, native=True):
        time.sleep(0.1)
        _drain(w._events, 0.1)
        (tree / "a.txt").write_text("edited\n")
        seen = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                item = w._events.get(timeout=0.05)
            except queue.Empty:
                if seen and seen[-1] == (tree / "a.txt", False):
                    break
                continue
            if item is not None:
                seen.append(item)
        assert seen[0] == (tree / "a.txt", True)  # opened with O_TRUNC: being written
        assert seen[-1] == (tree / "a.txt", False)  # closed after writing


def test_lost_events_make_every_tree_walk_and_the_specs_reload(tree: Path) -> None:
    for w in _watcher(tree, native=True):
        [session] = w._state.sessions.values()
        assert session.changes is not None
        session.changes.take()  # what _load noted is taken
        session.changes.settle(index := [1, 2])  # a scan left the index
        assert session.changes.take(index) == set()
        w._lost()
        assert w._events.get(timeout=1) is None  # the loop wakes
        w._recover_lost_events()
        assert w._spec_dirty
        assert session.changes.take(index) is None  # anything may have changed: walk
