"""Applies through the warm process, which keeps the tree watched between them: whatever
changed in between reaches the sandbox, and nothing else is looked at."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconciler.cli import warm
from reconciler.sync.records import PUSH_RECORD
from tests.support.synctree import snapshot
from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: kept
directory: ./work
"""


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_changes_between_warm_applies_all_reach_the_sandbox(ukc: Ukc) -> None:
    work = ukc.project / "work"
    for i in range(30):
        p = work / f"d{i % 3}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content {i}\n")
    ukc.write_spec(SPEC)
    assert "UKC_WARM" not in ukc.env()
    ukc.run("apply", "session.yaml", check=0)
    ws = ukc.workspace(ukc.status()["sessions"]["kept"]["instance"]["uuid"])
    edits = [
        lambda: (work / "d0" / "f0.txt").write_text("edited\n"),
        lambda: (work / "d1" / "f1.txt").unlink(),
        lambda: (work / "d2").rename(work / "renamed"),
        lambda: (
            (work / "new" / "deep").mkdir(parents=True),
            (work / "new/deep/x.txt").write_text("x"),
        ),
        lambda: (
            shutil.rmtree(work / "renamed"),
            (work / "renamed").mkdir(),
            (work / "renamed/y").write_text("y"),
        ),
        lambda: os.chmod(work / "d0" / "f3.txt", 0o600),
    ]
    for edit in edits:
        edit()
        ukc.run("apply", "session.yaml", check=0)
        assert _files(ws) == _files(work)
    assert snapshot(ws) == snapshot(work)
    # the warm process (the suite's) kept the tree watched for the applies
    path = warm.socket_path(ukc.env())
    assert path is not None
    answer = warm.status(path)
    assert answer is not None and answer["trees_kept"] >= 1


def test_plan_through_the_warm_process_is_told_what_changed_instead_of_walking(
    ukc: Ukc,
) -> None:
    work = ukc.project / "work"
    for i in range(20):
        p = work / f"d{i % 2}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content {i}\n")
    ukc.write_spec(SPEC)
    ukc.run("apply", "session.yaml", check=0)
    path = warm.socket_path(ukc.env())
    assert path is not None
    (work / "d1" / "f3.txt").write_text("edited\n")
    before = warm.status(path)
    assert before is not None
    plan = ukc.run("plan", "session.yaml", "--detailed-exitcode", check=2).stdout
    assert "send 1 file(s)" in plan and "d1/f3.txt" in plan
    after = warm.status(path)
    assert after is not None
    assert after["scans_named"] == before["scans_named"] + 1
    assert after["scans_walked"] == before["scans_walked"]
    # and the apply after it is told the same (the plan's scan left an index it vouches for)
    ukc.run("apply", "session.yaml", check=0)
    assert _files(ukc.workspace(ukc.status()["sessions"]["kept"]["instance"]["uuid"])) == (
        _files(work)
    )
    last = warm.status(path)
    assert last is not None and last["scans_walked"] == after["scans_walked"]


def test_a_path_named_between_warm_applies_but_unchanged_pushes_nothing_and_the_next_edit_arrives(
    ukc: Ukc,
) -> None:
    """The keeper's word starts the push's connection and helper before the scan looks (a
    running instance: `suspend: false`); when the path turns out unchanged, that helper is a
    head start no push uses, and the next apply's push runs as ever."""
    work = ukc.project / "work"
    for i in range(10):
        p = work / f"d{i % 2}" / f"f{i}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(f"content {i}\n")
    ukc.write_spec(SPEC + "suspend: false\n")
    ukc.run("apply", "session.yaml", check=0)
    ukc.run("apply", "session.yaml", check=0)  # the keeper now vouches for the index
    ws = ukc.workspace(ukc.status()["sessions"]["kept"]["instance"]["uuid"])
    record = ukc.project / ".ukc" / "sync" / "kept" / PUSH_RECORD
    pushed = record.stat()
    path = work / "d1" / "f3.txt"
    st = path.stat()
    path.write_text("content 3\n")  # written back as it was
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    (work / "d0" / "scratch.tmp").write_text("gone before the apply")
    (work / "d0" / "scratch.tmp").unlink()
    ukc.run("apply", "session.yaml", check=0)
    again = record.stat()
    assert (again.st_ino, again.st_size) == (pushed.st_ino, pushed.st_size), "it pushed"
    ukc.run("plan", "session.yaml", "--detailed-exitcode", check=0)
    (work / "d0" / "f4.txt").write_text("edited\n")
    ukc.run("apply", "session.yaml", check=0)
    assert _files(ws) == _files(work)
    assert snapshot(ws) == snapshot(work)
