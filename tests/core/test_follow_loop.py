"""The follower's loop without a metro: a check that fails on the status file does not end
it, suspend skips the fetch, and a stop ends the wait between checks."""

from __future__ import annotations

from pathlib import Path

from reconciler.cloud.metros import MetroRegistry
from reconciler.reconcile import follow
from reconciler.reconcile.events import RecordingReporter
from reconciler.spec.gitsource import GitSource
from tests.support.gitrepo import Repo

ENV = {"PATH": "/usr/bin:/bin"}


def follower(tmp_path: Path, **options: object) -> tuple[follow.Follower, RecordingReporter]:
    repo = Repo(tmp_path / "repo")
    repo.commit("one", {"specs/a.yaml": "name: a\n"})
    source = GitSource(str(repo.path), "main", tmp_path / "state", environ=ENV)
    reporter = RecordingReporter()
    made = follow.Follower(
        source,
        follow.FollowOptions(path="specs", interval_s=0.05, **options),  # type: ignore[arg-type]
        metros=MetroRegistry(ENV),
        reporter=reporter,
        environ=ENV,
    )
    return made, reporter


def test_a_check_that_fails_on_the_status_file_does_not_end_the_follower(tmp_path: Path) -> None:
    made, reporter = follower(tmp_path)
    made.source.checkout(made.source.fetch())
    status = made.source.work_tree / "specs" / ".ukc" / "status.json"
    status.parent.mkdir()
    status.write_text("{not json")
    checks = {"n": 0}
    original = made.check

    def counted() -> follow.Attempt:
        checks["n"] += 1
        if checks["n"] == 3:
            made.stop()
        return original()

    made.check = counted  # type: ignore[method-assign]
    assert made.run() == 0
    assert checks["n"] == 3
    failures = [e.text for e in reporter.events if e.kind == "failed"]
    assert len(failures) == 3 and all("unreadable" in f for f in failures)
    assert made.run(once=True) == 1


def test_a_suspended_follower_does_not_even_fetch(tmp_path: Path) -> None:
    made, reporter = follower(tmp_path)
    follow.suspend(made.source.state_dir, "maintenance")
    assert made.run(once=True) == 0
    assert not (made.source.git_dir / "refs" / "ukc").exists()
    assert any("suspended" in e.text for e in reporter.events)
    assert follow.resume(made.source.state_dir) and not follow.resume(made.source.state_dir)
