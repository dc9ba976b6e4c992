"""Property: random trees and random edits -> after a push the remote equals local minus
excludes and back paths, nothing outside the remote root changed, and a repeat sends nothing."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.errors import SyncHaltedError
from reconciler.sync.diff import diff_manifests
from reconciler.sync.engine import plan_push, push, scan_local
from reconciler.sync.ignore import load_rules
from reconciler.sync.manifest import last_push_record
from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import Site, snapshot

NAMES = ("a", "b", "c.tmp", "out", "d")
EXCLUDE = ("*.tmp",)
BACK = ("out/",)

# a node: ("f", content, mode) | ("l", target) | ("d", {name: node})
contents = st.sampled_from([b"", b"x", b"hello", b"hello world\n", bytes(range(256)) * 40])
modes = st.sampled_from([0o644, 0o600, 0o755, 0o700])
targets = st.sampled_from(["a", "../b", "/etc/passwd", "d/a", "nowhere"])


def trees(depth: int = 3) -> st.SearchStrategy[dict[str, tuple[object, ...]]]:
    leaf = st.one_of(
        st.tuples(st.just("f"), contents, modes),
        st.tuples(st.just("l"), targets),
    )
    if depth == 0:
        node = leaf
    else:
        node = st.one_of(leaf, st.tuples(st.just("d"), st.deferred(lambda: trees(depth - 1))))
    return st.dictionaries(st.sampled_from(NAMES), node, max_size=4)


def realize(root: Path, tree: dict[str, tuple[object, ...]]) -> None:
    """Turn `root` into `tree` by editing in place (delete, swap, modify, chmod, create)."""
    root.mkdir(exist_ok=True)
    for name in os.listdir(root):
        p = root / name
        want = tree.get(name)
        is_dir = p.is_dir() and not p.is_symlink()
        kind = "d" if is_dir else ("l" if p.is_symlink() else "f")
        if want is None or want[0] != kind or kind == "l":
            shutil.rmtree(p) if is_dir else p.unlink()
    for name, node in tree.items():
        p = root / name
        if node[0] == "f":
            data, mode = node[1], node[2]
            assert isinstance(data, bytes) and isinstance(mode, int)
            if not p.exists() or p.read_bytes() != data:
                p.write_bytes(data)
            p.chmod(mode)
        elif node[0] == "l":
            os.symlink(str(node[1]), p)
        else:
            sub = node[1]
            assert isinstance(sub, dict)
            realize(p, sub)


def visible(site: Site, root: Path) -> dict[str, tuple[object, ...]]:
    rules = load_rules(site.opts(exclude=EXCLUDE, back=BACK))
    out = {}
    for rel, value in snapshot(root).items():
        parts = rel.split("/")
        hidden = any(
            rules.excluded("/".join(parts[: i + 1]), i < len(parts) - 1 or value[0] == "d")
            for i in range(len(parts))
        )
        if not hidden:
            out[rel] = value[:3] if value[0] == "f" else value
    return out


def sandbox_site(base: Path) -> Site:
    """A sandbox's workspace and boot id under `base`, reached through a local shell."""
    (base / "sandbox/workspace").mkdir(parents=True)
    (base / "sandbox/boot_id").write_text("boot-1")
    return Site(
        base,
        base / "local",
        base / "sandbox/workspace",
        base / "state",
        base / "sandbox/run/ukc-sync",
        base / "sandbox/boot_id",
        LocalShell(),
    )


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    first=trees(),
    second=trees(),
    third=trees(),
    reboots=st.lists(st.booleans(), min_size=3, max_size=3),
)
def test_after_each_push_the_remote_mirrors_the_local_tree(
    first: dict[str, tuple[object, ...]],
    second: dict[str, tuple[object, ...]],
    third: dict[str, tuple[object, ...]],
    reboots: list[bool],
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "outside").mkdir()
        (base / "outside/sentinel").write_text("keep")
        site = sandbox_site(base)
        shell = site.shell
        opts = site.opts(exclude=EXCLUDE, back=BACK)
        ours = (site.local, site.remote, site.state, site.remote_state.parent, site.boot)
        outside_before = snapshot(base, skip=ours)
        try:
            for i, tree in enumerate((first, second, third)):
                realize(site.local, tree)
                if reboots[i]:
                    site.reboot(f"boot-{i + 2}")
                remote_before = snapshot(site.remote)
                try:
                    result = push(shell, opts, instance_uuid="u")
                except SyncHaltedError:
                    # the emptied-root guard: only when nothing is left to sync, and then the
                    # sandbox is untouched
                    assert i > 0 and visible(site, site.local) == {}
                    assert snapshot(site.remote) == remote_before
                    continue
                assert visible(site, site.remote) == visible(site, site.local)
                assert result.remote_scanned or not (reboots[i] or i == 0)
                again = push(shell, opts, instance_uuid="u")
                assert (again.bytes_sent, again.remote_scanned) == (0, False)
            assert snapshot(base, skip=ours) == outside_before
        finally:
            shell.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(st.tuples(trees(), trees()), min_size=2, max_size=3))
def test_scans_between_pushes_plan_what_the_whole_push_record_would(
    steps: list[tuple[dict[str, tuple[object, ...]], dict[str, tuple[object, ...]]]],
) -> None:
    """Each step: a tree scanned without a push (`ukc plan`), then another tree pushed. The
    plan read from the index lines since the last push equals the diff against the whole
    push record, and the push makes the remote mirror the local tree."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        site = sandbox_site(base)
        shell = site.shell
        opts = site.opts(exclude=EXCLUDE, back=BACK)
        rules = load_rules(opts)
        try:
            for between, pushed_tree in steps:
                for tree in (between, pushed_tree):
                    realize(site.local, tree)
                    try:
                        local = scan_local(opts)
                    except SyncHaltedError:
                        break  # the emptied-root guard: no plan, no push
                    plan = plan_push(local, opts)
                    record = last_push_record(opts)
                    if record is not None:
                        whole = diff_manifests(local, record[0], rules)
                        assert (plan.uploads, plan.metas, plan.deletes, plan.replaces) == (
                            whole.uploads,
                            whole.metas,
                            whole.deletes,
                            whole.replaces,
                        )
                else:
                    push(shell, opts, instance_uuid="u", local=local)
                    assert visible(site, site.remote) == visible(site, site.local)
        finally:
            shell.close()
