"""A tree keeper (the warm process between commands) tells a command's scan what changed since
the index it vouches for, and nothing when it cannot vouch."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.sync import feed, journal
from reconciler.sync.engine import push
from reconciler.sync.inotify import Inotify
from reconciler.sync.keeper import TreeKeeper
from reconciler.sync.manifest import Manifest, scan_local
from reconciler.sync.records import INDEX, PUSH_RECORD
from tests.support.synctree import Site, edit_at_random, write


@pytest.fixture
def keeper() -> Iterator[TreeKeeper]:
    ino = Inotify.open()
    if ino is None:
        pytest.skip("no inotify here")
    k = TreeKeeper(ino)
    feed.use_keeper(k)
    yield k
    feed.use_keeper(None)
    ino.close()


def _command_scan(site: Site, **kw: object) -> Manifest:
    """A scan as one command runs it: a process of its own (nothing cached), tracked."""
    journal._CACHE.clear()
    opts = site.opts(**kw)
    with feed.tracking([(opts.state_dir, site.local, opts.back_paths())]):
        return scan_local(site.opts(**kw))


def _ident(site: Site) -> list[int]:
    j = journal.load(site.state / INDEX)
    assert j.ident is not None
    return j.ident


def test_the_keeper_names_what_changed_between_commands(site: Site, keeper: TreeKeeper) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "d" / "b.txt", "b")
    _command_scan(site)  # the first: everything, and the tree watched from before it
    write(site.local / "d" / "b.txt", "b changed")
    token, paths = keeper.take(str(site.state), str(site.local), _ident(site))
    assert paths == {"d/b.txt"}
    keeper.done(str(site.state), token, _ident(site))


def test_another_index_than_the_one_vouched_for_gets_everything(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "a.txt", "a")
    _command_scan(site)
    ident = _ident(site)
    _, paths = keeper.take(str(site.state), str(site.local), [ident[0], ident[1] + 1])
    assert paths is None


def test_paths_taken_by_a_command_that_died_are_named_again(site: Site, keeper: TreeKeeper) -> None:
    write(site.local / "a.txt", "a")
    _command_scan(site)
    write(site.local / "a.txt", "a changed")
    keeper.take(str(site.state), str(site.local), _ident(site))  # and never `done`
    write(site.local / "b.txt", "b")
    _, paths = keeper.take(str(site.state), str(site.local), _ident(site))
    assert paths is None  # a scan may be running: which index stands is not known
    # a command that does finish makes the next answer exact again
    got = _command_scan(site)
    assert got.entries["a.txt"].size == len("a changed") and "b.txt" in got.entries


def test_a_new_directory_is_walked_afresh(site: Site, keeper: TreeKeeper) -> None:
    write(site.local / "a.txt", "a")
    _command_scan(site)
    write(site.local / "new" / "deep" / "x.txt", "x")
    keeper.pump()  # the keeper sees the directory and watches it
    write(site.local / "new" / "deep" / "y.txt", "y")
    got = _command_scan(site)
    assert {"new/deep/x.txt", "new/deep/y.txt"} <= set(got.entries)


def test_a_command_scan_after_no_change_looks_at_nothing(site: Site, keeper: TreeKeeper) -> None:
    write(site.local / "a.txt", "a")
    _command_scan(site)
    token, paths = keeper.take(str(site.state), str(site.local), _ident(site))
    assert paths == set()
    keeper.done(str(site.state), token, _ident(site))


@pytest.mark.parametrize("seed", range(3))
def test_keeper_narrowed_scans_equal_full_walks(site: Site, keeper: TreeKeeper, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(40):
        write(site.local / f"d{i % 4}" / f"s{i % 3}" / f"f{i}.txt", f"content {i}")
    _command_scan(site)

    def later(d: Path) -> None:
        if rng.random() < 0.5:
            keeper.pump()
            write(d / "later.txt", "written once the keeper watched it")

    for step in range(12):
        edit_at_random(site.local, rng, step, later)
        got = _command_scan(site)
        whole = scan_local(site.opts(state_dir=site.base / f"full-{step}"))
        assert dict(got.entries) == dict(whole.entries), f"step {step}"
        assert got.digest == Manifest(dict(whole.entries)).digest


def test_an_unchanged_tree_is_answered_from_the_index_without_parsing_it(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "d" / "b.txt", "b")
    first = _command_scan(site)
    _command_scan(site)  # the keeper now vouches for this index
    again = _command_scan(site)
    entries = again.entries
    assert isinstance(entries, journal.Snapshot) and entries._entries is None
    assert again.digest == first.digest and again.file_count == 2
    assert dict(entries) == dict(first.entries)  # parsed when asked for


def test_a_push_after_an_unchanged_scan_appends_to_its_record(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "a.txt", "a")
    push(site.shell, site.opts(), instance_uuid="u1")
    _command_scan(site)
    _command_scan(site)
    write(site.local / "a.txt", "a changed")
    local = _command_scan(site)
    record = site.state / PUSH_RECORD
    before = record.stat()
    result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
    assert result.files_sent == 1 and not result.remote_scanned
    after = record.stat()
    assert after.st_ino == before.st_ino and after.st_size > before.st_size
    assert (site.remote / "a.txt").read_text() == "a changed"


def test_a_root_replaced_between_commands_is_watched_anew(site: Site, keeper: TreeKeeper) -> None:
    write(site.local / "a.txt", "a")
    _command_scan(site)
    # the directory is replaced by another one under the same name (the watches were on the
    # old one)
    other = site.base / "other"
    write(other / "a.txt", "a")
    write(other / "sub" / "b.txt", "b")
    shutil.rmtree(site.local)
    other.rename(site.local)
    _command_scan(site)  # a walk: the keeper heard the root go
    _command_scan(site)
    write(site.local / "sub" / "b.txt", "b changed")
    got = _command_scan(site)
    assert got.entries["sub/b.txt"].size == len("b changed")


def test_what_a_sync_back_writes_is_neither_watched_nor_named(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "a.txt", "a")
    _command_scan(site, back=("out/",))
    _command_scan(site, back=("out/",))
    for i in range(50):
        write(site.local / "out" / f"d{i % 5}" / f"f{i}.txt", "output")
    write(site.local / "a.txt", "a changed")
    ident = _ident(site)
    token, paths = keeper.take(str(site.state), str(site.local), ident, ("out",))
    assert paths == {"a.txt"}
    keeper.done(str(site.state), token, ident)


def test_a_path_no_longer_excluded_is_found_though_nothing_changed_on_disk(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "logs/b.log", "b")
    assert "logs/b.log" not in _command_scan(site, exclude=("*.log",))
    assert "logs/b.log" in _command_scan(site)
    # and excluded again: gone from the manifest (a push would then leave it alone)
    assert "logs/b.log" not in _command_scan(site, exclude=("*.log",))
    # the rules unchanged since: the keeper's answer stands again (no walk needed)
    assert "logs/b.log" not in _command_scan(site, exclude=("*.log",))


def test_a_new_sync_back_path_leaves_the_manifest_though_nothing_changed_on_disk(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "src/a.txt", "a")
    write(site.local / "out/old.txt", "from an earlier run")
    assert "out/old.txt" in _command_scan(site)
    assert "out/old.txt" not in _command_scan(site, back=("out/",))


def test_a_pull_after_a_keeper_told_scan_leaves_the_index_unloaded_and_the_next_scan_told(
    site: Site, keeper: TreeKeeper
) -> None:
    from reconciler.sync.engine import pull

    for i in range(20):
        write(site.local / "src" / f"f{i}.txt", f"local {i}")
    write(site.remote / "out" / "r.txt", "result")
    opts = site.opts(back=("out/",))
    journal._CACHE.clear()
    with feed.tracking([(opts.state_dir, site.local, opts.back_paths())]):
        scan_local(opts)
        assert (site.state / INDEX) in journal._CACHE
        pull(site.shell, opts, instance_uuid="3f1c9a2e-0002")
        # the scan's 100,000 entries (here 20) are not carried through the pull
        assert (site.state / INDEX) not in journal._CACHE
        write(site.local / "src" / "f3.txt", "changed")
        named, walked = keeper.named, keeper.everything
        after = scan_local(opts)
    assert (keeper.named, keeper.everything) == (named + 1, walked)  # told, no walk
    assert after.entries["src/f3.txt"].size == len("changed")
    assert (site.local / "out" / "r.txt").read_text() == "result"


def _hints_of_a_command_scan(site: Site, **kw: object) -> tuple[int, Manifest]:
    """A command's scan (as `_command_scan`) and the change hints it gave."""
    journal._CACHE.clear()
    opts = site.opts(**kw)
    calls: list[int] = []
    with feed.tracking([(opts.state_dir, site.local, opts.back_paths())]):
        local = scan_local(opts, on_change=lambda: calls.append(1))
    return len(calls), local


