"""A delete needs the sessions' names, never their trees: `build_session(scan=False)` (what
`ukc delete` observes with) reads nothing of the local tree."""

from __future__ import annotations

from pathlib import Path

from reconciler.reconcile.desired import Group, build_session, load_groups
from tests.support.planning import OWNER


def _group(tmp_path: Path, files: int) -> Group:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(files):
        (tree / f"f{i}.txt").write_text(f"file {i}\n")
    spec = tmp_path / "session.yaml"
    spec.write_text("name: gone\ndirectory: ./tree\ncommands: ['true']\n")
    [group] = load_groups([spec], {})
    return group


def test_a_session_observed_for_a_delete_reads_nothing_of_its_tree(tmp_path: Path) -> None:
    group = _group(tmp_path, files=3)
    [loaded] = group.sessions
    ctx, halted = build_session(group, loaded, OWNER, {}, b"salt", scan=False)
    assert halted is None
    assert ctx.manifest is None
    assert (ctx.desired.tree.files, ctx.desired.tree.bytes, ctx.desired.tree.uploads) == (0, 0, ())
    # nothing of a scan was left behind either (its index lives in the session's sync state)
    assert not any((tmp_path / ".ukc").rglob("index*"))


def test_the_same_session_observed_for_an_apply_scans_its_tree(tmp_path: Path) -> None:
    group = _group(tmp_path, files=3)
    [loaded] = group.sessions
    ctx, halted = build_session(group, loaded, OWNER, {}, b"salt")
    assert halted is None and ctx.manifest is not None
    assert ctx.desired.tree.files == 3 and len(ctx.desired.tree.uploads) == 3
    assert any((tmp_path / ".ukc").rglob("index*"))
