"""Using what the platform offers, decided by the pure planner: autokill follows the spec, a
suspended instance is woken only for work and suspended again once converged, and a fan-out
the account's quota cannot hold is known before anything is created."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from reconciler.cloud.quotas import Quota
from reconciler.errors import ApiError
from reconciler.reconcile import actions, identity, loop, quota
from reconciler.reconcile.desired import DesiredSession, TreeState
from reconciler.reconcile.plan import plan_sessions
from reconciler.spec.models import SessionSpec
from reconciler.status.schema import StatusDoc, format_time
from tests.support.planning import (
    INST_HASH,
    NOW,
    OWNER,
    OWNER_ID,
    PROJECT,
    converged_record,
    desired,
    instance,
    kinds,
    plan_one,
)
from tests.support.specfiles import load_one, spec_error

DAY_MS = 86_400_000


def named(name: str, **overrides: object) -> DesiredSession:
    """A desired session of its own name (its instance name and owner tags follow)."""
    return desired(
        name=name,
        instance_name=identity.instance_name(PROJECT, name),
        tags=tuple(identity.owner_tags(PROJECT, name, INST_HASH, OWNER_ID)),
        **overrides,
    )


class TestAutokill:
    def test_an_instance_whose_autokill_differs_from_the_spec_gets_it_set(self) -> None:
        d = desired(autokill_ms=DAY_MS)
        inst = instance(d, autokill_ms=0)
        splan = plan_one(d, inst, converged_record(d, inst))
        (change,) = splan.changes
        assert isinstance(change, actions.SetAutokill)
        assert (change.instance_uuid, change.time_ms) == (inst.uuid, DAY_MS)
        assert change.reason == "it is off, the spec says 1d"

    def test_an_autokill_turned_off_in_the_spec_is_set_to_zero(self) -> None:
        d = desired(autokill_ms=None)
        inst = instance(d, autokill_ms=3_600_000)
        (change,) = plan_one(d, inst, converged_record(d, inst)).changes
        assert isinstance(change, actions.SetAutokill) and change.time_ms == 0

    def test_an_instance_read_that_says_nothing_of_autokill_is_left_alone(self) -> None:
        d = desired(autokill_ms=DAY_MS)
        inst = instance(d, autokill_ms=None)
        assert plan_one(d, inst, converged_record(d, inst)).changes == ()

    def test_a_session_whose_instance_vanished_says_autokill_may_have_reclaimed_it(self) -> None:
        d = desired(autokill_ms=DAY_MS)
        rec = converged_record(d, instance(d))
        (create,) = [
            a for a in plan_one(d, None, rec).actions if isinstance(a, actions.CreateInstance)
        ]
        assert "reclaimed by the platform (autokill: deleted once down for 1d)" in create.reason
        plain = desired(autokill_ms=None)
        (again,) = [
            a for a in plan_one(plain, None, rec).actions if isinstance(a, actions.CreateInstance)
        ]
        assert again.reason == "instance deleted out of band"


class TestSuspend:
    def test_a_suspended_instance_with_work_is_woken_before_it_is_reached(self) -> None:
        d = desired(tree=TreeState("tree2", 3, 30, uploads=("a.txt",), upload_bytes=3))
        inst = instance(d, state="standby")
        splan = plan_one(
            d, inst, converged_record(replace(d, tree=TreeState("tree1", 3, 30)), inst)
        )
        (wait,) = [a for a in splan.actions if isinstance(a, actions.WaitReady)]
        assert wait.wake and "waking it from standby" in wait.describe()
        assert "StartInstance" not in kinds(splan)

    def test_a_suspended_instance_with_nothing_to_do_stays_asleep(self) -> None:
        d = desired(suspend=True)
        inst = instance(d, state="standby")
        plan = plan_sessions(
            [d],
            {inst.name: inst},
            StatusDoc(sessions={d.name: converged_record(d, inst)}),
            NOW,
            owner=OWNER,
        )
        assert plan.empty and plan.suspends == ()

    def test_converged_running_sessions_that_ask_for_it_are_suspended_after(self) -> None:
        wants = named("a", suspend=True)
        keeps = named("b", suspend=False)
        observed = {d.instance_name: instance(d) for d in (wants, keeps)}
        doc = StatusDoc(
            sessions={
                d.name: converged_record(d, observed[d.instance_name]) for d in (wants, keeps)
            }
        )
        plan = plan_sessions([wants, keeps], observed, doc, NOW, owner=OWNER)
        assert plan.empty
        assert [(s.session, s.instance_name) for s in plan.suspends] == [("a", wants.instance_name)]

    def test_a_session_apply_would_fail_is_not_suspended(self) -> None:
        d = desired(suspend=True, tree=TreeState("", 0, 0, halted="directory ./work is missing"))
        inst = instance(d)
        plan = plan_sessions(
            [d],
            {inst.name: inst},
            StatusDoc(sessions={d.name: converged_record(d, inst)}),
            NOW,
            owner=OWNER,
        )
        assert plan.sessions[0].error and plan.suspends == ()


def _quota(**figures: tuple[int, int]) -> Quota:
    return Quota.model_validate(
        {
            "used": {k: used for k, (used, _hard) in figures.items()},
            "hard": {k: hard for k, (_used, hard) in figures.items()},
        }
    )


class TestQuota:
    def fan_out(self, n: int, memory_mb: int = 4096) -> tuple[actions.Plan, list]:  # type: ignore[type-arg]
        ds = [
            desired(name=f"s{i}", instance_name=f"ukc-x-s{i}", memory_mb=memory_mb, volume_mb=1024)
            for i in range(n)
        ]
        plan = plan_sessions(ds, {}, StatusDoc(), NOW, owner=OWNER)
        return plan, ds

    def test_a_fan_out_past_the_instance_quota_is_refused_naming_the_figures(self) -> None:
        plan, ds = self.fan_out(12)
        need = quota.needs(plan, ds, {})["local"]
        assert (need.instances, need.memory_mb, need.volumes) == (12, 12 * 4096, 12)
        why = quota.shortfall("local", need, _quota(instances=(40, 50), volumes=(0, 100)))
        assert why is not None
        assert "12 session(s) to create or wake on metro local" in why
        assert "12 instance(s), 10 left (40 of 50 used)" in why
        assert "volume" not in why

    def test_live_memory_and_volumes_are_checked_too(self) -> None:
        plan, ds = self.fan_out(3, memory_mb=2048)
        need = quota.needs(plan, ds, {})["local"]
        why = quota.shortfall("local", need, _quota(live_memory_mb=(4096, 8192), volumes=(99, 100)))
        assert why is not None
        assert "6144 MiB of live memory, 4096 left (4096 of 8192 used)" in why
        assert "3 volume(s), 1 left (99 of 100 used)" in why

    def test_what_fits_and_what_the_quota_does_not_state_pass(self) -> None:
        plan, ds = self.fan_out(3)
        need = quota.needs(plan, ds, {})["local"]
        assert quota.shortfall("local", need, _quota(instances=(0, 3))) is None
        assert quota.shortfall("local", need, Quota()) is None

    def test_a_replace_takes_no_instance_and_an_up_to_date_session_nothing(self) -> None:
        d = desired(memory_mb=1024)
        old = instance(
            d, tags=tuple(t for t in d.tags if not t.startswith("ukc.spec")), memory_mb=1024
        )
        replaced = plan_one(d, old, converged_record(d, old))
        assert "DeleteInstance" in kinds(replaced) and "CreateInstance" in kinds(replaced)
        plan = actions.Plan((replaced,))
        need = quota.needs(plan, [d], {old.name: old})["local"]
        assert (need.instances, need.volumes, need.memory_mb) == (0, 0, 0)
        same = instance(d)
        idle = plan_one(d, same, converged_record(d, same))
        assert quota.needs(actions.Plan((idle,)), [d], {same.name: same}) == {}

    def test_waking_a_suspended_instance_takes_its_live_memory(self) -> None:
        d = desired(memory_mb=4096, tree=TreeState("tree2", 3, 30, uploads=("a",), upload_bytes=1))
        inst = instance(d, state="standby", memory_mb=4096)
        splan = plan_one(
            d, inst, converged_record(replace(d, tree=TreeState("tree1", 3, 30)), inst)
        )
        need = quota.needs(actions.Plan((splan,)), [d], {inst.name: inst})["local"]
        assert (need.instances, need.memory_mb) == (0, 4096)


def _spec(tmp_path: Path, text: str) -> SessionSpec:
    (one,) = load_one(tmp_path, "image: img:1\n" + text).sessions
    return one.spec


class TestTheSpec:
    def test_autokill_is_a_day_or_a_shorter_ttl_unless_given_or_off(self, tmp_path: Path) -> None:
        assert _spec(tmp_path, "name: a\n").autokill_s == 86400
        assert _spec(tmp_path, "name: a\nttl: 2h\n").autokill_s == 7200
        assert _spec(tmp_path, "name: a\nttl: 3d\n").autokill_s == 86400
        assert _spec(tmp_path, "name: a\nautokill: 30m\n").autokill_s == 1800
        assert _spec(tmp_path, "name: a\nautokill: off\n").autokill_s is None
        assert _spec(tmp_path, 'name: a\nautokill: "off"\n').autokill_s is None

    @pytest.mark.parametrize("value", ["true", "0", "-5m", "soon"])
    def test_an_autokill_that_is_not_a_duration_or_off_is_refused_at_its_line(
        self, tmp_path: Path, value: str
    ) -> None:
        message = str(spec_error(tmp_path, f"image: img:1\nname: a\nautokill: {value}\n"))
        assert ":3" in message and "autokill" in message

    def test_suspend_is_on_unless_the_spec_turns_it_off(self, tmp_path: Path) -> None:
        assert _spec(tmp_path, "name: a\n").suspend is True
        assert _spec(tmp_path, "name: a\nsuspend: false\n").suspend is False


class TestReclaimedAfterTheTtl:
    def test_a_session_whose_instance_is_gone_after_its_ttl_is_expired_not_made_anew(
        self,
    ) -> None:
        d = desired(ttl_s=3600.0, autokill_ms=3_600_000)
        inst = instance(d, created_at="2027-01-15T08:00:00Z")
        rec = converged_record(d, inst)
        # created 10,000 s before the planner's clock: its 1h ttl has passed
        rec.instance.created_at = format_time(NOW - 10_000)  # type: ignore[union-attr]
        splan = plan_one(d, None, rec)
        (delete,) = splan.actions
        assert isinstance(delete, actions.DeleteInstance)
        assert delete.final_phase == "Expired" and delete.forget
        assert delete.instance_uuid == inst.uuid
        assert "already gone" in delete.reason and "autokill" in delete.reason
        assert "CreateInstance" not in kinds(splan) and splan.expired

    def test_one_whose_ttl_has_not_passed_is_made_anew(self) -> None:
        d = desired(ttl_s=3600.0)
        inst = instance(d)
        rec = converged_record(d, inst)
        rec.instance.created_at = format_time(NOW - 60)  # type: ignore[union-attr]
        assert "CreateInstance" in kinds(plan_one(d, None, rec))


class _QuotaApi:
    """The one call the quota check makes, answering or failing as told."""

    def __init__(self, answer: Quota | Exception) -> None:
        self.answer = answer
        self.calls = 0

    def get_quotas(self) -> Quota:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


class _Metros:
    def __init__(self, api: _QuotaApi) -> None:
        self.api = api

    def get(self, label: str) -> SimpleNamespace:
        return SimpleNamespace(api=self.api, label=label)


class TestTheQuotaRead:
    def _check(self, api: _QuotaApi, n: int = 3) -> tuple[list[str], list[str]]:
        ds = [named(f"s{i}") for i in range(n)]
        plan = plan_sessions(ds, {}, StatusDoc(), NOW, owner=OWNER)
        obs = SimpleNamespace(instances={})
        return loop._quota_shortfalls(plan, ds, obs, _Metros(api))  # type: ignore[arg-type]

    def test_an_unreadable_quota_is_a_warning_not_a_refusal(self) -> None:
        api = _QuotaApi(ApiError("ukc api local: read the account's quota: http 404", status=404))
        shortfalls, unread = self._check(api)
        assert shortfalls == []
        assert unread == [
            "the quota of metro local was not checked: ukc api local: read the account's "
            "quota: http 404"
        ]

    def test_a_quota_that_cannot_hold_the_fan_out_is_a_refusal(self) -> None:
        api = _QuotaApi(_quota(instances=(9, 10)))
        shortfalls, unread = self._check(api)
        assert unread == [] and len(shortfalls) == 1 and "3 instance(s), 1 left" in shortfalls[0]

    def test_a_plan_that_creates_nothing_reads_no_quota(self) -> None:
        api = _QuotaApi(_quota(instances=(10, 10)))
        assert self._check(api, n=0) == ([], [])
        assert api.calls == 0
