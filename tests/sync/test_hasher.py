"""A full walk's new files hashed in a second process (`hasher`), and what the scan does with
batches the hasher could not answer."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from reconciler.sync import hasher
from reconciler.sync.entry import Entry, hash_sums
from reconciler.sync.ignore import IgnoreRules, load_rules
from reconciler.sync.manifest import CHUNK, HASHER_FROM, READ_FLAGS, Manifest, _Scan, scan_local
from tests.support.synctree import Site, write


def _expected(root: Path, rules: IgnoreRules) -> dict[str, Entry]:
    """The manifest of `root`, built from lstat and whole reads (no scan code)."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        for name in [*dirnames, *filenames]:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.lstat(os.path.join(dirpath, name))
            mode = st.st_mode
            if stat.S_ISDIR(mode):
                if not rules.excluded(rel, True):
                    out[rel] = Entry("d", 0, st.st_mtime_ns, mode & 0o7777, "")
            elif rules.excluded(rel, False):
                continue
            elif stat.S_ISREG(mode):
                data = Path(dirpath, name).read_bytes()
                ref = hashlib.sha256(data).hexdigest()
                out[rel] = Entry("f", st.st_size, st.st_mtime_ns, mode & 0o7777, ref)
            elif stat.S_ISLNK(mode):
                target = os.readlink(os.path.join(dirpath, name))
                out[rel] = Entry("l", len(target), st.st_mtime_ns, 0o777, target)
        top = rel_dir == "."
        dirnames[:] = [
            d for d in dirnames if not rules.excluded(d if top else f"{rel_dir}/{d}", True)
        ]
    return out


def _many(root: Path, n: int) -> None:
    for i in range(n):
        write(root / f"d{i % 7}" / f"f{i}.txt", f"file {i} " * (i % 13), mode=0o600 + i % 2)


class _Silent:
    """A hasher that takes every batch and never answers one (`take` says it is gone)."""

    def __init__(self, answer: hasher.Answer | None = None) -> None:
        self.batches: list[list[str]] = []
        self.answer = answer

    def submit(self, paths: list[str]) -> bool:
        self.batches.append(paths)
        return True

    def ready(self) -> bool:
        return False

    def take(self, n: int) -> hasher.Answer | None:
        return self.answer

    def close(self) -> None:
        pass


def _walk(root: Path, fake: object) -> _Scan:
    scan = _Scan(str(root), IgnoreRules([], []), {}, {}, None, incremental=False)
    scan.child, scan.started = fake, True  # type: ignore[assignment]
    scan.share = True
    return scan