def _pushed_and_kept(site: Site, **kw: object) -> Manifest:
    push(site.shell, site.opts(**kw), instance_uuid="u1")
    _command_scan(site, **kw)
    return _command_scan(site, **kw)  # the keeper now vouches for this index


def test_a_path_the_keeper_names_gives_the_hint_before_it_is_looked_at(
    site: Site, keeper: TreeKeeper
) -> None:
    """The push's connection opens on the keeper's word, not once the file is hashed; a path
    named that turns out unchanged costs that head start and nothing else."""
    write(site.local / "a.txt", "a")
    write(site.local / "d" / "b.txt", "b")
    before = _pushed_and_kept(site)
    path = site.local / "d" / "b.txt"
    st = path.stat()
    path.write_text("b")  # written back as it was: named, not changed
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    hints, local = _hints_of_a_command_scan(site)
    assert hints == 1
    assert local.key == before.key
    assert dict(local.entries) == dict(before.entries)


def test_paths_the_keeper_names_under_an_excluded_directory_give_no_hint(
    site: Site, keeper: TreeKeeper
) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "build" / "x" / "o.bin", "o")
    write(site.local / "notes.log", "n")
    _pushed_and_kept(site, exclude=("build/", "*.log"))
    write(site.local / "build" / "x" / "o.bin", "o changed")
    write(site.local / "build" / "new.bin", "new")
    write(site.local / "notes.log", "more")
    hints, _ = _hints_of_a_command_scan(site, exclude=("build/", "*.log"))
    assert hints == 0
    write(site.local / "a.txt", "a changed")
    hints, local = _hints_of_a_command_scan(site, exclude=("build/", "*.log"))
    assert hints == 1 and local.entries["a.txt"].size == len("a changed")


