"""A fresh runner's prune: with the project's secret, an instance tagged with this spec
directory's group is pruned without this checkout's inventory; nothing else is."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler.reconcile import actions, identity
from reconciler.reconcile.plan import plan_sessions
from reconciler.status.schema import StatusDoc
from tests.support.planning import NOW, OWNER, PROJECT, desired, instance

GROUP = "0123456789ab"


def gone(group: str | None, owner: identity.Owner = OWNER) -> actions.Plan:
    """The plan for a spec set without session `old`, whose instance carries `group`."""
    d = desired(name="old", instance_name=identity.instance_name(PROJECT, "old"))
    tags = (
        *identity.owner_tags(PROJECT, "old", d.instance_hash, owner.id),
        *((identity.group_tag(group),) if group else ()),
    )
    inst = instance(d, uuid="u-old", tags=tags)
    grouped = replace(OWNER, group=GROUP)
    return plan_sessions(
        [], {inst.name: inst}, StatusDoc(), NOW, owner=grouped, prune=True, claimed={"old": inst}
    )


def test_an_instance_of_this_spec_directory_is_pruned_without_an_inventory() -> None:
    plan = gone(GROUP)
    assert [(p.session, p.instance_uuid) for p in plan.prunes] == [("old", "u-old")]


def test_an_instance_of_another_spec_directory_or_of_none_is_left_alone() -> None:
    assert gone("ba9876543210").prunes == () and gone(None).prunes == ()


def test_a_grouped_instance_of_another_owner_is_refused_not_pruned() -> None:
    other = identity.Owner(PROJECT, "f" * 32, frozenset({"f" * 32}), "UKC_SESSION_SECRET")
    plan = gone(GROUP, owner=other)
    assert plan.prunes == () and [r.session for r in plan.prune_refusals] == ["old"]


def test_a_spec_directory_is_named_by_its_path_inside_the_repository(tmp_path: Path) -> None:
    for clone in ("a", "b"):
        (tmp_path / clone / ".git").mkdir(parents=True)
        (tmp_path / clone / "specs" / "web").mkdir(parents=True)
        (tmp_path / clone / "specs" / "db").mkdir(parents=True)
    a = identity.group_id(tmp_path / "a" / "specs" / "web")
    assert a is not None and a == identity.group_id(tmp_path / "b" / "specs" / "web")
    assert a != identity.group_id(tmp_path / "a" / "specs" / "db")
    outside = tmp_path / "plain"
    outside.mkdir()
    assert identity.group_id(outside) is None
