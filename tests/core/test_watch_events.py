"""What wakes `ukc watch`: writes in a session's tree do; reads (opening a file and closing it
unwritten: a build's reads, a pass's own hashing and sending) are not even asked of the kernel."""

from __future__ import annotations

import queue
import time
from pathlib import Path

from watchdog.observers.inotify_c import InotifyConstants

from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.watch import Watcher, WatchOptions


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


def test_reading_files_in_a_watched_tree_queues_no_event_and_a_write_does(
    tmp_path: Path,
) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "a.txt").write_text("a\n")
    spec = tmp_path / "session.yaml"
    spec.write_text("name: web\ndirectory: ./tree\n")
    w = Watcher(
        WatchOptions(paths=[spec]),
        metros=None,  # type: ignore[arg-type]
        reporter=RecordingReporter(),
        environ={},
    )
    w._load()
    w._schedule()
    try:
        emitters = list(w._observer.emitters)
        assert emitters
        for emitter in emitters:
            # the inotify mask: the kernel queues no event for a read
            mask = emitter.get_event_mask_from_filter()
            assert mask & (InotifyConstants.IN_OPEN | InotifyConstants.IN_CLOSE_NOWRITE) == 0
            assert mask & InotifyConstants.IN_CLOSE_WRITE and mask & InotifyConstants.IN_MODIFY
        time.sleep(0.2)  # the watches are in place
        _drain(w._events, 0.1)
        for _ in range(20):
            assert (tree / "a.txt").read_text() == "a\n"
        assert _drain(w._events, 0.5) == []
        (tree / "a.txt").write_text("edited\n")
        assert tree / "a.txt" in _drain(w._events, 2.0)
    finally:
        w._observer.stop()
        w._observer.join(2)