class TestSharedHashing:
    def test_a_first_scan_of_many_files_hashes_most_in_a_second_process_and_finds_the_same_tree(
        self, site: Site
    ) -> None:
        _many(site.local, 1500)
        write(site.local / "big.bin", os.urandom(CHUNK + 5))
        write(site.local / "empty.txt", "")
        write(site.local / ".ukc/status.json", "{}")
        os.symlink("d1/f1.txt", site.local / "link")
        os.mkfifo(site.local / "d3" / "pipe")
        rules = load_rules(site.opts())
        scan = _Scan(str(site.local), rules, {}, {}, None, incremental=False)
        scan.share = True
        scan.wait_batches = 0  # a hasher from the first full batch
        try:
            scan.walk(str(site.local), "")
            scan.finish_batches()
            scan.finish()
        finally:
            scan.close_child()
        assert scan.shared > 0 and scan.child is None
        assert scan.entries == _expected(site.local, rules)
        assert len(scan.changed) == len(scan.entries) == scan.added
        # and through scan_local: the same tree, its digests those of its entries
        m = scan_local(site.opts())
        assert m.entries == scan.entries
        assert m.key == Manifest(dict(scan.entries)).key

    def test_a_scan_into_a_seeded_index_moves_its_digests_by_the_hashers_sums_too(
        self, site: Site
    ) -> None:
        write(site.local / "seed.txt", "seed\n")
        scan_local(site.opts())
        (site.local / "seed.txt").unlink()
        _many(site.local, HASHER_FROM + 300)
        m = scan_local(site.opts())
        assert m.basis is not None and len(m.basis.old) > 1200
        fresh = Manifest(dict(m.entries))
        assert m.meta() == fresh.meta()
        again = scan_local(site.opts())
        assert again.basis is not None and not again.basis.old
        assert again.meta() == fresh.meta()

    def test_batches_a_hasher_never_answers_are_hashed_by_the_scan(self, site: Site) -> None:
        _many(site.local, 700)
        for answer in (None, hasher.Answer([], 0, 0)):  # gone; out of shape (one per path)
            fake = _Silent(answer)
            scan = _walk(site.local, fake)
            scan.walk(str(site.local), "")
            scan.finish_batches()
            scan.finish()
            assert fake.batches and scan.shared == 0
            assert scan.entries == _expected(site.local, IgnoreRules([], []))

    def test_listed_files_that_became_a_directory_or_a_fifo_are_looked_at_as_the_walk_would(
        self, site: Site
    ) -> None:
        _many(site.local, 600)
        fake = _Silent(hasher.Answer([None] * 256, 0, 0))  # the paths it will not hash
        scan = _walk(site.local, fake)
        scan.walk(str(site.local), "")
        listed = [site.local / p for batch in fake.batches for p in batch]
        now_dir, now_fifo = listed[0], listed[1]
        now_dir.unlink()
        write(now_dir / "inner.txt", "inside")
        now_fifo.unlink()
        os.mkfifo(now_fifo)
        scan.finish_batches()
        scan.finish()
        got = scan.entries
        rel_dir = os.path.relpath(now_dir, site.local)
        assert got[rel_dir].type == "d" and got[f"{rel_dir}/inner.txt"].type == "f"
        assert os.path.relpath(now_fifo, site.local) not in got
        # (their directories' mtimes moved after the walk listed them)
        moved = {rel_dir.rpartition("/")[0], os.path.relpath(now_fifo.parent, site.local)}
        want = _expected(site.local, IgnoreRules([], []))
        assert {p: e for p, e in got.items() if p not in moved} == {
            p: e for p, e in want.items() if p not in moved
        }


class TestHasherProcess:
    def test_it_answers_small_regular_files_with_their_digest_sums_and_none_for_the_rest(
        self, tmp_path: Path
    ) -> None:
        write(tmp_path / "small.txt", "hello", mode=0o640)
        write(tmp_path / "sub" / "é.txt", "bonjour")
        write(tmp_path / "big.bin", b"x" * 100)
        os.mkfifo(tmp_path / "pipe")
        os.symlink("small.txt", tmp_path / "link")
        h = hasher.start(READ_FLAGS, 50, os.path.join(tmp_path, ""))
        assert h is not None
        try:
            rels = ["small.txt", "sub/é.txt", "big.bin", "pipe", "link", "gone"]
            assert h.submit(rels)
            got = h.take(len(rels))
        finally:
            h.close()
        assert got is not None
        answered: dict[str, Entry] = {}
        for rel, data in (("small.txt", b"hello"), ("sub/é.txt", b"bonjour")):
            st = os.stat(tmp_path / rel)
            ref = hashlib.sha256(data).hexdigest()
            assert got.results[rels.index(rel)] == (
                len(data),
                st.st_mtime_ns,
                st.st_mode,
                st.st_ino,
                ref,
            )
            answered[rel] = Entry("f", len(data), st.st_mtime_ns, st.st_mode & 0o7777, ref)
        assert got.results[2:] == [None] * 4
        digest, mtimes, _, _ = hash_sums(answered.items())
        assert (got.digest, got.mtimes) == (digest, mtimes)

    def test_a_hasher_whose_child_died_says_so_and_is_not_used_again(self, tmp_path: Path) -> None:
        write(tmp_path / "a.txt", "a")
        h = hasher.start(READ_FLAGS, CHUNK, os.path.join(tmp_path, ""))
        assert h is not None and h.proc is not None
        h.proc.kill()
        h.proc.wait()
        h.submit(["a.txt"])  # the pipe may still take it
        assert h.take(1) is None
        assert not h.submit(["a.txt"]) and h.proc is None


def test_a_walk_of_fewer_new_files_than_a_hasher_pays_for_starts_none(site: Site) -> None:
    _many(site.local, HASHER_FROM - 300)
    scan = _Scan(str(site.local), IgnoreRules([], []), {}, {}, None, incremental=False)
    scan.share = True
    try:
        scan.walk(str(site.local), "")
        scan.finish_batches()
    finally:
        scan.close_child()
    assert not scan.started and scan.shared == 0
    assert scan.entries == _expected(site.local, IgnoreRules([], []))
