"""Scans tracked by inotify (an apply's rounds): the directories a scan lists are watched, and
the next scan re-stats only what the kernel saw change, with the result a full walk gives."""

from __future__ import annotations

import random
import shutil

import pytest

from reconciler.sync import feed
from reconciler.sync.inotify import shared
from reconciler.sync.manifest import Manifest, scan_local
from tests.support.synctree import Site, edit_at_random, write

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
        assert changes.take(changes.ident) == {"d/b.txt", "a.txt"}
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
        assert changes is not None and changes.take(changes.ident) is None


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
            edit_at_random(site.local, rng, step)
            got = scan_local(site.opts())
            whole = scan_local(site.opts(state_dir=site.base / f"full-{step}"))
            assert dict(got.entries) == dict(whole.entries), f"step {step}"
            assert got.digest == Manifest(dict(whole.entries)).digest
