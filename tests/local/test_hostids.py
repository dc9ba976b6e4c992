"""Host id ranges of a root daemon's sandboxes: one per instance, machine-wide, never shared."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from reconciler.errors import LocalMetroError
from reconciler.local.sandbox.hostids import FIRST_ID, IDS_PER_INSTANCE, SLOTS, HostIds, IdRange


@pytest.fixture
def ids(tmp_path: Path) -> HostIds:
    return HostIds(tmp_path / "registry", slots=3)


def test_two_instances_get_disjoint_aligned_ranges_above_every_ordinary_id(
    ids: HostIds, tmp_path: Path
) -> None:
    a = ids.claim(tmp_path / "a")
    b = ids.claim(tmp_path / "b")
    assert a.slot != b.slot
    assert {a.base, b.base} <= {FIRST_ID + s * IDS_PER_INSTANCE for s in range(3)}
    assert a.base + a.count <= b.base or b.base + b.count <= a.base
    # the last range ends below systemd's foreign range and the ids tools read as negative
    assert FIRST_ID + SLOTS * IDS_PER_INSTANCE <= 0x7FFE0000


def test_an_instance_keeps_its_range_across_claims_and_registries_in_other_daemons(
    ids: HostIds, tmp_path: Path
) -> None:
    first = ids.claim(tmp_path / "a")
    ids.claim(tmp_path / "b")
    again = HostIds(ids.registry, slots=3).claim(tmp_path / "a")
    assert again == first


def test_a_released_or_orphaned_range_is_given_to_the_next_instance(
    ids: HostIds, tmp_path: Path
) -> None:
    a = ids.claim(tmp_path / "a")
    b = ids.claim(tmp_path / "b")
    c = ids.claim(tmp_path / "c")
    ids.release(tmp_path / "a")
    assert not (tmp_path / "a" / "ids").exists()
    assert ids.claim(tmp_path / "d") == a
    # a state dir removed without `ukc delete`: its claim is stale, not held forever
    shutil.rmtree(tmp_path / "b")
    assert ids.claim(tmp_path / "e") == b
    assert c.slot not in (a.slot, b.slot)


def test_a_new_instance_takes_a_range_no_claim_names_before_a_stale_one(
    ids: HostIds, tmp_path: Path
) -> None:
    a = ids.claim(tmp_path / "a")
    shutil.rmtree(tmp_path / "a")  # slot a.slot: a stale claim
    fresh = ids.claim(tmp_path / "b")
    assert fresh.slot != a.slot
    # once no slot is left unnamed, the stale one is the next instance's
    ids.claim(tmp_path / "c")
    assert ids.claim(tmp_path / "d") == a


def test_when_every_range_is_held_the_claim_is_refused_with_the_numbers(
    ids: HostIds, tmp_path: Path
) -> None:
    for name in "abc":
        ids.claim(tmp_path / name)
    with pytest.raises(LocalMetroError, match=r"^no free host id range: all 3 ranges of 65536"):
        ids.claim(tmp_path / "d")


def test_a_registry_that_is_not_a_real_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "registry").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LocalMetroError, match="is not a directory owned by uid"):
        HostIds(tmp_path / "registry").claim(tmp_path / "a")


def test_any_host_id_folds_into_the_range_by_its_low_16_bits() -> None:
    r = IdRange(slot=2, base=FIRST_ID + 2 * IDS_PER_INSTANCE)
    assert r.host_id(0) == r.base
    assert r.host_id(102) == r.base + 102
    assert r.host_id(FIRST_ID + 5 * IDS_PER_INSTANCE + 7) == r.base + 7
