"""The index and the push record as journals: deltas appended, cut or forked journals trusted
only as far as one writer wrote them, digests moved by what changed."""

from __future__ import annotations

import json
import os
import random
import shutil
import tracemalloc
from pathlib import Path

from reconciler.sync import journal
from reconciler.sync.diff import diff_manifests
from reconciler.sync.engine import plan_push, push
from reconciler.sync.entry import Entry
from reconciler.sync.ignore import load_rules
from reconciler.sync.manifest import Manifest, last_push_record, scan_local
from reconciler.sync.records import INDEX, PUSH_RECORD, TOOLS
from tests.support.synctree import BOTH_PATHS, Site, snapshot, write


def _forget_cache() -> None:
    """What a new process sees: only the files."""
    journal._CACHE.clear()


def _tree(site: Site, n: int = 40) -> None:
    for i in range(n):
        write(site.local / f"d{i % 4}" / f"f{i:03d}.txt", f"content {i}")


class TestIndex:
    def test_one_changed_file_appends_one_short_line_to_the_index(self, site: Site) -> None:
        _tree(site, 200)
        scan_local(site.opts())
        path = site.state / INDEX
        before = path.stat()
        write(site.local / "d1" / "f001.txt", "new content")
        scan_local(site.opts())
        after = path.stat()
        assert after.st_ino == before.st_ino  # appended, not replaced
        assert 0 < after.st_size - before.st_size < 600
        assert len(path.read_bytes().splitlines()) == 3

    def test_an_unchanged_tree_writes_nothing(self, site: Site) -> None:
        _tree(site)
        scan_local(site.opts())
        before = (site.state / INDEX).stat()
        _forget_cache()
        scan_local(site.opts())
        after = (site.state / INDEX).stat()
        assert (after.st_ino, after.st_size, after.st_mtime_ns) == (
            before.st_ino,
            before.st_size,
            before.st_mtime_ns,
        )

    def test_a_new_process_is_not_rehashing_what_the_index_holds(self, site: Site) -> None:
        p = write(site.local / "a.txt", "aaaa")
        first = scan_local(site.opts()).entries["a.txt"].ref
        st = p.stat()
        # same inode, size and mtime but other bytes: only a re-hash could notice
        with open(p, "r+b") as f:
            f.write(b"bbbb")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        _forget_cache()
        assert scan_local(site.opts()).entries["a.txt"].ref == first

    def test_a_file_replaced_by_another_inode_is_rehashed(self, site: Site) -> None:
        p = write(site.local / "a.txt", "aaaa")
        first = scan_local(site.opts()).entries["a.txt"]
        other = write(site.local / "b.tmp", "bbbb")
        os.utime(other, ns=(first.mtime_ns, first.mtime_ns))
        os.replace(other, p)
        assert scan_local(site.opts()).entries["a.txt"].ref != first.ref

    def test_digests_moved_by_the_changes_equal_digests_of_the_whole_tree(self, site: Site) -> None:
        rng = random.Random(7)
        _tree(site, 60)
        os.symlink("d0", site.local / "link")
        for step in range(12):
            files = sorted(p for p in site.local.rglob("*") if p.is_file())
            for _ in range(rng.randint(1, 4)):
                victim = rng.choice(files)
                what = rng.random()
                if what < 0.3:
                    victim.unlink(missing_ok=True)
                elif what < 0.5:
                    victim.chmod(0o600 if rng.random() < 0.5 else 0o644)
                elif what < 0.7:
                    write(site.local / f"new{step}" / f"x{rng.randint(0, 99)}", "new")
                else:
                    write(victim, f"edit {step} {rng.random()}")
            if step % 3 == 0:
                _forget_cache()
            got = scan_local(site.opts())
            whole = Manifest(dict(got.entries))
            assert (got.digest, got.mtimes, got.file_count, got.total_bytes) == (
                whole.digest,
                whole.mtimes,
                whole.file_count,
                whole.total_bytes,
            )

    def test_a_cut_last_line_is_ignored_and_the_next_write_compacts(self, site: Site) -> None:
        _tree(site)
        scan_local(site.opts())
        write(site.local / "d0" / "f000.txt", "changed once")
        scan_local(site.opts())
        path = site.state / INDEX
        data = path.read_bytes()
        path.write_bytes(data[:-5])  # a writer killed mid-append
        _forget_cache()
        j = journal.load(path)
        assert j.exists
        # the state before the cut line: the entry of the changed file is the old one
        assert j.entries["d0/f000.txt"].size == len("content 0")
        got = scan_local(site.opts())
        assert got.entries["d0/f000.txt"].size == len("changed once")
        assert got.digest == Manifest(dict(got.entries)).digest
        _forget_cache()
        again = journal.load(path)
        assert not again.broken and len(path.read_bytes().splitlines()) == 2

    def test_two_writers_at_once_leave_a_journal_trusted_only_up_to_the_fork(
        self, site: Site
    ) -> None:
        path = site.state / "x.jnl"
        a = journal.load(path)
        a.write({"p": Entry("f", 1, 1, 0o644, "r1")}, {}, {"n": 1}, None)
        _forget_cache()
        b = journal.load(path)
        _forget_cache()
        c = journal.load(path)
        b.write({"p": Entry("f", 2, 2, 0o644, "r2")}, {}, {"n": 2}, ["p"])
        # c still believes the file ends where b started: its append is refused, it compacts
        c.write({"p": Entry("f", 3, 3, 0o644, "r3")}, {}, {"n": 3}, ["p"])
        _forget_cache()
        last = journal.load(path)
        assert (last.entries["p"].size, last.meta) == (3, {"n": 3})
        # the same fork written by hand: the second line with the same number ends the journal
        lines = path.read_bytes().splitlines(keepends=True)
        fork = lines[-1].replace(b'"n":3', b'"n":4')
        path.write_bytes(b"".join(lines) + fork)
        _forget_cache()
        forked = journal.load(path)
        assert forked.broken and forked.meta == {"n": 3}

    def test_a_journal_that_does_not_start_with_a_whole_state_is_no_journal(
        self, site: Site
    ) -> None:
        path = site.state / "x.jnl"
        path.parent.mkdir(parents=True)
        path.write_bytes(b'{"seq":0,"set":{"p":["f",1,1,420,"r"]},"meta":{"n":1}}\n')
        j = journal.load(path)
        assert not j.exists and j.broken

    def test_malformed_entries_end_the_journal(self, site: Site) -> None:
        path = site.state / "x.jnl"
        a = journal.load(path)
        a.write({"p": Entry("f", 1, 1, 0o644, "r1")}, {}, {"n": 1}, None)
        with open(path, "ab") as f:
            f.write(b'{"seq":2,"set":{"q":["f","big",1,420,"r"]},"meta":{"n":2}}\n')
        _forget_cache()
        j = journal.load(path)
        assert j.broken and "q" not in j.entries and j.meta == {"n": 1}


