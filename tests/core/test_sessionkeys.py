"""Session keys derived from `UKC_SESSION_SECRET`: the same on every runner that holds it,
different for anything else, and the planner keeps an instance whose key a runner can derive."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler.reconcile import actions, identity, sessionkeys
from reconciler.reconcile.desired import Group, instance_credentials
from reconciler.transport import ssh
from reconciler.transport.keys import ensure_derived_keypair
from tests.support.planning import converged_record, desired, instance, kinds, plan_one

SECRET = "0123456789abcdef-project-secret"
NONCE = "ab" * 16


def owner(tmp: Path, environ: dict[str, str]) -> identity.Owner:
    return identity.load_owner(tmp / ".ukc", "abcd1234", environ)


def test_every_runner_with_the_secret_derives_the_same_key_and_nothing_else_does(
    tmp_path: Path,
) -> None:
    root = sessionkeys.key_root(SECRET, "abcd1234")
    same = sessionkeys.seed(sessionkeys.key_root(SECRET, "abcd1234"), "build", NONCE)
    assert sessionkeys.seed(root, "build", NONCE) == same and len(same) == 32
    others = {
        sessionkeys.seed(sessionkeys.key_root(SECRET + "x", "abcd1234"), "build", NONCE),
        sessionkeys.seed(sessionkeys.key_root(SECRET, "abcd1235"), "build", NONCE),
        sessionkeys.seed(root, "buil", NONCE),
        sessionkeys.seed(root, "build", "cd" * 16),
    }
    assert same not in others and len(others) == 4
    a = ensure_derived_keypair(tmp_path / "a" / "build", same)
    b = ensure_derived_keypair(tmp_path / "b" / "build", same)
    assert a == b and a.startswith("ssh-ed25519 ")
    assert (tmp_path / "a" / "build").stat().st_mode & 0o777 == 0o600


def test_a_derived_key_file_follows_the_instances_nonce(tmp_path: Path) -> None:
    root = sessionkeys.key_root(SECRET, "abcd1234")
    path = tmp_path / "keys" / "build"
    first = ensure_derived_keypair(path, sessionkeys.seed(root, "build", NONCE))
    assert ensure_derived_keypair(path, sessionkeys.seed(root, "build", NONCE)) == first
    second = ensure_derived_keypair(path, sessionkeys.seed(root, "build", "cd" * 16))
    assert second != first
    assert (path.parent / "build.pub").read_text().strip() == second


def test_only_one_well_formed_key_tag_names_a_nonce() -> None:
    assert sessionkeys.nonce_of(["ukc", sessionkeys.key_tag(NONCE)]) == NONCE
    assert sessionkeys.nonce_of(["ukc"]) is None
    assert sessionkeys.nonce_of([sessionkeys.key_tag("AB" * 16)]) is None
    assert sessionkeys.nonce_of([sessionkeys.key_tag(NONCE[:-1])]) is None
    both = [sessionkeys.key_tag(NONCE), sessionkeys.key_tag("cd" * 16)]
    assert sessionkeys.nonce_of(both) is None


def test_the_secret_and_the_key_root_never_show_in_an_owners_repr(tmp_path: Path) -> None:
    me = owner(tmp_path, {"UKC_SESSION_SECRET": SECRET})
    assert me.key_root is not None
    assert SECRET not in repr(me) and me.key_root.hex() not in repr(me)
    assert owner(tmp_path, {}).key_root is None


def test_a_fresh_runner_with_the_secret_has_the_credentials_of_an_instance_with_a_nonce(
    tmp_path: Path,
) -> None:
    group = Group(tmp_path, [])
    d = desired()
    tagged = instance(d, tags=(*d.tags, sessionkeys.key_tag(NONCE)))
    with_secret = owner(tmp_path, {"UKC_SESSION_SECRET": SECRET})
    creds = instance_credentials(group, "hello", with_secret, tagged)
    assert creds.seed is not None and ssh.KIND.credentials_present(creds)
    assert not (tmp_path / ".ukc" / "keys").exists()
    # without the secret, or for an instance without a nonce: only a key file would do
    for who, inst in ((owner(tmp_path / "x", {}), tagged), (with_secret, instance(d))):
        creds = instance_credentials(group, "hello", who, inst)
        assert creds.seed is None and not ssh.KIND.credentials_present(creds)


def test_the_planner_keeps_an_instance_whose_key_is_derived_and_replaces_one_without() -> None:
    d = desired()
    inst = instance(d)
    rec = converged_record(d, inst)
    kept = plan_one(replace(d, credentials_present=True), inst, rec)
    assert kept.actions == ()
    lost = plan_one(replace(d, credentials_present=False), inst, rec)
    assert kinds(lost)[:2] == ["DeleteInstance", "CreateInstance"]
    assert isinstance(lost.actions[0], actions.DeleteInstance)
    assert "ssh key is lost" in lost.actions[0].reason
