"""The watch coalescer decides when a dirty session is due; time is passed in, never read."""

from __future__ import annotations

from reconciler.reconcile.watch import Coalescer


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
