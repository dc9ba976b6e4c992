"""The local manifest: hash cache, ignore rules, digest, and the pure diff."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pathspec
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.sync.diff import changes_of, diff_manifests
from reconciler.sync.engine import push
from reconciler.sync.entry import content_hash, mtime_hash
from reconciler.sync.ignore import IgnoreRules, is_under, load_rules
from reconciler.sync.manifest import (
    CHUNK,
    Basis,
    Entry,
    Manifest,
    hash_file,
    last_push_record,
    scan_local,
)
from tests.support.synctree import Site, write


class TestHashCache:
    def test_an_unchanged_file_is_not_rehashed(self, site: Site) -> None:
        p = write(site.local / "a.txt", "aaaa")
        first = scan_local(site.opts()).entries["a.txt"].ref
        st = p.stat()
        # same inode, size and mtime but other bytes: only a re-hash could notice
        with open(p, "r+b") as f:
            f.write(b"bbbb")
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert scan_local(site.opts()).entries["a.txt"].ref == first

    def test_a_changed_mtime_causes_a_rehash(self, site: Site) -> None:
        p = write(site.local / "a.txt", "aaaa")
        first = scan_local(site.opts()).entries["a.txt"].ref
        p.write_text("bbbb")
        os.utime(p, ns=(1, 1))
        assert scan_local(site.opts()).entries["a.txt"].ref != first


class TestIgnoreRules:
    def test_spec_excludes_ukcignore_dot_ukc_and_back_paths_are_left_out(self, site: Site) -> None:
        write(site.local / ".ukcignore", "*.log\n!keep.log\n/build/\n")
        for rel in (
            "a.log",
            "keep.log",
            "build/x.o",
            "src/build/y.c",
            ".ukc/status.json",
            "out/r.txt",
            "cache/z",
            "main.py",
        ):
            write(site.local / rel, rel)
        m = scan_local(site.opts(exclude=("cache/",), back=("out/",)))
        files = {p for p, e in m.entries.items() if e.type == "f"}
        assert files == {".ukcignore", "keep.log", "src/build/y.c", "main.py"}

    def test_a_back_path_holding_directory_is_not_deletable(self) -> None:
        rules = IgnoreRules([], ["work/out"])
        assert not rules.deletable("work", True)
        assert not rules.deletable("work/out/x", False)
        assert rules.deletable("other", True)

    def test_fifos_are_not_part_of_the_manifest(self, site: Site) -> None:
        os.mkfifo(site.local / "pipe")
        write(site.local / "a", "a")
        assert set(scan_local(site.opts()).entries) == {"a"}


class TestDigest:
    def test_the_digest_ignores_mtimes_but_not_modes(self) -> None:
        a = Manifest({"x": Entry("f", 1, 10, 0o644, "h")})
        b = Manifest({"x": Entry("f", 1, 99, 0o644, "h")})
        c = Manifest({"x": Entry("f", 1, 10, 0o755, "h")})
        assert a.digest == b.digest != c.digest

    def test_total_bytes_counts_files_only(self) -> None:
        m = Manifest(
            {
                "d": Entry("d", 0, 0, 0o755, ""),
                "d/f": Entry("f", 7, 0, 0o644, "h"),
                "l": Entry("l", 3, 0, 0o777, "abc"),
            }
        )
        assert (m.total_bytes, m.file_count) == (7, 1)

    def test_a_trees_digests_from_one_pass_are_its_entries_hashes_summed_as_records_hold_them(
        self,
    ) -> None:
        entries = {
            "d": Entry("d", 0, 5, 0o755, ""),
            "d/f": Entry("f", 7, 123456789, 0o644, "ab" * 32),
            "l": Entry("l", 3, 9, 0o777, "abc"),
            "n\udcff\u00e9": Entry("f", 0, 1, 0o600, "cd" * 32),
        }
        m = Manifest(entries)
        mod = 1 << 256
        assert int(m.digest, 16) == sum(content_hash(p, e) for p, e in entries.items()) % mod
        assert int(m.mtimes, 16) == sum(mtime_hash(p, e) for p, e in entries.items()) % mod
        assert m.digest_of(entries) == m.digest
        # what records written before the one pass hold for this tree
        assert m.key == (
            "e6b49bf2af652e0d42db72019b8c8bcedcbfb073c97491006bcfd776800ec0eb",
            "bb07562a7e26f35bea40dcf7e6a367f659db21337e11072959ce7d9d19e95bd1",
        )

    def test_a_scan_that_changes_most_of_the_tree_moves_the_index_to_a_fresh_scans_digests(
        self, site: Site
    ) -> None:
        write(site.local / "seed.txt", "seed\n")
        write(site.local / "kept.txt", "kept")
        write(site.local / "edited.txt", "old")
        scan_local(site.opts())
        (site.local / "seed.txt").unlink()
        write(site.local / "edited.txt", "new bytes")
        os.utime(site.local / "edited.txt", ns=(5, 5))
        for i in range(40):
            write(site.local / f"d{i % 4}" / f"f{i}.txt", "x" * i)
        os.symlink("kept.txt", site.local / "link")
        m = scan_local(site.opts())
        assert m.basis is not None and len(m.basis.old) > len(m.entries) // 2
        fresh = Manifest(dict(m.entries))
        assert (m.key, m.file_count, m.total_bytes) == (
            fresh.key,
            fresh.file_count,
            fresh.total_bytes,
        )
        # the index holds them too: a scan from it finds nothing changed
        again = scan_local(site.opts())
        assert again.basis is not None and not again.basis.old
        assert again.meta() == fresh.meta()


def _f(ref: str, mode: int = 0o644, mtime: int = 1) -> Entry:
    return Entry("f", len(ref), mtime, mode, ref)


class TestDiff:
    rules = IgnoreRules(["*.tmp"], ["out"])

    def test_deletes_only_paths_of_the_previous_manifest_deepest_first(self) -> None:
        prev = Manifest({"d": Entry("d", 0, 0, 0o755, ""), "d/x": _f("x"), "y": _f("y")})
        plan = diff_manifests(Manifest({"y": _f("y")}), prev, self.rules)
        assert plan.deletes == ("d/x", "d")
        assert plan.uploads == ()

    def test_excluded_and_back_paths_are_never_in_deletes(self) -> None:
        prev = Manifest(
            {
                "a.tmp": _f("t"),
                "out": Entry("d", 0, 0, 0o755, ""),
                "out/r": _f("r"),
                "": Entry("d", 0, 0, 0o755, ""),
            }
        )
        plan = diff_manifests(Manifest({}), prev, self.rules)
        assert plan.deletes == ()

    def test_content_mode_and_type_changes_are_classified(self) -> None:
        prev = Manifest(
            {
                "same": _f("s"),
                "content": _f("c1"),
                "mode": _f("m"),
                "swap": _f("w"),
                "link": Entry("l", 1, 0, 0o777, "a"),
            }
        )
        local = Manifest(
            {
                "same": _f("s"),
                "content": _f("c2"),
                "mode": _f("m", 0o755),
                "swap": Entry("d", 0, 0, 0o755, ""),
                "swap/in": _f("i"),
                "link": Entry("l", 1, 0, 0o777, "b"),
            }
        )
        plan = diff_manifests(local, prev, self.rules)
        assert plan.uploads == ("content", "link", "swap", "swap/in")
        assert plan.metas == ("mode",)
        assert plan.replaces == ("link", "swap")
        assert plan.upload_bytes == 2 + 1

    def test_a_basis_plans_its_paths_alone_whether_it_names_some_or_every_path(self) -> None:
        d = Entry("d", 0, 0, 0o755, "")
        local = Manifest({"d": d, "d/a": _f("a2"), "b": _f("b"), "c": _f("c")})
        # every path changed (and one gone): the whole tree against what the basis held
        every = Basis(("k", "m"), {"d": None, "d/a": _f("a1"), "b": None, "c": None, "z": _f("z")})
        previous, plan = changes_of(local, every, self.rules)
        assert previous.entries == {"d/a": _f("a1"), "z": _f("z")}
        assert plan == diff_manifests(local, previous, self.rules)
        assert (plan.uploads, plan.deletes) == (("b", "c", "d", "d/a"), ("z",))
        # some paths: the others are neither uploaded nor compared
        some = Basis(("k", "m"), {"d/a": _f("a1"), "z": _f("z")})
        previous, plan = changes_of(local, some, self.rules)
        assert (plan.uploads, plan.deletes) == (("d/a",), ("z",))

    def test_the_plan_and_the_push_of_one_scanned_tree_share_one_diff(self) -> None:
        """An apply plans a tree, then its push judges the same tree on the same basis: the
        second answer is the first one (100,000 paths: ~35 ms the sandbox waits for)."""
        local = Manifest({"a": _f("a2"), "b": _f("b")})
        basis = Basis(("k", "m"), {"a": _f("a1"), "b": None})
        previous, plan = changes_of(local, basis, self.rules, reason="against the record")
        again, pushed = changes_of(local, basis, self.rules, reason="the remote's record")
        assert again is previous and pushed.uploads is plan.uploads
        assert (pushed.reason, plan.reason) == ("the remote's record", "against the record")
        # another basis (a scan since), other rules, another tree: judged afresh
        other = Basis(("k", "m"), {"a": _f("a1")})
        assert changes_of(local, other, self.rules)[1].uploads == ("a",)
        back = IgnoreRules(["*.tmp"], ["b"])
        assert changes_of(local, basis, back)[0] is not previous
        same = Manifest(dict(local.entries))
        assert changes_of(same, basis, self.rules)[0] is not previous


def test_load_rules_without_a_ukcignore_uses_the_spec_only(tmp_path: Path) -> None:
    from reconciler.sync.options import SyncOptions

    rules = load_rules(SyncOptions(local_root=tmp_path, state_dir=tmp_path / "s", exclude=("*.o",)))
    assert rules.excluded("x.o", False) and rules.excluded(".ukc", True)
    assert not rules.excluded("x.c", False)


_names = st.sampled_from([".ukc", "ukc", ".ukc~", "x.ukc", ".ukcignore", "a", "b.log"])


class TestDotUkcFastPath:
    @settings(max_examples=300, deadline=None)
    @given(parts=st.lists(_names, min_size=1, max_size=4), is_dir=st.booleans())
    def test_without_user_rules_the_shortcut_agrees_with_pathspec(
        self, parts: list[str], is_dir: bool
    ) -> None:
        rel = "/".join(parts)
        fast = IgnoreRules(["", "# only a comment"], ())
        spec = pathspec.GitIgnoreSpec.from_lines([".ukc/"])
        assert fast.excluded(rel, is_dir) == spec.match_file(rel + "/" if is_dir else rel)

    def test_a_real_rule_turns_the_shortcut_off(self) -> None:
        rules = IgnoreRules(["*.log"], ())
        assert rules.excluded("a/b.log", False)
        assert rules.excluded("a/.ukc/x", False)
        assert not rules.excluded("a/b.txt", False)


class TestChangeHint:
    """`scan_local(on_change=...)`: the early "a push is coming" signal the apply loop uses to
    open its connection while the walk goes on."""

    def pushed(self, site: Site) -> None:
        push(site.shell, site.opts(), instance_uuid="u1")

    def scan_counting(self, site: Site) -> int:
        calls: list[int] = []
        scan_local(site.opts(), on_change=lambda: calls.append(1))
        return len(calls)

    def test_an_unchanged_tree_gives_no_hint(self, site: Site) -> None:
        write(site.local / "a/b.txt", "b")
        write(site.local / "c.txt", "c")
        self.pushed(site)
        assert self.scan_counting(site) == 0

    def test_an_edited_file_gives_exactly_one_hint(self, site: Site) -> None:
        for i in range(5):
            write(site.local / f"f{i}.txt", "x")
        self.pushed(site)
        for i in range(5):
            write(site.local / f"f{i}.txt", "longer content")
        assert self.scan_counting(site) == 1

    def test_a_deleted_file_alone_gives_a_hint(self, site: Site) -> None:
        write(site.local / "keep.txt", "k")
        write(site.local / "gone.txt", "g")
        self.pushed(site)
        (site.local / "gone.txt").unlink()
        assert self.scan_counting(site) == 1

    def test_a_new_directory_gives_a_hint(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        self.pushed(site)
        (site.local / "empty").mkdir()
        assert self.scan_counting(site) == 1

    def test_a_tree_never_pushed_gives_a_hint(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        assert self.scan_counting(site) == 1

    def test_a_new_fifo_or_an_excluded_file_gives_no_hint(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        self.pushed(site)
        os.mkfifo(site.local / "pipe")
        write(site.local / ".ukc/status.json", "{}")
        assert self.scan_counting(site) == 0

    def test_the_push_record_is_read_again_once_it_is_replaced(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        self.pushed(site)
        first = last_push_record(site.opts())
        assert first is not None and last_push_record(site.opts()) is first
        write(site.local / "b.txt", "b")
        self.pushed(site)
        second = last_push_record(site.opts())
        assert second is not None and "b.txt" in second[0].entries


_names = st.sampled_from(["a", "b", "ab", "a.b", "x y", "é"])
_paths = st.lists(_names, min_size=1, max_size=4).map("/".join)


@settings(max_examples=300, deadline=None)
@given(rel=_paths, roots=st.lists(_paths, max_size=6))
def test_is_under_agrees_with_the_plain_prefix_rule(rel: str, roots: list[str]) -> None:
    expected = any(rel == r or rel.startswith(r + "/") for r in roots)
    assert is_under(rel, roots) is expected
    assert is_under(rel, frozenset(roots)) is expected


def test_a_file_hashed_with_its_size_hashes_like_one_read_to_the_end(tmp_path: Path) -> None:
    for size in (0, 1, 1000, CHUNK - 1, CHUNK, CHUNK + 1):
        data = os.urandom(size)
        p = tmp_path / f"f{size}"
        p.write_bytes(data)
        # the size fstat gave, one that is stale (the file grew since), none
        for hint in (size, max(size - 7, 0), -1):
            fd = os.open(p, os.O_RDONLY)
            try:
                assert hash_file(fd, hint) == hashlib.sha256(data).hexdigest(), (size, hint)
            finally:
                os.close(fd)


class TestBigFilesHashedBesideTheWalk:
    """A big file's sha256 is made on a thread while the walk goes on (hashlib and the reads
    release the GIL); the scan waits for it before the manifest is made."""

    def _tree(self, site: Site) -> dict[str, bytes]:
        files = {
            "a/big0.bin": os.urandom(CHUNK),
            "a/big1.bin": os.urandom(3 * CHUNK + 5),
            "b/small.txt": b"small",
            "c/big2.bin": os.urandom(2 * CHUNK),
        }
        for rel, data in files.items():
            write(site.local / rel, data)
        return files

    def test_every_big_file_gets_its_sha256_on_a_first_scan_and_after_an_edit(
        self, site: Site
    ) -> None:
        files = self._tree(site)
        entries = scan_local(site.opts()).entries
        for rel, data in files.items():
            assert entries[rel].ref == hashlib.sha256(data).hexdigest(), rel
        edited = os.urandom(2 * CHUNK + 1)
        write(site.local / "a/big1.bin", edited)
        again = scan_local(site.opts())
        assert again.entries["a/big1.bin"].ref == hashlib.sha256(edited).hexdigest()
        fresh = scan_local(site.opts(state_dir=site.state.parent / "fresh-state"))
        assert again.digest == fresh.digest  # the index moved by the hashed file as a walk sees

    def test_a_big_file_is_hashed_on_a_thread_while_the_walk_goes_on(self, site: Site) -> None:
        write(site.local / "z.txt", "pushed")
        push(site.shell, site.opts(), instance_uuid="u1")  # the index is what we pushed
        write(site.local / "a.bin", os.urandom(4 * CHUNK))
        write(site.local / "b.txt", "later in the walk")
        seen: list[list[str]] = []

        def hint() -> None:
            seen.append([t.name for t in threading.enumerate()])

        # the first change found is the big file: the hint comes right after it was handed on
        scan_local(site.opts(), on_change=hint)
        assert any(name.startswith("ukc-scan-hash") for name in seen[0])
        assert not any(t.name.startswith("ukc-scan-hash") for t in threading.enumerate())

    def test_a_scan_that_fails_while_a_big_file_is_hashed_leaves_no_file_open(
        self, site: Site
    ) -> None:
        write(site.local / "z.txt", "pushed")
        push(site.shell, site.opts(), instance_uuid="u1")
        write(site.local / "a.bin", os.urandom(16 * CHUNK))
        before = set(os.listdir("/proc/self/fd"))

        def fail() -> None:
            raise KeyboardInterrupt

        try:
            scan_local(site.opts(), on_change=fail)
        except KeyboardInterrupt:
            pass
        else:
            raise AssertionError("the hint's exception was swallowed")
        assert set(os.listdir("/proc/self/fd")) <= before
