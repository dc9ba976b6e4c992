"""The apply's work while a new instance boots: the trees are scanned, then, until the
sessions' sandboxes answer, the big files a first push digests as it sends them are digested
(the push takes those digests: `tests/sync/test_push.py::TestDigestedAhead`)."""

from __future__ import annotations

import os
from pathlib import Path

from reconciler.reconcile.desired import Group, load_groups
from reconciler.reconcile.observe import scan_ahead
from reconciler.sync.engine import DigestsAhead


def _group(tmp_path: Path) -> Group:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "big.bin").write_bytes(os.urandom(2 << 20))
    (tree / "small.txt").write_text("small\n")
    spec = tmp_path / "session.yaml"
    spec.write_text("name: boots\ndirectory: ./tree\ncommands: ['true']\n")
    [group] = load_groups([spec], {})
    return group


def _digested(ahead: DigestsAhead) -> list[str]:
    return sorted(Path(file).name for file, _size, _mtime in ahead.files())


def test_the_big_files_are_digested_while_the_sandboxes_do_not_answer_yet(
    tmp_path: Path,
) -> None:
    ahead = DigestsAhead()
    scan_ahead(_group(tmp_path), until=lambda: False, ahead=ahead)
    assert _digested(ahead) == ["big.bin"]


def test_nothing_is_digested_once_the_sandboxes_answer(tmp_path: Path) -> None:
    group = _group(tmp_path)
    ahead = DigestsAhead()
    scan_ahead(group, until=lambda: False, ahead=ahead)  # an earlier pass's are not kept
    scan_ahead(group, until=lambda: True, ahead=ahead)
    assert _digested(ahead) == []
    assert any((tmp_path / ".ukc").rglob("index*"))  # the scan itself was made
