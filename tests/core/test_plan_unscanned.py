"""A session planned before its tree was scanned (the apply's first look): only a missing
instance is made and waited for; the rest waits for the observation with the tree."""

from __future__ import annotations

from dataclasses import replace

from reconciler.reconcile import actions
from reconciler.reconcile.desired import DesiredSession, TreeState
from reconciler.reconcile.plan import plan_sessions
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from tests.support.planning import (
    NOW,
    OWNER,
    converged_record,
    desired,
    instance,
    kinds,
    plan_one,
)

UNSCANNED = TreeState(digest="", files=0, bytes=0, scanned=False)


class TestBeforeTheTreeIsScanned:
    def test_a_missing_instance_is_created_and_waited_for_and_nothing_else(self) -> None:
        d = desired(tree=UNSCANNED)
        p = plan_one(d, None, None)
        assert kinds(p) == ["CreateInstance", "WaitReady"]
        assert p.actions[0] == actions.CreateInstance(
            "hello", d.instance_name, "local", "no instance"
        )
        assert p.actions[1] == actions.WaitReady(
            "hello", d.instance_name, d.transport, push_follows=True
        )

    def test_the_wait_for_an_instance_made_ahead_says_a_push_follows_and_a_full_plans_does_not(
        self,
    ) -> None:
        # the sync helper then starts as soon as the sandbox answers; in a full plan the push
        # is the next action anyway
        ahead = plan_one(desired(tree=UNSCANNED), None, None).actions[1]
        assert isinstance(ahead, actions.WaitReady) and ahead.push_follows
        full = plan_one(desired(), None, None)
        waits = [a for a in full.actions if isinstance(a, actions.WaitReady)]
        assert waits and not any(w.push_follows for w in waits)

    def test_an_instance_deleted_out_of_band_is_made_with_the_reason_the_full_plan_gives(
        self,
    ) -> None:
        d = desired(tree=UNSCANNED)
        rec = converged_record(replace(d, tree=TreeState("tree1", 3, 30)), instance(d))
        create = plan_one(d, None, rec).actions[0]
        full = plan_one(desired(), None, rec).actions[0]
        assert create == full
        assert isinstance(create, actions.CreateInstance)
        assert create.reason == "instance deleted out of band"

    def test_a_session_whose_instance_exists_is_left_to_the_plan_with_the_tree(self) -> None:
        d = desired(tree=UNSCANNED)
        for state in ("running", "standby", "stopped"):
            p = plan_one(d, instance(d, state=state), None)
            assert p.actions == () and not p.error, state

    def test_a_tree_that_cannot_sync_gets_no_instance(self) -> None:
        d = desired(tree=replace(UNSCANNED, halted="local root ./work is missing"))
        p = plan_one(d, None, None)
        assert p.actions == ()
        assert "missing" in p.error

    def test_a_session_whose_commands_lack_a_secret_gets_no_instance(self) -> None:
        d = desired(tree=UNSCANNED, secrets_missing=("s.yaml:3: secret_env: TOKEN is not set",))
        assert plan_one(d, None, None).actions == ()

    def test_an_expired_session_gets_no_instance(self) -> None:
        d = desired(tree=UNSCANNED, ttl_s=60.0)
        expired = SessionStatus(phase="Expired", spec_hash=d.spec_hash)
        assert plan_one(d, None, expired).actions == ()
        # its ttl passed while its instance was gone: the full plan records it expired
        gone = SessionStatus(
            phase="Ready",
            spec_hash=d.spec_hash,
            created_at="2020-01-01T00:00:00Z",
            instance=InstanceRecord(
                name=d.instance_name, uuid="u-1", created_at="2020-01-01T00:00:00Z"
            ),
        )
        assert plan_one(d, None, gone).actions == ()
        assert kinds(plan_one(desired(ttl_s=60.0), None, gone)) == ["DeleteInstance"]


def _unlisted(d: DesiredSession, rec: SessionStatus | None) -> actions.SessionPlan:
    """The first look's plan made before the list answered (from the records' word)."""
    doc = StatusDoc(sessions={d.name: rec} if rec is not None else {})
    return plan_sessions([d], {}, doc, NOW, owner=OWNER, listed=False).sessions[0]


class TestBeforeTheListAnswers:
    def test_a_session_the_records_give_no_instance_is_created_and_the_create_says_unlisted(
        self,
    ) -> None:
        d = desired(tree=UNSCANNED)
        deleted = SessionStatus(
            phase="Deleted", instance=InstanceRecord(name=d.instance_name, uuid="u-1")
        )
        for rec in (None, SessionStatus(), deleted):
            p = _unlisted(d, rec)
            assert kinds(p) == ["CreateInstance", "WaitReady"]
            create = p.actions[0]
            assert isinstance(create, actions.CreateInstance) and create.unlisted
        # a create planned from a list is judged by it: no flag
        listed = plan_one(d, None, None).actions[0]
        assert isinstance(listed, actions.CreateInstance) and not listed.unlisted

    def test_a_session_whose_records_name_an_instance_is_left_to_the_list(self) -> None:
        # the records may be stale (deleted out of band); the list says so, not this look
        d = desired(tree=UNSCANNED)
        rec = converged_record(replace(d, tree=TreeState("tree1", 3, 30)), instance(d))
        assert _unlisted(d, rec).actions == ()
        assert (
            _unlisted(
                d, SessionStatus(instance=InstanceRecord(name=d.instance_name, uuid="u-1"))
            ).actions
            == ()
        )

    def test_what_the_first_look_would_not_make_it_does_not_make_unlisted_either(self) -> None:
        halted = desired(tree=replace(UNSCANNED, halted="local root ./work is missing"))
        assert _unlisted(halted, None).actions == ()
        d = desired(tree=UNSCANNED, ttl_s=60.0)
        assert _unlisted(d, SessionStatus(phase="Expired", spec_hash=d.spec_hash)).actions == ()
        scanned = desired()  # a scanned tree planned without a list: still only the create
        assert kinds(_unlisted(scanned, None)) == ["CreateInstance", "WaitReady"]
