"""Scans tracked by inotify (an apply's rounds): the directories a scan lists are watched, and
the next scan re-stats only what the kernel saw change, with the result a full walk gives."""

from __future__ import annotations

import random
import shutil

import pytest

from reconciler.sync import feed
from reconciler.sync.inotify import shared
from reconciler.sync.manifest import Manifest, scan_local
from tests.support.synctree import Site, write

pytestmark = pytest.mark.skipif(shared() is None, reason="no inotify here")


def test_events_after_a_tracked_scan_name_the_changed_paths(site: Site) -> None:
    write(site.local / "a.txt", "a")
    write(site.local / "d" / "b.txt", "b")
    with feed.tracking([(site.state, site.local, ())]):
        scan_local(site.opts())
        write(site.local / "d" / "b.txt", "b changed")
        (site.local / "a.txt").unlink()
        changes = feed.feed_for(site.state)
        assert changes is not None
        assert changes.take(changes.basis) == {"d/b.txt", "a.txt"}
    assert feed.feed_for(site.state) is None


def test_a_tracked_scan_after_no_change_looks_at_nothing(site: Site) -> None:
    write(site.local / "a.txt", "a")
    with feed.tracking([(site.state, site.local, ())]):
        first = scan_local(site.opts())
        again = scan_local(site.opts())
        assert again.entries is first.entries


def test_the_root_going_away_means_everything(site: Site) -> None:
    write(site.local / "a.txt", "a")
    with feed.tracking([(site.state, site.local, ())]):
        scan_local(site.opts())
        shutil.rmtree(site.local)
        changes = feed.feed_for(site.state)
        assert changes is not None and changes.take(changes.basis) is None


def test_a_session_with_a_feed_keeps_it(site: Site) -> None:
    mine = feed.attach(site.state)
    try:
        with feed.tracking([(site.state, site.local, ())]):
            assert feed.feed_for(site.state) is mine
        assert feed.feed_for(site.state) is mine
    finally:
        feed.detach(site.state)


@pytest.mark.parametrize("seed", range(3))
def test_tracked_scans_equal_full_walks_whatever_changed(site: Site, seed: int) -> None:
    rng = random.Random(seed)
    for i in range(40):
        write(site.local / f"d{i % 4}" / f"s{i % 3}" / f"f{i}.txt", f"content {i}")
    with feed.tracking([(site.state, site.local, ())]):
        scan_local(site.opts())
        for step in range(12):
            files = sorted(p for p in site.local.rglob("*") if p.is_file())
            dirs = sorted(p for p in site.local.rglob("*") if p.is_dir())
            for _ in range(rng.randint(1, 4)):
                what = rng.random()
                if what < 0.3 and files:
                    write(rng.choice(files), f"edit {step} {rng.random()}")
                elif what < 0.45 and files:
                    rng.choice(files).unlink(missing_ok=True)
                elif what < 0.6 and dirs:
                    d = rng.choice(dirs)
                    if d.exists():
                        d.rename(site.local / f"moved{step}{rng.randint(0, 999)}")
                elif what < 0.7 and dirs:
                    shutil.rmtree(rng.choice(dirs), ignore_errors=True)
                else:
                    write(site.local / f"new{step}" / "deep" / f"n{rng.randint(0, 9)}", "n")
            got = scan_local(site.opts())
            whole = scan_local(site.opts(state_dir=site.base / f"full-{step}"))
            assert dict(got.entries) == dict(whole.entries), f"step {step}"
            assert got.digest == Manifest(dict(whole.entries)).digest