class TestPushRecord:
    def test_a_one_file_push_appends_to_the_record_and_plans_from_the_scan_alone(
        self, site: Site
    ) -> None:
        _tree(site, 100)
        push(site.shell, site.opts(), instance_uuid="u1")
        record = site.state / PUSH_RECORD
        before = record.stat()
        write(site.local / "d2" / "f002.txt", "edited")
        (site.local / "d3" / "f003.txt").unlink()
        local = scan_local(site.opts())
        assert local.basis is not None and set(local.basis.old) >= {"d2/f002.txt", "d3/f003.txt"}
        plan = plan_push(local, site.opts())
        pushed = last_push_record(site.opts())
        assert pushed is not None
        full = diff_manifests(local, pushed[0], load_rules(site.opts()))
        assert (plan.uploads, plan.deletes, plan.metas) == (full.uploads, full.deletes, full.metas)
        assert plan.uploads == ("d2/f002.txt",) and plan.deletes == ("d3/f003.txt",)
        result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
        assert (result.files_sent, result.deleted, result.remote_scanned) == (1, 1, False)
        after = record.stat()
        assert after.st_ino == before.st_ino and after.st_size - before.st_size < 1000
        assert snapshot(site.remote) == snapshot(site.local)
        _forget_cache()
        again = last_push_record(site.opts())
        assert again is not None and again[0].entries == local.entries

    def test_the_sandbox_gets_the_trees_name_not_its_entries(self, site: Site) -> None:
        _tree(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        assert not (site.remote_state / "record.manifest.json").exists()
        names = {p.name for p in site.remote_state.iterdir()}
        assert "record.json" in names

    def test_a_lost_push_record_forces_a_remote_scan_not_a_blind_push(self, site: Site) -> None:
        _tree(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        (site.state / PUSH_RECORD).unlink()
        _forget_cache()
        result = push(site.shell, site.opts(), instance_uuid="u1")
        assert result.remote_scanned and result.files_sent == 0

    def test_an_unchanged_tree_plans_nothing_without_reading_the_records_entries(
        self, site: Site
    ) -> None:
        _tree(site)
        push(site.shell, site.opts(), instance_uuid="u1")
        _forget_cache()
        record = site.state / PUSH_RECORD
        # the entries line made unreadable: only the metadata (the last line) may be read
        lines = record.read_bytes().splitlines(keepends=True)
        record.write_bytes(b"x" * (len(lines[0]) - 1) + b"\n" + b"".join(lines[1:]))
        _forget_cache()
        local = scan_local(site.opts())
        assert plan_push(local, site.opts()).empty
        assert push(site.shell, site.opts(), instance_uuid="u1", local=local).files_sent == 0


class TestScansBetweenPushes:
    """A scan that is not followed by a push (`ukc plan`, a watch pass that found nothing to
    send yet) moves the index past the state our last push recorded."""

    @staticmethod
    def _record_entries_unreadable(site: Site) -> None:
        # only the metadata (the last line) may be read: reading the entries breaks
        record = site.state / PUSH_RECORD
        lines = record.read_bytes().splitlines(keepends=True)
        record.write_bytes(b"x" * (len(lines[0]) - 1) + b"\n" + b"".join(lines[1:]))
        _forget_cache()

    @BOTH_PATHS
    def test_a_push_after_scans_since_the_last_one_sends_what_they_found_changed(
        self, site: Site
    ) -> None:
        _tree(site, 60)
        write(site.local / "swap" / "x.txt", "a file under a directory")
        push(site.shell, site.opts(), instance_uuid="u1")
        write(site.local / "d1" / "f001.txt", "edited once")
        write(site.local / "d2" / "f002.txt", "edited, then put back")
        assert plan_push(scan_local(site.opts()), site.opts()).uploads == (
            "d1/f001.txt",
            "d2/f002.txt",
        )
        write(site.local / "d1" / "f001.txt", "edited twice")
        write(site.local / "d2" / "f002.txt", "content 2")  # its pushed content, a new mtime
        (site.local / "d3" / "f003.txt").unlink()
        write(site.local / "new.txt", "new")
        shutil.rmtree(site.local / "swap")
        write(site.local / "swap", "a file where the directory was")
        local = scan_local(site.opts())
        result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
        assert result.plan is not None and not result.remote_scanned
        assert result.plan.uploads == ("d1/f001.txt", "new.txt", "swap")
        assert result.plan.metas == ("d2/f002.txt",)
        assert result.plan.deletes == ("d3/f003.txt", "swap/x.txt")
        assert result.plan.replaces == ("swap",)
        assert snapshot(site.remote) == snapshot(site.local)
        _forget_cache()
        pushed = last_push_record(site.opts())
        assert pushed is not None and pushed[0].entries == local.entries

    def test_the_push_record_entries_are_not_read_when_the_index_tells_what_changed_since(
        self, site: Site
    ) -> None:
        _tree(site, 60)
        push(site.shell, site.opts(), instance_uuid="u1")
        write(site.local / "d1" / "f001.txt", "edited")
        scan_local(site.opts())  # `ukc plan`: the index moves on, no push
        write(site.local / "d2" / "f002.txt", "edited too")
        self._record_entries_unreadable(site)
        local = scan_local(site.opts())
        assert plan_push(local, site.opts()).uploads == ("d1/f001.txt", "d2/f002.txt")
        result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
        assert (result.files_sent, result.remote_scanned) == (2, False)
        assert snapshot(site.remote) == snapshot(site.local)

    def test_a_record_naming_an_index_position_of_another_state_is_not_believed(
        self, site: Site
    ) -> None:
        _tree(site, 60)
        push(site.shell, site.opts(), instance_uuid="u1")
        record = site.state / PUSH_RECORD
        first = json.loads(record.read_bytes().splitlines()[-1])["meta"]["index"]
        write(site.local / "d1" / "f001.txt", "edited and pushed")
        push(site.shell, site.opts(), instance_uuid="u1")
        write(site.local / "d2" / "f002.txt", "edited, not pushed yet")
        scan_local(site.opts())
        # the record now names the position of the first push's state (a reused inode, a
        # restored file): the index lines since then would also name d1/f001.txt
        lines = record.read_bytes().splitlines(keepends=True)
        last = json.loads(lines[-1])
        last["meta"]["index"] = first
        record.write_bytes(b"".join(lines[:-1]) + json.dumps(last).encode() + b"\n")
        _forget_cache()
        local = scan_local(site.opts())
        assert plan_push(local, site.opts()).uploads == ("d2/f002.txt",)

    def test_an_index_line_without_the_entries_it_replaced_makes_the_push_compare_whole_records(
        self, site: Site
    ) -> None:
        _tree(site, 60)
        push(site.shell, site.opts(), instance_uuid="u1")
        write(site.local / "d1" / "f001.txt", "edited")
        scan_local(site.opts())
        index = site.state / INDEX
        lines = index.read_bytes().splitlines(keepends=True)
        last = json.loads(lines[-1])
        del last["was"]  # as an older ukc wrote it
        index.write_bytes(b"".join(lines[:-1]) + json.dumps(last).encode() + b"\n")
        _forget_cache()
        write(site.local / "d2" / "f002.txt", "edited too")
        local = scan_local(site.opts())
        result = push(site.shell, site.opts(), instance_uuid="u1", local=local)
        assert result.plan is not None
        assert result.plan.uploads == ("d1/f001.txt", "d2/f002.txt")
        assert snapshot(site.remote) == snapshot(site.local)


def test_records_live_under_the_state_dir_only(site: Site) -> None:
    _tree(site, 5)
    push(site.shell, site.opts(), instance_uuid="u1")
    assert {p.name for p in Path(site.state).iterdir()} == {INDEX, PUSH_RECORD, TOOLS}


def test_a_big_state_is_written_in_lines_and_read_back_whole(site: Site) -> None:
    path = site.state / "big.jnl"
    entries = {f"d/f{i:05d}": Entry("f", i, i, 0o644, f"r{i}") for i in range(5001)}
    inos = {p: 1000 + i for i, p in enumerate(entries)}
    j = journal.load(path)
    j.write(entries, inos, {"n": 1}, None)
    assert len(path.read_bytes().splitlines()) == 4  # three lines of entries, the metadata
    _forget_cache()
    back = journal.load(path)
    assert dict(back.entries) == entries and dict(back.inos) == inos
    assert back.meta == {"n": 1} and not back.broken
    back.write({**entries, "d/new": Entry("f", 1, 1, 0o644, "x")}, inos, {"n": 2}, ["d/new"])
    assert len(path.read_bytes().splitlines()) == 5  # appended, not rewritten


def test_the_record_of_a_whole_push_is_the_index_bytes_and_one_metadata_line(
    site: Site,
) -> None:
    _tree(site, 50)
    push(site.shell, site.opts(), instance_uuid="u1")
    index = (site.state / INDEX).read_bytes()
    record = (site.state / PUSH_RECORD).read_bytes()
    assert record.startswith(index) and record.count(b"\n") == index.count(b"\n") + 1
    _forget_cache()
    pushed = last_push_record(site.opts())
    assert pushed is not None
    assert dict(pushed[0].entries) == dict(scan_local(site.opts()).entries)
    assert pushed[1]["instance_uuid"] == "u1" and pushed[1]["files"] == 50


def test_a_journal_is_not_derived_from_one_another_writer_replaced(site: Site) -> None:
    src, dst = site.state / "a.jnl", site.state / "b.jnl"
    entries = {"x": Entry("f", 1, 1, 0o644, "r")}
    journal.load(src).write(entries, {}, {"n": 1}, None)
    other = site.state / "other.jnl"
    journal.load(other).write({"y": Entry("f", 2, 2, 0o644, "s")}, {}, {"n": 2}, None)
    os.replace(other, src)  # another process compacted it: the bytes are not `entries`
    assert not journal.derive(src, dst, entries, {"n": 3})
    assert not dst.exists()
    journal.load(src)  # read afresh: now the cache holds what the file holds
    assert not journal.derive(src, dst, entries, {"n": 3})  # other entries


def _big_journal(path: Path, n: int) -> dict[str, Entry]:
    entries = {
        f"d{i % 100:03d}/f{i:06d}.txt": Entry("f", 1000 + i % 1000, 10**18 + i, 0o644, f"{i:064x}")
        for i in range(n)
    }
    journal.load(path).write(entries, {p: 10**6 + i for i, p in enumerate(entries)}, {"n": 1}, None)
    _forget_cache()
    return entries


def test_a_journal_is_read_in_pieces_not_whole(site: Site) -> None:
    path = site.state / "big.jnl"
    entries = _big_journal(path, 40_000)
    size = path.stat().st_size
    tracemalloc.start()
    try:
        j = journal.load(path)
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert dict(j.entries) == entries
    # the file's bytes (5 MB here, 12 MB at 100,000 entries) are never held at once on top of
    # the state they parse into (read whole: 1.2x the file above it); a piece, a line's parse
    # and the dicts' growth are
    assert peak - kept < 0.9 * size, (peak - kept, size)


def test_a_peeked_journal_holds_its_file_open_not_its_bytes(site: Site) -> None:
    path = site.state / "big.jnl"
    entries = _big_journal(path, 20_000)
    tracemalloc.start()
    try:
        snap = journal.peek(path)
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert snap is not None and snap.meta == {"n": 1}
    assert kept < 256 << 10, kept  # the file is 2.5 MB
    # the state it was peeked at, even after the journal is appended to and then replaced
    ident = list(snap.ident)
    j = journal.load(path)
    j.write({**entries, "new": Entry("f", 1, 1, 0o644, "x")}, {}, {"n": 2}, ["new"])
    journal.load(path).write({"other": Entry("f", 1, 1, 0o644, "y")}, {}, {"n": 3}, None)
    assert snap.ident == ident and dict(snap) == entries


def test_a_peeked_journal_is_none_when_its_last_line_is_cut(site: Site) -> None:
    path = site.state / "big.jnl"
    _big_journal(path, 10)
    with open(path, "ab") as f:
        f.write(b'{"seq":9,"meta":{')
    assert journal.peek(path) is None


class TestWalkOverAnIndex:
    """A scan with no watcher to narrow it (a cold `ukc apply`, a restarted warm process)
    walks the tree against the index it loaded."""

    def test_it_keeps_no_second_manifest_of_an_unchanged_tree(self, site: Site) -> None:
        for d in range(50):
            (site.local / f"d{d:02d}").mkdir()
            for i in range(100):
                (site.local / f"d{d:02d}" / f"f{i:03d}.txt").write_bytes(b"x" * i)
        scan_local(site.opts())
        _forget_cache()
        journal.load(site.state / INDEX)  # what the scan loads first, held by the cache
        tracemalloc.start()
        try:
            local = scan_local(site.opts())
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert len(local) == 5050 and local.basis is not None and not local.basis.old
        # the index's own paths and entries stand: the walk holds the ones not listed yet
        # (~80 bytes each), not a copy of every path, entry and inode (~155 bytes each)
        assert peak < 110 * 5050, peak

    def test_it_finds_what_a_scan_without_an_index_finds(self, site: Site) -> None:
        _tree(site, 40)
        write(site.local / "gone" / "a" / "b.txt", "deep")
        write(site.local / "tolink" / "c.txt", "c")
        write(site.local / "todir", "file")
        scan_local(site.opts())
        _forget_cache()
        os.remove(site.local / "d0" / "f000.txt")
        shutil.rmtree(site.local / "gone")
        shutil.rmtree(site.local / "tolink")
        os.symlink("d1", site.local / "tolink")
        os.remove(site.local / "todir")
        write(site.local / "todir" / "x.txt", "now a directory")
        os.chmod(site.local / "d1" / "f001.txt", 0o600)
        write(site.local / "new" / "n.txt", "new")
        walked = scan_local(site.opts())
        fresh_state = site.base / "fresh-state"
        fresh = scan_local(site.opts(state_dir=fresh_state))
        assert dict(walked.entries) == dict(fresh.entries)
        assert (walked.digest, walked.mtimes) == (fresh.digest, fresh.mtimes)
        _forget_cache()
        index, fresh_index = journal.load(site.state / INDEX), journal.load(fresh_state / INDEX)
        assert dict(index.entries) == dict(fresh_index.entries)
        assert dict(index.inos) == dict(fresh_index.inos)
        assert index.meta == fresh_index.meta


class TestProbe:
    """A probe reads some paths' entries (and everything under some directories) from a
    journal without parsing the rest: what it tells is what a whole load tells."""

    NAMES = ("a.txt", 'q"uote', "back\\slash", "ü/x", "\udcff.bin", "d0/f1", "d0/f10", "d01/f1")

    def _journal(self, path: Path, seed: int) -> dict[str, Entry]:
        """A journal of compactions (several lines each: `_CHUNK` made small) and deltas,
        entries set, replaced and removed; the state it ends in."""
        rng = random.Random(seed)
        names = [*self.NAMES, *(f"d{i % 3}/f{i}" for i in range(40))]
        state: dict[str, Entry] = {}
        inos: dict[str, int] = {}
        for step in range(30):
            changed = rng.sample(names, rng.randint(1, 6))
            was = {p: state.get(p) for p in changed}
            for p in changed:
                if rng.random() < 0.3:
                    state.pop(p, None)
                    inos.pop(p, None)
                else:
                    state[p] = Entry("f", rng.randint(0, 9), step, 0o644, f"ref {p} {step}")
                    if rng.random() < 0.8:
                        inos[p] = rng.randint(1, 1 << 40)
                    else:
                        inos.pop(p, None)  # none recorded (0 on the line)
            j = journal.load(path)
            whole = step % 10 == 0 or not j.exists
            j.write(dict(state), dict(inos), {"step": step}, None if whole else changed, was)
        return state

    def test_it_tells_what_a_whole_load_tells(self, site: Site) -> None:
        path = site.state / "probe.jnl"
        chunk = journal._CHUNK
        journal._CHUNK = 7  # a compaction of several lines
        try:
            for seed in range(8):
                path.unlink(missing_ok=True)
                _forget_cache()
                self._journal(path, seed)
                _forget_cache()
                full = journal.load(path)
                rng = random.Random(seed)
                for _ in range(10):
                    paths = rng.sample([*self.NAMES, "d1/f4", "nowhere", "d0"], 4)
                    under = rng.sample(["d0/", "d1/", "ü/", "none/"], 1)
                    snap = journal.peek(path)
                    assert snap is not None
                    got = journal.probe(snap, paths, under)
                    assert got is not None and got.ident == full.ident
                    assert (got.meta, got.seq, got.base) == (full.meta, full.seq, full.base)
                    for p in paths:
                        assert got.entries.get(p) == full.entries.get(p), (seed, p)
                        assert got.inos.get(p) == full.inos.get(p), (seed, p)
                    for d in under:
                        over = journal.Overlay(got.entries)
                        assert sorted(over.under(d)) == sorted(
                            p for p in full.entries if p.startswith(d)
                        )
                        for p in full.entries:
                            if p.startswith(d):
                                assert got.entries[p] == full.entries[p]
                    assert isinstance(got.entries, journal.Probed)
                    assert not got.entries.parsed
                    # any other path: the whole state, parsed then
                    assert dict(got.entries) == dict(full.entries)
                    assert got.entries.parsed
        finally:
            journal._CHUNK = chunk

    def test_a_probe_that_parses_a_broken_line_tells_nothing(self, site: Site) -> None:
        path = site.state / "probe.jnl"
        self._journal(path, 1)
        snap = journal.peek(path)
        assert snap is not None
        lines = path.read_bytes().splitlines(keepends=True)
        at = next(i for i, line in enumerate(lines) if b'"a.txt"' in line)
        lines[at] = lines[at][:-2] + b"!\n"  # no longer JSON, the same length
        path.write_bytes(b"".join(lines))
        assert journal.probe(snap, ["a.txt"]) is None
        assert journal.probe(snap, ["d9/none"]) is not None  # a line it never parses

    def test_an_overlay_changes_its_copy_not_the_state_under_it(self) -> None:
        base = {"a": 1, "b": 2, "c": 3}
        over = journal.Overlay(base)
        over["b"] = 20
        del over["c"]
        over["d"] = 4
        over.pop("a")
        over["c"] = 30
        assert dict(over) == {"b": 20, "c": 30, "d": 4} and len(over) == 3 and over
        assert base == {"a": 1, "b": 2, "c": 3}
        assert "a" not in over and over.get("a") is None
        del over["b"], over["c"], over["d"]
        assert not over and dict(over) == {}


class TestPushRecordAhead:
    """A push of a new tree writes its record's bytes (a copy of the index) while the
    sandbox's helper finishes; the record is in place only once the push is done."""

    def test_a_staged_record_is_in_place_only_once_written(self, site: Site) -> None:
        from reconciler._util.atomic import temp_files
        from reconciler.sync.manifest import PushRecord

        _tree(site, 30)
        local = scan_local(site.opts())
        path = site.state / PUSH_RECORD
        rec = PushRecord(site.opts(), local, "u1", "boot-1", delta=None)
        rec.stage()
        assert not path.exists() and len(temp_files(path)) == 1
        rec.write()
        assert temp_files(path) == []
        _forget_cache()
        got = last_push_record(site.opts())
        assert got is not None and dict(got[0].entries) == dict(local.entries)
        assert (got[1]["instance_uuid"], got[1]["boot_id"]) == ("u1", "boot-1")
        assert got[1]["digest"] == local.digest and got[1]["index"] == local.at

    def test_a_staged_record_of_a_push_that_failed_leaves_the_last_record(self, site: Site) -> None:
        from reconciler._util.atomic import temp_files
        from reconciler.sync.manifest import PushRecord

        _tree(site, 10)
        push(site.shell, site.opts(), instance_uuid="u1")
        path = site.state / PUSH_RECORD
        before = path.read_bytes()
        _tree(site, 40)
        local = scan_local(site.opts())
        rec = PushRecord(site.opts(), local, "u1", "boot-1", delta=None)
        rec.stage()
        assert len(temp_files(path)) == 1
        rec.discard()
        assert temp_files(path) == [] and path.read_bytes() == before

    def test_a_record_that_cannot_be_written_ahead_is_written_after_the_push(
        self, site: Site
    ) -> None:
        from reconciler._util.atomic import temp_path
        from reconciler.sync.manifest import PushRecord

        _tree(site, 20)
        local = scan_local(site.opts())
        path = site.state / PUSH_RECORD
        blocker = temp_path(path)
        blocker.mkdir(parents=True)  # where the bytes would go ahead: not a file
        rec = PushRecord(site.opts(), local, "u1", "boot-1", delta=None)
        rec.stage()  # while the sandbox's answer is awaited: no error, nothing written
        assert not path.exists()
        blocker.rmdir()
        rec.write()
        _forget_cache()
        got = last_push_record(site.opts())
        assert got is not None and dict(got[0].entries) == dict(local.entries)
