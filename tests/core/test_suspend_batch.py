"""A one-shot apply's suspends: one request per metro for all the converged sessions' instances,
their connections dropped first; an instance the platform refuses is a warning for its session
only, a request that fails a warning for each of its sessions."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reconciler.errors import ApiError
from reconciler.reconcile import actions
from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.suspend import suspend_all


class _Metro:
    """A metro API recording its suspend requests; `refuse`: instances it refuses; `down`:
    every request fails."""

    def __init__(self, refuse: Sequence[str] = (), *, down: bool = False) -> None:
        self.refuse = set(refuse)
        self.down = down
        self.requests: list[list[str]] = []

    def suspend_instances(self, names: Sequence[str]) -> dict[str, ApiError]:
        self.requests.append(list(names))
        if self.down:
            raise ApiError("ukc api fra: suspend: failed (503)")
        return {
            n: ApiError(f"suspend instance {n}: failed (code 3: busy)")
            for n in names
            if n in self.refuse
        }


class _Pool:
    """Kept connections; `dropped`: each session dropped, with how many suspend requests
    the metros had had by then."""

    def __init__(self, metros: dict[str, _Metro]) -> None:
        self.metros = metros
        self.dropped: list[tuple[str, int]] = []

    def drop(self, session: str) -> None:
        self.dropped.append((session, sum(len(m.requests) for m in self.metros.values())))


def _suspend(
    tmp_path: Path, metros: dict[str, _Metro], todo: list[actions.SuspendInstance]
) -> tuple[set[str], RecordingReporter, _Pool]:
    registry: Any = SimpleNamespace(get=lambda label: SimpleNamespace(api=metros[label]))
    reporter = RecordingReporter()
    pool: Any = _Pool(metros)
    done = suspend_all(todo, registry, pool, reporter, 8, tmp_path / "status.json")
    return done, reporter, pool


def _todo(*items: tuple[str, str]) -> list[actions.SuspendInstance]:
    return [actions.SuspendInstance(s, f"inst-{s}", metro) for s, metro in items]


def test_one_request_per_metro_after_every_connection_is_dropped(tmp_path: Path) -> None:
    fra, dal = _Metro(), _Metro()
    todo = _todo(("a", "fra"), ("b", "fra"), ("c", "dal"), ("d", "fra"))
    done, reporter, pool = _suspend(tmp_path, {"fra": fra, "dal": dal}, todo)
    assert done == {"a", "b", "c", "d"}
    assert fra.requests == [["inst-a", "inst-b", "inst-d"]] and dal.requests == [["inst-c"]]
    assert sorted(pool.dropped) == [("a", 0), ("b", 0), ("c", 0), ("d", 0)]
    said = {e.session: e.text for e in reporter.events}
    assert all(t.startswith("suspended instance") for t in said.values()), said


def test_a_refused_instance_is_a_warning_for_its_session_only(tmp_path: Path) -> None:
    todo = _todo(("a", "fra"), ("b", "fra"))
    done, reporter, _ = _suspend(tmp_path, {"fra": _Metro(refuse=["inst-b"])}, todo)
    assert done == {"a"}
    said = {e.session: e.text for e in reporter.events}
    assert said["a"].startswith("suspended instance inst-a")
    assert said["b"].startswith("warning: instance inst-b not suspended (it stays up)")
    assert "busy" in said["b"]


def test_a_failed_request_is_a_warning_for_each_of_its_sessions(tmp_path: Path) -> None:
    todo = _todo(("a", "fra"), ("b", "fra"))
    done, reporter, _ = _suspend(tmp_path, {"fra": _Metro(down=True)}, todo)
    assert done == set()
    said = [(e.session, e.text) for e in reporter.events]
    assert [s for s, t in said if "not suspended (it stays up)" in t] == ["a", "b"], said
