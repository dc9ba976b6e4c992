"""`TransportPool`: kept connections, and connections opened ahead of need (`prefetch`)."""

from __future__ import annotations

import threading

from reconciler.transport.base import Transport
from reconciler.transport.pool import TransportPool


class FakeShell:
    def __init__(self, name: str) -> None:
        self.name = name
        self.active = True
        self.closed = False

    def start(self, command: str) -> object:
        raise AssertionError("not used")

    def close(self) -> None:
        self.closed = True
        self.active = False


def as_transport(shell: FakeShell) -> Transport:
    return shell  # type: ignore[return-value]


def test_take_waits_for_a_prefetch_in_flight_and_returns_its_connection() -> None:
    pool = TransportPool()
    gate = threading.Event()
    shell = FakeShell("prefetched")

    def opener() -> Transport:
        gate.wait(5)
        return as_transport(shell)

    pool.prefetch("s1", "uuid-1", opener)
    threading.Timer(0.05, gate.set).start()
    assert pool.take("s1", "uuid-1") is shell
    assert not shell.closed


def test_a_failed_prefetch_leaves_nothing_and_the_executor_connects_itself() -> None:
    pool = TransportPool()

    def opener() -> Transport:
        raise OSError("refused")

    pool.prefetch("s1", "uuid-1", opener)
    assert pool.take("s1", "uuid-1") is None


def test_a_prefetch_for_another_instance_is_closed_not_handed_out() -> None:
    pool = TransportPool()
    old = FakeShell("old instance")
    pool.prefetch("s1", "uuid-old", lambda: as_transport(old))
    assert pool.take("s1", "uuid-new") is None
    assert old.closed


def test_no_second_connection_is_opened_while_one_is_kept_or_coming() -> None:
    pool = TransportPool()
    opened: list[str] = []

    def opener() -> Transport:
        opened.append("x")
        return as_transport(FakeShell("x"))

    pool.keep("kept", "u", as_transport(FakeShell("kept")))
    pool.prefetch("kept", "u", opener)
    gate = threading.Event()

    def slow() -> Transport:
        gate.wait(5)
        return opener()

    pool.prefetch("coming", "u", slow)
    pool.prefetch("coming", "u", opener)
    gate.set()
    assert pool.take("coming", "u") is not None
    assert opened == ["x"]


def test_closing_the_pool_closes_prefetched_connections_nobody_took() -> None:
    pool = TransportPool()
    shells = [FakeShell("a"), FakeShell("b")]
    pool.prefetch("a", "u", lambda: as_transport(shells[0]))
    pool.prefetch("b", "u", lambda: as_transport(shells[1]))
    pool.close()
    assert all(s.closed for s in shells)
