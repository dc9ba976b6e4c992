"""Scans narrowed by a change feed: only the noted paths are looked at, and the result is the
manifest a full walk would give."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Iterator

import pytest

from reconciler.errors import SyncHaltedError
from reconciler.sync import feed, journal
from reconciler.sync.feed import ChangeFeed
from reconciler.sync.manifest import Manifest, scan_local
from reconciler.sync.records import INDEX
from tests.support.synctree import Site, write


@pytest.fixture
def changes(site: Site) -> Iterator[ChangeFeed]:
    yield feed.attach(site.state)
    feed.detach(site.state)


def _full(site: Site, n: int, **kw: object) -> Manifest:
    """What a walk of the whole tree finds, hashing everything (a state dir of its own)."""
    return scan_local(site.opts(state_dir=site.base / f"full-{n}", **kw))


def test_a_feed_holds_no_index_and_still_narrows_the_scan_after_one_was_released(
    site: Site, changes: ChangeFeed
) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "b.txt", "b")
    scan_local(site.opts())
    # what a sync-back does before its pull: the index is freed (a feed holding the scan's
    # state kept 100,000 entries alive through the pull)
    journal.release(site.state / "pull.jnl")
    assert site.state / INDEX not in journal._CACHE
    write(site.local / "a.txt", "a changed")
    write(site.local / "b.txt", "b changed")
    changes.note("a.txt")
    got = scan_local(site.opts())
    assert got.entries["a.txt"].size == len("a changed")
    assert got.entries["b.txt"].size == 1  # not noted: not looked at


def test_a_scan_with_a_feed_looks_only_at_the_noted_paths(site: Site, changes: ChangeFeed) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "b.txt", "b")
    scan_local(site.opts())  # the first scan through a feed walks everything
    write(site.local / "a.txt", "a changed")
    write(site.local / "b.txt", "b changed")
    changes.note("a.txt")
    got = scan_local(site.opts())
    assert got.entries["a.txt"].size == len("a changed")
    assert got.entries["b.txt"].size == 1  # not noted: not looked at
    changes.note("b.txt")
    assert scan_local(site.opts()).entries["b.txt"].size == len("b changed")


def test_nothing_noted_is_nothing_changed_and_writes_nothing(
    site: Site, changes: ChangeFeed
) -> None:
    write(site.local / "a.txt", "a")
    first = scan_local(site.opts())
    size = (site.state / "index.jnl").stat().st_size
    again = scan_local(site.opts())
    assert again.entries is first.entries and again.digest == first.digest
    assert (site.state / "index.jnl").stat().st_size == size


def test_an_index_written_by_someone_else_makes_the_next_scan_walk(
    site: Site, changes: ChangeFeed
) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "b.txt", "b")
    scan_local(site.opts())
    write(site.local / "b.txt", "b changed")
    # another process (an apply, a plan) rewrites the index: our copy is no longer the basis
    journal._CACHE.clear()
    feed.detach(site.state)
    scan_local(site.opts())
    write(site.local / "a.txt", "a changed")
    write(site.local / "b.txt", "b changed again")
    theirs = feed.attach(site.state)
    theirs.take()
    theirs.ident = None  # what a watcher that never scanned holds
    theirs.note("a.txt")
    got = scan_local(site.opts())
    assert got.entries["b.txt"].size == len("b changed again")


def test_a_changed_ignore_file_makes_the_scan_walk(site: Site, changes: ChangeFeed) -> None:
    write(site.local / "a.log", "a")
    write(site.local / "b.txt", "b")
    scan_local(site.opts())
    write(site.local / ".ukcignore", "*.log\n")
    changes.note(".ukcignore")
    got = scan_local(site.opts())
    assert "a.log" not in got.entries and ".ukcignore" in got.entries


def test_a_failed_scan_leaves_everything_to_look_at(site: Site, changes: ChangeFeed) -> None:
    write(site.local / "a.txt", "a")
    scan_local(site.opts())
    site.local.rename(site.base / "moved")
    changes.note("a.txt")
    with pytest.raises(SyncHaltedError):
        scan_local(site.opts())
    assert changes.take() is None


def _touch_random(site: Site, rng: random.Random, step: int) -> set[str]:
    """A few random changes, and the paths a watcher would have named."""
    root = site.local
    noted: set[str] = set()
    existing = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if not p.is_symlink())
    for _ in range(rng.randint(1, 5)):
        what = rng.random()
        pick = rng.choice(existing) if existing else "x"
        target = root / pick
        if what < 0.25:
            rel = f"{pick.rpartition('/')[0] or 'top'}/n{step}{rng.randint(0, 9)}.txt"
            if rel.startswith("top/"):
                rel = rel[4:]
            write(root / rel, f"new {step}")
            noted.add(rel)
            # a new parent directory is an event of its own
            parts = rel.split("/")
            noted.update("/".join(parts[: i + 1]) for i in range(len(parts) - 1))
        elif what < 0.45 and target.is_file():
            write(target, f"edited {step} {rng.random()}")
            noted.add(pick)
        elif what < 0.55 and target.exists():
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
            noted.add(pick)
        elif what < 0.65 and target.exists():
            dest = f"mv{step}{rng.randint(0, 99)}"
            target.rename(root / dest)
            noted.update({pick, dest})
        elif what < 0.72 and target.is_file():
            target.unlink()
            target.mkdir()
            write(target / "inner.txt", "inner")
            noted.update({pick, f"{pick}/inner.txt"})
        elif what < 0.8 and target.exists():
            link = f"l{step}{rng.randint(0, 9)}"
            os.symlink(pick, root / link)
            noted.add(link)
        elif what < 0.88 and target.is_file():
            target.chmod(0o600 if rng.random() < 0.5 else 0o644)
            noted.add(pick)
        else:
            sub = f"dir{step}/deep/er"
            write(root / sub / "f.txt", "deep")
            write(root / f"dir{step}" / "x.log", "excluded")
            noted.add(f"dir{step}")  # only the top of a new tree is named
    return noted


@pytest.mark.parametrize("seed", range(4))
def test_scans_narrowed_by_what_a_watcher_saw_equal_full_walks(
    site: Site, changes: ChangeFeed, seed: int
) -> None:
    rng = random.Random(seed)
    for i in range(30):
        write(site.local / f"d{i % 3}" / f"s{i % 2}" / f"f{i}.txt", f"content {i}")
    write(site.local / ".ukcignore", "*.log\n")
    opts = {"exclude": ("cache/",)}
    scan_local(site.opts(**opts))
    for step in range(15):
        for rel in _touch_random(site, rng, step):
            changes.note(rel)
        got = scan_local(site.opts(**opts))
        whole = _full(site, step, **opts)
        assert dict(got.entries) == dict(whole.entries), f"step {step}"
        assert (got.digest, got.mtimes, got.file_count, got.total_bytes) == (
            Manifest(dict(whole.entries)).digest,
            whole.mtimes,
            whole.file_count,
            whole.total_bytes,
        )
    # still narrowed after all that: a change nobody noted is not seen (not .ukcignore: its
    # text is read by every scan, as part of the rules)
    victim = next(p for p, e in got.entries.items() if e.type == "f" and p != ".ukcignore")
    write(site.local / victim, "changed behind the watcher's back " * 3)
    assert scan_local(site.opts(**opts)).entries[victim] == got.entries[victim]
