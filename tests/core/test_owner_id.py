"""Where this checkout's owner id comes from: `UKC_SESSION_SECRET`, else `.ukc/owner`."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler import errors
from reconciler._util.atomic import create_atomic
from reconciler.reconcile import identity

SECRET = "0123456789abcdef-project-secret"


def test_without_a_secret_a_random_private_id_is_kept_in_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / ".ukc"
    first = identity.load_owner(state, "abcd1234", {})
    assert len(first.id) == 32 and first.accepted == {first.id}
    assert (state / "owner").stat().st_mode & 0o777 == 0o600
    assert identity.load_owner(state, "abcd1234", {}) == first
    assert identity.load_owner(tmp_path / "other" / ".ukc", "abcd1234", {}).id != first.id


def test_with_a_secret_every_checkout_derives_the_same_id_and_writes_nothing(
    tmp_path: Path,
) -> None:
    a = identity.load_owner(tmp_path / "a", "abcd1234", {"UKC_SESSION_SECRET": SECRET})
    b = identity.load_owner(tmp_path / "b", "abcd1234", {"UKC_SESSION_SECRET": SECRET})
    assert a.id == b.id == identity.owner_id_from_secret(SECRET, "abcd1234")
    assert a.source == "UKC_SESSION_SECRET"
    assert not (tmp_path / "a").exists()


def test_an_id_this_checkout_made_before_the_secret_was_set_still_proves_ownership(
    tmp_path: Path,
) -> None:
    earlier = identity.load_owner(tmp_path, "abcd1234", {}).id
    now = identity.load_owner(tmp_path, "abcd1234", {"UKC_SESSION_SECRET": SECRET})
    assert now.id != earlier and now.accepted == {now.id, earlier}


def test_a_short_secret_is_refused_and_not_shown(tmp_path: Path) -> None:
    with pytest.raises(errors.UsageError, match="is 6 characters") as err:
        identity.load_owner(tmp_path, "abcd1234", {"UKC_SESSION_SECRET": "hunter"})
    assert "hunter" not in str(err.value)


def test_a_damaged_owner_file_is_an_error_not_a_new_identity(tmp_path: Path) -> None:
    (tmp_path / "owner").write_text("not an id\n")
    with pytest.raises(errors.UsageError, match="does not hold an owner id"):
        identity.load_owner(tmp_path, "abcd1234", {})
    assert (tmp_path / "owner").read_text() == "not an id\n"


def test_the_first_writer_of_a_file_created_atomically_wins(tmp_path: Path) -> None:
    path = tmp_path / "owner"
    assert create_atomic(path, b"first\n")
    assert not create_atomic(path, b"second\n")
    assert path.read_bytes() == b"first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["owner"]


def test_with_a_secret_every_checkout_salts_fingerprints_alike_and_writes_no_salt(
    tmp_path: Path,
) -> None:
    env = {"UKC_SESSION_SECRET": SECRET}
    a = identity.load_salt(tmp_path / "a", identity.load_owner(tmp_path / "a", "abcd1234", env))
    b = identity.load_salt(tmp_path / "b", identity.load_owner(tmp_path / "b", "abcd1234", env))
    assert a == b and len(a) == 32 and not (tmp_path / "a").exists()
    other = identity.load_owner(tmp_path / "c", "abcd1234", {"UKC_SESSION_SECRET": SECRET + "2"})
    assert identity.load_salt(tmp_path / "c", other) != a
    assert identity.load_salt(tmp_path / "d") != identity.load_salt(tmp_path / "e")
