"""`journal.read_meta` remembers the metadata it read from a journal's tail: a watch pass asks
for the push record's three times. What it remembers must never outlive the bytes it came from."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.sync import journal


def _line(n: int) -> str:
    return '{"seq":0,"meta":{"digest":"d' + str(n) + '"},"base":1}\n'


def test_a_journal_appended_to_gives_its_new_metadata(tmp_path: Path) -> None:
    path = tmp_path / "push.jnl"
    path.write_text(_line(1))
    assert journal.read_meta(path) == {"digest": "d1"}
    with open(path, "a") as f:
        f.write(_line(2))
    assert journal.read_meta(path) == {"digest": "d2"}


def test_a_journal_replaced_by_one_of_the_same_length_gives_the_new_metadata(
    tmp_path: Path,
) -> None:
    path = tmp_path / "push.jnl"
    path.write_text(_line(1))
    assert journal.read_meta(path) == {"digest": "d1"}
    other = tmp_path / "push.jnl.tmp"
    other.write_text(_line(2))
    os.replace(other, path)
    assert journal.read_meta(path) == {"digest": "d2"}


def test_a_caller_changing_the_metadata_it_got_changes_nobody_elses(tmp_path: Path) -> None:
    path = tmp_path / "push.jnl"
    path.write_text(_line(1))
    first = journal.read_meta(path)
    assert first is not None
    first["digest"] = "tampered"
    assert journal.read_meta(path) == {"digest": "d1"}


def test_a_journal_removed_has_no_metadata(tmp_path: Path) -> None:
    path = tmp_path / "push.jnl"
    path.write_text(_line(1))
    assert journal.read_meta(path) == {"digest": "d1"}
    path.unlink()
    assert journal.read_meta(path) is None
