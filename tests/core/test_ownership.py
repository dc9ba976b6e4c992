"""The ownership rule and the planner's use of it: pure table tests (no I/O, no clock)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import DesiredSession, TreeState
from reconciler.reconcile.plan import plan_delete, plan_sessions
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from tests.support.planning import (
    NOW,
    OWNER,
    OWNER_ID,
    PROJECT,
    converged_record,
    desired,
    instance,
)

THEIRS = "fedcba9876543210fedcba9876543210"


def theirs(d: DesiredSession, **overrides: object) -> Instance:
    """The same name and session tags, made by another checkout (another owner id)."""
    tags = tuple(identity.owner_tags(PROJECT, d.name, d.instance_hash, THEIRS))
    return instance(d, uuid="u-theirs", tags=tags, **overrides)


def legacy(d: DesiredSession, **overrides: object) -> Instance:
    """An instance an older ukc made: every tag but the owner tag."""
    tags = tuple(t for t in d.tags if not t.startswith("ukc.owner="))
    return instance(d, uuid="u-legacy", tags=tags, **overrides)


def record_for(inst: Instance, *, host_key: str | None = "SHA256:abc") -> InstanceRecord:
    return InstanceRecord(name=inst.name, uuid=inst.uuid, metro="local", host_key=host_key)


def plan_session(
    d: DesiredSession, inst: Instance | None, rec: SessionStatus | None
) -> actions.SessionPlan:
    doc = StatusDoc(sessions={d.name: rec} if rec is not None else {})
    observed = {inst.name: inst} if inst is not None else {}
    return plan_sessions([d], observed, doc, NOW, owner=OWNER).sessions[0]


class TestProve:
    def test_our_owner_tag_with_the_sessions_name_proves_ownership(self) -> None:
        d = desired()
        assert identity.prove(instance(d), OWNER, d.name, None).ours

    def test_another_owner_id_is_not_ours_and_the_refusal_says_what_to_do(self) -> None:
        d = desired()
        inst = theirs(d)
        proof = identity.prove(inst, OWNER, d.name, record_for(inst))
        assert not proof.ours
        text = proof.refusal(inst)
        assert inst.name in text and "u-theirs" in text and "metro local" in text
        assert "another owner" in text and "UKC_SESSION_SECRET" in text

    def test_an_earlier_id_of_this_checkout_still_proves_ownership_once_a_secret_is_set(
        self,
    ) -> None:
        d = desired()
        owner = identity.Owner(PROJECT, "1" * 32, frozenset({"1" * 32, THEIRS}), "secret")
        assert identity.prove(theirs(d), owner, d.name, None).ours

    def test_two_owner_tags_prove_nothing_unless_both_are_ours(self) -> None:
        d = desired()
        inst = instance(d, tags=(*d.tags, f"ukc.owner={THEIRS}"))
        assert not identity.prove(inst, OWNER, d.name, None).ours

    def test_a_name_other_than_the_sessions_is_never_ours(self) -> None:
        d = desired()
        inst = instance(d, name="ukc-abcd1234-other")
        assert not identity.prove(inst, OWNER, d.name, None).ours

    def test_our_owner_tag_on_another_sessions_instance_does_not_make_it_this_sessions(
        self,
    ) -> None:
        d = desired()
        other = tuple(identity.owner_tags(PROJECT, "other", d.instance_hash, OWNER_ID))
        inst = instance(d, tags=other)
        assert not identity.prove(inst, OWNER, d.name, None).ours

    @pytest.mark.parametrize(
        ("record", "ours"),
        [
            ("same uuid and a host key", True),
            ("same uuid, never connected", False),
            ("another uuid", False),
            ("no record", False),
        ],
    )
    def test_an_older_ukcs_instance_is_ours_only_if_we_recorded_its_uuid_and_host_key(
        self, record: str, ours: bool
    ) -> None:
        d = desired()
        inst = legacy(d)
        rec = {
            "same uuid and a host key": record_for(inst),
            "same uuid, never connected": record_for(inst, host_key=None),
            "another uuid": record_for(replace(inst, uuid="u-other")),
            "no record": None,
        }[record]
        proof = identity.prove(inst, OWNER, d.name, rec)
        assert proof.ours is ours
        if not ours:
            assert "no ukc.owner tag" in proof.refusal(inst)


class TestOwnerIdFromSecret:
    def test_the_same_secret_and_project_give_the_same_id_anywhere(self) -> None:
        a = identity.owner_id_from_secret("s3cret-s3cret-s3cret", "abcd1234")
        assert a == identity.owner_id_from_secret("s3cret-s3cret-s3cret", "abcd1234")
        assert len(a) == identity.OWNER_ID_LEN and int(a, 16) >= 0

    def test_another_secret_or_project_gives_another_id(self) -> None:
        a = identity.owner_id_from_secret("s3cret-s3cret-s3cret", "abcd1234")
        assert a != identity.owner_id_from_secret("s3cret-s3cret-s3creT", "abcd1234")
        assert a != identity.owner_id_from_secret("s3cret-s3cret-s3cret", "abcd1235")

    def test_the_id_does_not_contain_the_secret(self) -> None:
        secret = "0123456789abcdef0123456789abcdef"
        assert secret not in identity.owner_id_from_secret(secret, "abcd1234")


class TestPlannerRefusesWhatIsNotOurs:
    """Every path that would delete, replace, adopt or use an instance goes through the rule."""

    @pytest.mark.parametrize(
        "change",
        ["nothing", "image changed", "key lost", "ttl expired", "files changed", "stopped"],
    )
    def test_another_owners_instance_is_refused_whatever_would_be_done(self, change: str) -> None:
        d = desired()
        inst = theirs(d)
        rec = converged_record(d, inst)
        if change == "image changed":
            d = replace(d, image="img:2", instance_hash=identity.instance_hash("img:2", None))
        elif change == "key lost":
            d = replace(d, credentials_present=False)
        elif change == "ttl expired":
            d = replace(d, ttl_s=60.0)
            inst = replace(inst, created_at="2020-01-01T00:00:00Z")
        elif change == "files changed":
            d = replace(d, tree=TreeState("tree2", 3, 31, ("a.txt",), 11))
        elif change == "stopped":
            inst = replace(inst, state="stopped")
        p = plan_session(d, inst, rec)
        assert p.actions == ()
        assert p.refusal is not None
        assert p.refusal.instance_name == inst.name and "u-theirs" in p.refusal.reason

    def test_a_refused_session_is_listed_among_the_plans_refusals(self) -> None:
        d = desired()
        inst = theirs(d)
        plan = plan_sessions([d], {inst.name: inst}, StatusDoc(), NOW, owner=OWNER)
        assert [r.session for r in plan.refusals] == ["hello"]

    def test_an_older_ukcs_instance_this_checkout_connected_to_expires_normally(self) -> None:
        d = desired(ttl_s=60.0)
        inst = legacy(d, created_at="2020-01-01T00:00:00Z")
        rec = converged_record(d, inst)
        assert rec.instance is not None
        rec.instance.pin = "SHA256:abc"
        p = plan_session(d, inst, rec)
        assert p.refusal is None
        assert p.actions == (
            actions.DeleteInstance(
                "hello",
                inst.name,
                "local",
                "ttl of 1m expired at 2020-01-01T00:01:00Z",
                forget=True,
                final_phase="Expired",
                instance_uuid="u-legacy",
            ),
        )

    @pytest.mark.parametrize("change", ["image changed", "key lost", "ttl expired"])
    def test_every_delete_of_our_instance_names_its_uuid_and_its_metro(self, change: str) -> None:
        d = desired()
        inst = instance(d, metro="fra")
        rec = converged_record(d, inst)
        if change == "image changed":
            d = replace(d, image="img:2", instance_hash=identity.instance_hash("img:2", None))
        elif change == "key lost":
            d = replace(d, credentials_present=False)
        else:
            d = replace(d, ttl_s=60.0)
            inst = replace(inst, created_at="2020-01-01T00:00:00Z")
        deletes = [
            a for a in plan_session(d, inst, rec).actions if isinstance(a, actions.DeleteInstance)
        ]
        assert [(x.instance_uuid, x.metro) for x in deletes] == [("u-1", "fra")]


class TestPruneOwnership:
    def _inventory(self, inst: Instance, host_key: str | None = None) -> StatusDoc:
        return StatusDoc(
            sessions={
                "old": SessionStatus(phase="Ready", instance=record_for(inst, host_key=host_key))
            }
        )

    def _old(self, owner_id: str | None) -> Instance:
        tags = identity.owner_tags(PROJECT, "old", "0" * 12, owner_id or "x")
        if owner_id is None:
            tags = tags[:-1]
        name = identity.instance_name(PROJECT, "old")
        return Instance("u-old", name, "running", tags=tuple(tags), metro="local")

    def test_an_inventoried_instance_of_another_owner_is_refused_not_pruned(self) -> None:
        old = self._old(THEIRS)
        p = plan_sessions(
            [desired()],
            {},
            self._inventory(old),
            NOW,
            owner=OWNER,
            prune=True,
            claimed={"old": old},
        )
        assert p.prunes == ()
        assert [(r.session, r.instance_name) for r in p.prune_refusals] == [("old", old.name)]

    def test_an_inventoried_instance_of_ours_is_pruned_by_uuid(self) -> None:
        old = self._old(OWNER_ID)
        p = plan_sessions(
            [desired()],
            {},
            self._inventory(old),
            NOW,
            owner=OWNER,
            prune=True,
            claimed={"old": old},
        )
        assert [x.instance_uuid for x in p.prunes] == ["u-old"] and p.prune_refusals == ()

    @pytest.mark.parametrize(("host_key", "pruned"), [("SHA256:abc", True), (None, False)])
    def test_an_older_ukcs_instance_is_pruned_only_with_uuid_and_host_key_on_record(
        self, host_key: str | None, pruned: bool
    ) -> None:
        old = self._old(None)
        p = plan_sessions(
            [desired()],
            {},
            self._inventory(old, host_key),
            NOW,
            owner=OWNER,
            prune=True,
            claimed={"old": old},
        )
        assert bool(p.prunes) is pruned and bool(p.prune_refusals) is not pruned


class TestPlanDelete:
    def test_our_instance_is_deleted_by_uuid(self) -> None:
        d = desired()
        inst = instance(d)
        p = plan_delete([(d.name, d.instance_name, "local")], {inst.name: inst}, StatusDoc(), OWNER)
        (splan,) = p.sessions
        assert splan.actions == (
            actions.DeleteInstance("hello", inst.name, "local", "ukc delete", instance_uuid="u-1"),
        )

    def test_another_owners_instance_is_refused(self) -> None:
        d = desired()
        inst = theirs(d)
        p = plan_delete([(d.name, d.instance_name, "local")], {inst.name: inst}, StatusDoc(), OWNER)
        (splan,) = p.sessions
        assert splan.actions == () and splan.refusal is not None
        assert p.refusals == (splan.refusal,)

    def test_a_gone_instance_is_a_no_op(self) -> None:
        d = desired()
        p = plan_delete([(d.name, d.instance_name, "local")], {}, StatusDoc(), OWNER)
        assert p.sessions[0].actions == () and p.refusals == ()


def test_a_recorded_pin_applies_only_to_the_very_instance_it_was_learnt_from() -> None:
    d = desired()
    inst = instance(d, uuid="u-1")
    rec = record_for(inst, host_key="SHA256:first")
    assert identity.recorded_pin(rec, inst) == "SHA256:first"
    assert identity.recorded_pin(rec, replace(inst, uuid="u-2")) is None  # a replacement
    assert identity.recorded_pin(rec, replace(inst, name="ukc-other-a")) is None
    assert identity.recorded_pin(None, inst) is None


def test_an_instance_is_reached_by_the_transport_it_was_made_for_until_it_is_replaced() -> None:
    def made_for(*tags: str) -> Instance:
        return Instance(uuid="u-1", name="ukc-p-s", state="running", tags=tags)

    assert identity.instance_transport(made_for("ukc.exec=ssh"), "plugin") == "ssh"
    assert identity.instance_transport(made_for("ukc.exec=plugin"), "ssh") == "plugin"
    # an older ukc's instance (no tag), or a tag no transport answers to: the spec's
    assert identity.instance_transport(made_for(), "plugin") == "plugin"
    assert identity.instance_transport(made_for("ukc.exec=pigeon"), "ssh") == "ssh"
