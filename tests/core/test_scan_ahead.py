"""The apply's work while a new instance boots: the trees are scanned, then, until the
sessions' sandboxes answer, the big files a first push digests as it sends them are digested
(the push takes those digests: `tests/sync/test_push.py::TestDigestedAhead`)."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.reconcile.desired import Group, load_groups
from reconciler.reconcile.observe import scan_ahead
from reconciler.sync import push


def _group(tmp_path: Path) -> Group:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(2 << 20))
    (tree / "small.txt").write_text("small\n")
    spec = tmp_path / "session.yaml"
    spec.write_text("name: boots\ndirectory: ./tree\ncommands: ['true']\n")
    [group] = load_groups([spec], {})
    return group


def _digested() -> list[str]:
    with push._AHEAD_LOCK:
        return sorted(Path(file).name for file, _size, _mtime in push._AHEAD)


def test_the_big_files_are_digested_while_the_sandboxes_do_not_answer_yet(
    tmp_path: Path,
) -> None:
    scan_ahead(_group(tmp_path), until=lambda: False)
    assert _digested() == ["big.bin"]


def test_nothing_is_digested_once_the_sandboxes_answer(tmp_path: Path) -> None:
    group = _group(tmp_path)
    scan_ahead(group, until=lambda: False)  # an earlier apply's digests are not kept
    scan_ahead(group, until=lambda: True)
    assert _digested() == []
    assert any((tmp_path / ".ukc").rglob("index*"))  # the scan itself was made
