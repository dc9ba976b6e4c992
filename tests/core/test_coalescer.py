"""The watch coalescer decides when a dirty session is due; time is passed in, never read."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.watch import Coalescer, Watcher, WatchOptions, _SessionPaths


def test_the_first_event_after_idle_fires_at_once() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0)
    c.note("a", 10.0)
    assert c.due(10.0) == {"a"}
    assert c.due(10.0) == set()


def test_a_burst_right_after_a_pass_waits_for_a_quiet_window() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0)
    c.note("a", 10.0)
    assert c.due(10.0) == {"a"}
    for i in range(500):
        c.note("a", 10.01 + i * 0.0002)
    assert c.due(10.12) == set()
    assert c.next_deadline() is not None
    assert c.due(10.3) == {"a"}
    assert c.due(10.4) == set()


def test_a_constant_stream_of_writes_still_fires_after_the_maximum_wait() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=1.0)
    c.note("a", 0.0)
    c.due(0.0)
    fired = []
    t = 0.05
    while t < 3.0:
        c.note("a", t)
        if c.due(t):
            fired.append(round(t, 2))
        t += 0.05
    assert fired and fired[0] <= 1.1
    assert len(fired) <= 3


def test_sessions_are_coalesced_independently() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0)
    c.note("a", 1.0)
    c.note("b", 1.0)
    assert c.due(1.0) == {"a", "b"}
    c.note("a", 1.05)
    assert c.pending() == {"a"}
    assert c.due(1.25) == {"a"}


def test_nothing_pending_means_no_deadline() -> None:
    assert Coalescer().next_deadline() is None


def test_a_file_still_being_written_fires_at_its_close_not_at_its_first_event() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0, open_grace_s=0.02)
    c.note("a", 10.0, "/t/f.txt", writing=True)  # the truncation of open(O_TRUNC)
    assert c.due(10.0) == set()
    c.note("a", 10.001, "/t/f.txt", writing=False)  # closed: the bytes are there
    assert c.due(10.001) == {"a"}


def test_a_write_that_closes_in_the_same_burst_fires_at_once() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0, open_grace_s=0.02)
    c.note("a", 10.0, "/t/f.txt", writing=True)
    c.note("a", 10.0, "/t/f.txt", writing=True)
    c.note("a", 10.0, "/t/f.txt", writing=False)
    assert c.due(10.0) == {"a"}


def test_a_file_held_open_fires_after_the_grace_not_after_a_quiet_window() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0, open_grace_s=0.02)
    c.note("a", 10.0, "/t/app.log", writing=True)
    assert c.due(10.01) == set()
    assert c.next_deadline() == pytest.approx(10.02)
    assert c.due(10.021) == {"a"}


def test_one_file_still_open_holds_the_leading_edge_until_it_closes() -> None:
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0, open_grace_s=0.02)
    c.note("a", 10.0, "/t/one.txt", writing=True)
    c.note("a", 10.0, "/t/two.txt", writing=True)
    c.note("a", 10.001, "/t/one.txt", writing=False)
    assert c.due(10.001) == set()
    c.note("a", 10.002, "/t/two.txt", writing=False)
    assert c.due(10.002) == {"a"}


def test_an_edit_whose_bytes_are_there_fires_at_once_and_an_emptied_file_waits_for_its_close(
    tmp_path: Path,
) -> None:
    now = [10.0]
    w = Watcher(
        WatchOptions(paths=[]),
        metros=None,  # type: ignore[arg-type]
        reporter=RecordingReporter(),
        environ={},
        clock=lambda: now[0],
    )
    w._state.sessions["s"] = _SessionPaths("s", tmp_path, (), lambda rel, is_dir: False)
    f = tmp_path / "f.txt"
    f.write_text("new bytes")
    w._note(f, True)  # the truncation's event, read once the bytes were written
    assert w.coalescer.due(now[0]) == {"s"}
    now[0] = 11.0
    f.write_text("")  # truncated, its bytes not written yet
    w._note(f, True)
    assert w.coalescer.due(now[0]) == set()
    w._note(f, False)  # closed
    assert w.coalescer.due(now[0]) == {"s"}


def test_a_resync_that_covered_a_pending_session_leaves_its_next_edit_on_the_leading_edge() -> None:
    # the periodic resync takes every pending session along; an edit after it (once the quiet
    # window since then passed) is sent at once, not after a quiet window
    c = Coalescer(quiet_s=0.15, max_wait_s=2.0)
    c.note("a", 10.0)
    assert c.due(10.0) == {"a"}
    c.note("a", 10.01)  # the write's close, after the leading edge fired
    assert c.flush(10.05) == {"a"}
    assert c.next_deadline() is None
    c.note("a", 10.6)
    assert c.due(10.6) == {"a"}