def _probed_base(entries: object) -> journal.Probed[object]:
    """The probed index under a narrowed scan's entries (failing when they are not that)."""
    assert isinstance(entries, journal.Overlay), type(entries)
    base = entries.base
    assert isinstance(base, journal.Probed), type(base)
    return base


def test_one_file_changed_between_commands_reads_only_its_entries_from_the_index(
    site: Site, keeper: TreeKeeper
) -> None:
    for i in range(60):
        write(site.local / f"d{i % 3}" / f"f{i}.txt", f"content {i}")
    push(site.shell, site.opts(), instance_uuid="u1")
    _command_scan(site)
    _command_scan(site)  # the keeper now vouches for this index
    write(site.local / "d1" / "f4.txt", "changed")
    local = _command_scan(site)
    result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
    assert result.files_sent == 1 and not result.remote_scanned
    assert (site.remote / "d1" / "f4.txt").read_text() == "changed"
    # the scan, the plan and the push looked up the file and its directory, nothing else
    assert not _probed_base(local.entries).parsed
    whole = scan_local(site.opts(state_dir=site.base / "full"))
    assert dict(local.entries) == dict(whole.entries)
    assert local.digest == Manifest(dict(whole.entries)).digest
    # and the next command's scan finds the index it left whole and right
    write(site.local / "d2" / "f5.txt", "changed too")
    again = _command_scan(site)
    assert not _probed_base(again.entries).parsed
    journal._CACHE.clear()
    index = journal.load(site.state / INDEX)
    assert dict(index.entries) == dict(again.entries)
    assert index.inos == {p: os.lstat(site.local / p).st_ino for p in index.entries}


def test_a_new_directory_between_commands_is_read_from_the_index_by_its_prefix(
    site: Site, keeper: TreeKeeper
) -> None:
    for i in range(30):
        write(site.local / f"d{i % 3}" / f"f{i}.txt", f"content {i}")
    _command_scan(site)
    _command_scan(site)
    write(site.local / "new" / "deep" / "x.txt", "x")
    got = _command_scan(site)
    assert not _probed_base(got.entries).parsed
    assert {"new", "new/deep", "new/deep/x.txt"} <= set(got.entries)
    # a directory removed and made again under the same name: its old paths are dropped
    shutil.rmtree(site.local / "new")
    write(site.local / "new" / "other.txt", "o")
    got = _command_scan(site)
    whole = scan_local(site.opts(state_dir=site.base / "full"))
    assert dict(got.entries) == dict(whole.entries)


def test_a_probe_of_many_paths_reads_the_index_whole(site: Site, keeper: TreeKeeper) -> None:
    for i in range(journal.PROBE_MAX + 10):
        write(site.local / f"f{i}.txt", f"content {i}")
    _command_scan(site)
    _command_scan(site)
    for i in range(journal.PROBE_MAX + 10):
        write(site.local / f"f{i}.txt", f"changed {i}")
    got = _command_scan(site)
    assert isinstance(got.entries, dict)
    assert got.entries["f3.txt"].size == len("changed 3")


def test_a_tree_watched_by_its_link_counts_names_changes_at_every_depth(
    site: Site, keeper: TreeKeeper
) -> None:
    """The keeper lists only directories whose link count says they hold directories: what
    changes in the others (leaves at any depth, a directory made in a leaf) is named still."""
    for a in range(3):
        write(site.local / f"a{a}" / "top.txt", "t")
        for b in range(3):
            write(site.local / f"a{a}" / f"b{b}" / "mid.txt", "m")
            for c in range(2):
                write(site.local / f"a{a}" / f"b{b}" / f"c{c}" / "leaf.txt", "l")
    _command_scan(site)
    _command_scan(site)  # the keeper now vouches for this index
    write(site.local / "a2" / "b1" / "c0" / "leaf.txt", "leaf changed")
    write(site.local / "a0" / "b2" / "mid.txt", "mid changed")
    write(site.local / "a1" / "b0" / "c1" / "new" / "x.txt", "in a new directory")
    token, paths = keeper.take(str(site.state), str(site.local), _ident(site))
    keeper.done(str(site.state), token, None)
    assert paths is not None
    assert {"a2/b1/c0/leaf.txt", "a0/b2/mid.txt"} <= paths
    assert "a1/b0/c1/new/" in paths
