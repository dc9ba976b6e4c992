"""TTL expiry at the planner, the status view and the watch timer: time only ever comes in as
a value (the clock given to the planner), so every case is a table test."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler.cli.plan_output import PlannedGroup, build_document, render_markdown
from reconciler.cli.render import render_plan
from reconciler.reconcile import actions
from reconciler.reconcile.desired import TreeState
from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.plan import plan_sessions
from reconciler.reconcile.watch import Watcher, WatchOptions, expiries
from reconciler.status.schema import (
    InstanceRecord,
    SessionStatus,
    StatusDoc,
    expiry_time,
    format_time,
    parse_time,
)
from tests.support.planning import OWNER, converged_record, desired, instance, kinds

CREATED = "2027-01-15T06:00:00Z"
T0 = parse_time(CREATED) or 0.0


def _plan(now: float, ttl_s: float = 7200.0, rec: SessionStatus | None = None) -> actions.Plan:
    d = desired(ttl_s=ttl_s)
    inst = instance(d, created_at=CREATED)
    record = rec if rec is not None else converged_record(d, inst)
    doc = StatusDoc(sessions={d.name: record})
    return plan_sessions([d], {inst.name: inst}, doc, now, owner=OWNER)


class TestThePlanner:
    def test_expiry_is_judged_by_the_clock_the_planner_is_given(self) -> None:
        assert _plan(T0 + 7199).sessions[0].actions == ()
        assert kinds(_plan(T0 + 7200).sessions[0]) == ["DeleteInstance"]

    def test_an_expired_session_is_marked_expired_and_the_delete_says_when_it_passed(
        self,
    ) -> None:
        (splan,) = _plan(T0 + 7300).sessions
        (delete,) = splan.actions
        assert isinstance(delete, actions.DeleteInstance)
        assert delete.reason == "ttl of 2h expired at 2027-01-15T08:00:00Z"
        assert delete.final_phase == "Expired"
        assert "apply deletes it" in splan.expired and "raise `ttl`" in splan.expired

    def test_an_expired_session_is_deleted_even_when_its_tree_cannot_be_synced(self) -> None:
        d = desired(ttl_s=60.0, tree=TreeState("", 0, 0, halted="directory ./work is missing"))
        inst = instance(d, created_at=CREATED)
        doc = StatusDoc(sessions={d.name: converged_record(d, inst)})
        (splan,) = plan_sessions([d], {inst.name: inst}, doc, T0 + 61, owner=OWNER).sessions
        assert kinds(splan) == ["DeleteInstance"] and not splan.error
        (early,) = plan_sessions([d], {inst.name: inst}, doc, T0 + 59, owner=OWNER).sessions
        assert early.error.startswith("not syncing")

    def test_raising_the_ttl_before_apply_deletes_it_renews_the_session(self) -> None:
        (splan,) = _plan(T0 + 7300, ttl_s=4 * 3600.0).sessions
        assert splan.actions == () and splan.expired == ""

    def test_a_session_already_deleted_for_its_ttl_stays_expired_and_says_how_to_return(
        self,
    ) -> None:
        d = desired(ttl_s=7200.0)
        rec = SessionStatus(phase="Expired", spec_hash=d.spec_hash)
        doc = StatusDoc(sessions={d.name: rec})
        (splan,) = plan_sessions([d], {}, doc, T0 + 9999, owner=OWNER).sessions
        assert splan.actions == ()
        assert "change the spec" in splan.expired
        changed = replace(d, spec_hash="spec-with-a-longer-ttl")
        (back,) = plan_sessions([changed], {}, doc, T0 + 9999, owner=OWNER).sessions
        assert kinds(back)[0] == "CreateInstance" and back.expired == ""

    def test_plan_shows_the_session_as_expired_with_the_delete_apply_will_do(self) -> None:
        lines = render_plan(_plan(T0 + 7300))
        assert lines[0].startswith("session hello: Expired: its ttl of 2h passed at ")
        assert lines[1].startswith("  - delete instance ")
        assert lines[-1].startswith("Plan: 0 to create, 1 to delete")

    def test_the_json_and_markdown_plans_say_the_session_expired(self) -> None:
        group = PlannedGroup(Path("s"), Path("s/.ukc/status.json"), False, _plan(T0 + 7300))
        doc = build_document([group], 0)
        (entry,) = doc.groups[0].sessions
        assert entry.verdict == "delete" and entry.expired and "passed at" in entry.expired
        assert "- Expired: its ttl of 2h passed at" in render_markdown(doc)
        fresh = PlannedGroup(Path("s"), Path("s/.ukc/status.json"), False, _plan(T0))
        assert build_document([fresh], 0).groups[0].sessions[0].expired is None


def _record(phase: str = "Ready", expires_at: str | None = "2027-01-15T08:00:00Z") -> SessionStatus:
    return SessionStatus(
        phase=phase,  # type: ignore[arg-type]
        instance=InstanceRecord(name="ukc-x-hello", uuid="u-1"),
        expires_at=expires_at,
    )


class TestTheStatusView:
    def test_a_session_whose_ttl_passed_shows_as_expired_with_what_deletes_it(self) -> None:
        doc = StatusDoc(sessions={"hello": _record()})
        shown = doc.as_of(T0 + 7200)
        assert shown.sessions["hello"].phase == "Expired"
        assert "`ukc apply`" in shown.sessions["hello"].message
        assert doc.sessions["hello"].phase == "Ready", "the view must not change the document"

    def test_before_its_ttl_or_without_one_a_session_shows_as_recorded(self) -> None:
        doc = StatusDoc(sessions={"a": _record(), "b": _record(expires_at=None)})
        assert doc.as_of(T0 + 7199) == doc
        assert doc.as_of(T0 + 99999).sessions["b"].phase == "Ready"

    def test_a_deleted_session_stays_deleted(self) -> None:
        doc = StatusDoc(sessions={"a": _record(phase="Deleted")})
        assert doc.as_of(T0 + 99999).sessions["a"].phase == "Deleted"


class TestTheWatchTimer:
    def test_the_timer_covers_watched_sessions_whose_instance_still_exists(self) -> None:
        doc = StatusDoc(
            sessions={
                "a": _record(),
                "gone": _record(phase="Expired"),
                "deleted": _record(phase="Deleted"),
                "forever": _record(expires_at=None),
                "other": _record(),
            }
        )
        assert expiries([doc], {"a", "gone", "deleted", "forever"}) == {"a": T0 + 7200}

    def test_each_expiry_fires_once_and_a_renewed_one_fires_again(self) -> None:
        w = Watcher(
            WatchOptions(paths=[]),
            metros=None,  # type: ignore[arg-type]
            reporter=RecordingReporter(),
            environ={},
        )
        w._expiry = {"a": 100.0}
        assert w._expiry_wait(90.0) == 10.0
        assert w._expired_now(99.0) == set()
        assert w._expired_now(100.0) == {"a"}
        # a platform clock behind ours may leave it undeleted: no loop of passes, the
        # periodic resync takes over
        assert w._expired_now(200.0) == set() and w._expiry_wait(200.0) is None
        w._expiry = {"a": 300.0}  # the spec raised its ttl
        assert w._expiry_wait(200.0) == 100.0 and w._expired_now(300.0) == {"a"}

    def test_expires_at_is_rounded_up_so_the_timer_never_fires_before_the_planner_sees_it(
        self,
    ) -> None:
        assert expiry_time(T0 + 0.7, 4.0) == format_time(T0 + 5)
        assert expiry_time(T0, 4.0) == format_time(T0 + 4)
