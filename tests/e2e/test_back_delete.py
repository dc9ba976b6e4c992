"""`sync.back_delete` end to end: a deletion in the sandbox reaches the local directory, and
only for files sync-back brought home, on the same instance, with the guards reported."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: mirror
directory: ./work
commands:
  - name: build
    run: {run}
sync:
  back: ["out/"]
  back_delete: true
"""

BUILD = "mkdir -p out/logs && cp input.txt out/a.txt && cp input.txt out/b.txt && date > out/logs/x"


def sync_of(ukc: Ukc) -> dict[str, Any]:
    rec: dict[str, Any] = ukc.status()["sessions"]["mirror"]
    assert rec["phase"] == "Ready", rec
    sync: dict[str, Any] = rec["sync"]
    return sync


def test_a_file_deleted_in_the_sandbox_is_removed_here_and_an_emptied_back_dir_halts_it(
    ukc: Ukc,
) -> None:
    work = ukc.project / "work"
    work.mkdir()
    (work / "input.txt").write_text("hello\n")
    ukc.write_spec(SPEC.format(run=BUILD))
    ukc.run("apply", "session.yaml", check=0)
    assert sorted(p.name for p in (work / "out").iterdir()) == ["a.txt", "b.txt", "logs"]
    (work / "out" / "mine.txt").write_text("the user's own file\n")

    # the sandbox deletes b.txt and logs/: both go here too, the user's file stays
    ukc.write_spec(SPEC.format(run="rm -rf out/b.txt out/logs && cp input.txt out/a.txt"))
    plan = ukc.run("plan", "session.yaml", check=0).stdout
    assert "mirrors deletions of files it brought back" in plan
    proc = ukc.run("apply", "session.yaml", check=0)
    assert "removed here, deleted in the sandbox: out/b.txt" in proc.stdout + proc.stderr
    assert sorted(p.name for p in (work / "out").iterdir()) == ["a.txt", "mine.txt"]
    sync = sync_of(ukc)
    assert (sync["pulled_deleted"], sync["deletes_kept"], sync["deletes_skipped"]) == (2, [], [])

    # the sandbox empties out/ altogether: more often an accident, so nothing is deleted
    ukc.write_spec(SPEC.format(run="rm -rf out && mkdir out"))
    ukc.run("apply", "session.yaml", check=0)
    assert sorted(p.name for p in (work / "out").iterdir()) == ["a.txt", "mine.txt"]
    sync = sync_of(ukc)
    assert sync["pulled_deleted"] == 0
    assert len(sync["deletes_skipped"]) == 1
    assert sync["deletes_skipped"][0].startswith("out/ is empty in the sandbox")
