"""The planner is pure: these tests need no network, no clock and no files."""

from __future__ import annotations

from dataclasses import replace

import pytest

from reconciler.cloud.model import Instance, Volume
from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import CommandIntent, DesiredSession, TreeState
from reconciler.reconcile.plan import plan_delete, plan_sessions
from reconciler.status.schema import (
    InstanceRecord,
    SessionStatus,
    StatusDoc,
)
from tests.support.planning import (
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


class TestANewSession:
    def test_a_session_without_instance_is_created_synced_run_and_brought_back(self) -> None:
        d = desired()
        p = plan_one(d, None, None)
        assert kinds(p) == [
            "CreateInstance",
            "WaitReady",
            "SyncUp",
            "RunCommand",
            "RunCommand",
            "SyncBack",
        ]
        assert p.actions[0] == actions.CreateInstance(
            "hello", d.instance_name, "local", "no instance"
        )
        sync = p.actions[2]
        assert isinstance(sync, actions.SyncUp) and sync.full and sync.files == 3

    def test_only_the_last_command_before_a_sync_back_says_a_pull_follows(self) -> None:
        d = desired()
        runs = [a for a in plan_one(d, None, None).actions if isinstance(a, actions.RunCommand)]
        assert [r.pull_follows for r in runs] == [False, True]
        runs = [
            a
            for a in plan_one(replace(d, back=()), None, None).actions
            if isinstance(a, actions.RunCommand)
        ]
        assert [r.pull_follows for r in runs] == [False, False]

    def test_every_command_of_a_new_instance_runs_because_the_instance_is_new(self) -> None:
        p = plan_one(desired(), None, None)
        reasons = [a.reason for a in p.actions if isinstance(a, actions.RunCommand)]
        assert reasons == ["new instance", "new instance"], "nothing re-ran on a new instance"

    def test_an_instance_deleted_out_of_band_is_recreated_with_that_reason(self) -> None:
        d = desired()
        rec = converged_record(d, instance(d))
        p = plan_one(d, None, rec)
        assert p.actions[0] == actions.CreateInstance(
            "hello", d.instance_name, "local", "instance deleted out of band"
        )
        assert "RunCommand" in kinds(p)


class TestAConvergedSession:
    def test_a_second_plan_does_nothing(self) -> None:
        d = desired()
        inst = instance(d)
        p = plan_one(d, inst, converged_record(d, inst))
        assert p.actions == ()
        assert any("unchanged since its last success" in n for n in p.noops)

    def test_standby_is_fine_because_traffic_wakes_it(self) -> None:
        d = desired()
        inst = instance(d, state="standby")
        p = plan_one(d, inst, converged_record(d, inst))
        assert p.actions == ()

    def test_an_unknown_state_is_not_acted_on_and_does_not_crash(self) -> None:
        d = desired()
        inst = instance(d, state="hibernating-v2")
        p = plan_one(d, inst, converged_record(d, inst))
        assert p.actions == ()
        assert any("hibernating-v2" in n for n in p.noops)


class TestChanges:
    def test_a_changed_file_resyncs_and_reruns_every_command(self) -> None:
        d = desired()
        inst = instance(d)
        rec = converged_record(d, inst)
        d2 = replace(
            d,
            tree=TreeState(digest="tree2", files=3, bytes=31, uploads=("a.txt",), upload_bytes=11),
        )
        p = plan_one(d2, inst, rec)
        assert kinds(p) == ["WaitReady", "SyncUp", "RunCommand", "RunCommand", "SyncBack"]
        sync = p.actions[1]
        assert isinstance(sync, actions.SyncUp)
        assert (sync.files, sync.bytes, sync.full, sync.sample) == (1, 11, False, ("a.txt",))

    def test_changing_the_second_command_reruns_only_it(self) -> None:
        d = desired()
        inst = instance(d)
        rec = converged_record(d, inst)
        d2 = replace(
            d,
            commands=(d.commands[0], CommandIntent("test", "make check", 60.0)),
        )
        p = plan_one(d2, inst, rec)
        runs = [a for a in p.actions if isinstance(a, actions.RunCommand)]
        assert [(r.name, r.reason) for r in runs] == [("test", "command changed")]
        assert "SyncUp" not in kinds(p)

    def test_once_a_command_reruns_the_later_ones_rerun_too(self) -> None:
        d = desired()
        inst = instance(d)
        d2 = replace(d, commands=(CommandIntent("build", "make all", 60.0), d.commands[1]))
        p = plan_one(d2, inst, converged_record(d, inst))
        runs = [a for a in p.actions if isinstance(a, actions.RunCommand)]
        assert [(r.name, r.reason) for r in runs] == [
            ("build", "command changed"),
            ("test", "an earlier command re-ran"),
        ]

    def test_a_failed_command_is_run_again(self) -> None:
        d = desired()
        inst = instance(d)
        rec = converged_record(d, inst)
        rec.commands[1].exit_code = 3
        rec.commands[1].last_success_hash = ""
        p = plan_one(d, inst, rec)
        runs = [a for a in p.actions if isinstance(a, actions.RunCommand)]
        assert [(r.name, r.reason) for r in runs] == [("test", "last run failed")]

    def test_a_changed_env_reruns_commands_but_sends_no_files(self) -> None:
        d = desired()
        inst = instance(d)
        p = plan_one(replace(d, env_fingerprint="env2"), inst, converged_record(d, inst))
        assert kinds(p) == ["WaitReady", "RunCommand", "RunCommand", "SyncBack"]

    def test_a_stopped_instance_is_started_and_fully_resynced(self) -> None:
        d = desired()
        inst = instance(d, state="stopped")
        p = plan_one(d, inst, converged_record(d, inst))
        assert kinds(p)[:3] == ["StartInstance", "WaitReady", "SyncUp"]
        sync = p.actions[2]
        assert isinstance(sync, actions.SyncUp) and sync.full

    def test_a_cold_booted_instance_is_fully_resynced_and_its_commands_run_again(self) -> None:
        d = desired()
        inst = instance(d)
        rec = converged_record(d, inst)
        p = plan_one(d, replace(inst, start_count=2), rec)
        assert kinds(p) == ["WaitReady", "SyncUp", "RunCommand", "RunCommand", "SyncBack"]
        sync = p.actions[1]
        assert isinstance(sync, actions.SyncUp)
        assert sync.reason == "instance restarted since the last sync"
        runs = [a for a in p.actions if isinstance(a, actions.RunCommand)]
        assert runs[0].reason == "instance booted again since this ran: /workspace starts empty"

    def test_a_stopped_instance_runs_its_commands_again_after_the_start(self) -> None:
        d = desired()
        inst = instance(d, state="stopped")
        p = plan_one(d, inst, converged_record(d, inst))
        runs = [a for a in p.actions if isinstance(a, actions.RunCommand)]
        assert runs[0].reason == "instance is stopped: its boot starts with an empty /workspace"

    def test_a_cold_boot_of_a_session_whose_workspace_is_a_volume_keeps_its_commands(
        self,
    ) -> None:
        d = desired(volume_mb=2048)
        inst = instance(d)
        rec = converged_record(d, inst)
        for state, count in (("running", 2), ("stopped", 1)):
            p = plan_one(d, replace(inst, state=state, start_count=count), rec)
            assert not [a for a in p.actions if isinstance(a, actions.RunCommand)], state
            # the files are still checked against the tree after the boot
            assert "SyncUp" in kinds(p)

    def test_a_record_from_before_boots_were_recorded_keeps_its_commands(self) -> None:
        d = desired()
        inst = instance(d)
        rec = converged_record(d, inst)
        for command in rec.commands:
            command.start_count = None
        p = plan_one(d, replace(inst, start_count=2), rec)
        assert kinds(p) == ["WaitReady", "SyncUp"]

    def test_a_new_image_replaces_the_instance_after_bringing_outputs_home(self) -> None:
        d = desired()
        inst = instance(d)
        rec = converged_record(d, inst)
        new_hash = identity.instance_hash("img:2", None)
        d2 = replace(d, image="img:2", instance_hash=new_hash)
        p = plan_one(d2, inst, rec)
        assert kinds(p)[:4] == ["WaitReady", "SyncBack", "DeleteInstance", "CreateInstance"]
        delete = p.actions[2]
        assert isinstance(delete, actions.DeleteInstance) and not delete.forget

    def test_a_lost_private_key_replaces_the_unreachable_instance(self) -> None:
        d = desired(credentials_present=False)
        inst = instance(d)
        p = plan_one(d, inst, converged_record(d, inst))
        assert kinds(p)[:2] == ["DeleteInstance", "CreateInstance"]
        create = p.actions[1]
        assert isinstance(create, actions.CreateInstance) and "key" in create.reason

    def test_a_halted_tree_plans_nothing_and_says_why(self) -> None:
        d = desired(tree=TreeState("", 0, 0, halted="directory ./work is missing"))
        p = plan_one(d, None, None)
        assert p.actions == ()
        assert p.noops == ("not syncing: directory ./work is missing",)


class TestTtl:
    def test_an_expired_session_is_deleted(self) -> None:
        d = desired(ttl_s=3600.0)
        inst = instance(d, created_at="2020-01-01T00:00:00Z")
        p = plan_one(d, inst, converged_record(d, inst))
        assert len(p.actions) == 1
        act = p.actions[0]
        assert isinstance(act, actions.DeleteInstance)
        assert act.final_phase == "Expired" and "ttl" in act.reason

    def test_an_unexpired_session_is_kept(self) -> None:
        d = desired(ttl_s=3600.0)
        created = "2027-01-15T07:30:00Z"  # NOW is 2027-01-15T08:00:00Z
        inst = instance(d, created_at=created)
        assert plan_one(d, inst, converged_record(d, inst)).actions == ()

    def test_an_expired_session_is_not_recreated_until_its_spec_changes(self) -> None:
        d = desired(ttl_s=3600.0)
        rec = SessionStatus(phase="Expired", spec_hash=d.spec_hash)
        assert plan_one(d, None, rec).actions == ()
        assert kinds(plan_one(replace(d, spec_hash="spec2"), None, rec))[0] == "CreateInstance"


class TestPrune:
    def _world(self) -> tuple[DesiredSession, Instance, StatusDoc]:
        d = desired()
        gone_hash = identity.instance_hash("img:1", None)
        old = Instance(
            uuid="u-old",
            name=identity.instance_name(PROJECT, "old"),
            state="running",
            tags=tuple(identity.owner_tags(PROJECT, "old", gone_hash, OWNER_ID)),
            metro="local",
        )
        doc = StatusDoc(
            sessions={
                "old": SessionStatus(
                    phase="Ready",
                    instance=InstanceRecord(name=old.name, uuid="u-old", metro="local"),
                )
            }
        )
        return d, old, doc

    def test_prune_deletes_an_owned_inventoried_session_that_no_spec_declares(self) -> None:
        d, old, doc = self._world()
        p = plan_sessions(
            [d], {old.name: old}, doc, NOW, owner=OWNER, prune=True, claimed={"old": old}
        )
        assert [(x.instance_name, x.instance_uuid) for x in p.prunes] == [(old.name, "u-old")]

    def test_prune_never_deletes_what_is_not_in_the_inventory(self) -> None:
        d, old, _ = self._world()
        p = plan_sessions(
            [d], {old.name: old}, StatusDoc(), NOW, owner=OWNER, prune=True, claimed={"old": old}
        )
        assert p.prunes == ()

    def test_prune_never_deletes_an_instance_whose_name_differs_from_the_inventory(self) -> None:
        d, old, doc = self._world()
        other = replace(old, name="someone-else")
        p = plan_sessions([d], {}, doc, NOW, owner=OWNER, prune=True, claimed={"old": other})
        assert p.prunes == ()

    def test_without_prune_nothing_is_deleted(self) -> None:
        d, old, doc = self._world()
        p = plan_sessions(
            [d], {old.name: old}, doc, NOW, owner=OWNER, prune=False, claimed={"old": old}
        )
        assert p.prunes == ()


def test_the_planner_is_deterministic_for_equal_inputs() -> None:
    d = desired()
    a = plan_sessions([d], {}, StatusDoc(), NOW, owner=OWNER)
    b = plan_sessions([d], {}, StatusDoc(), NOW, owner=OWNER)
    assert a == b


class TestWorkspaceInMemory:
    def test_a_tree_that_with_its_margin_does_not_fit_memory_mb_is_warned_about(self) -> None:
        d = desired(tree=TreeState(digest="t", files=9, bytes=3900 << 20), memory_mb=4096)
        p = plan_sessions([d], {}, StatusDoc(), NOW, owner=OWNER)
        [warning] = p.warnings
        assert "session hello" in warning and "memory_mb 4096" in warning
        assert "workspace: {volume:" in warning

    def test_a_tree_that_fits_with_its_margin_is_not_warned_about(self) -> None:
        d = desired(tree=TreeState(digest="t", files=9, bytes=3000 << 20), memory_mb=4096)
        assert plan_sessions([d], {}, StatusDoc(), NOW, owner=OWNER).warnings == ()

    def test_a_session_whose_workspace_is_on_a_volume_is_not_warned_about(self) -> None:
        d = desired(
            tree=TreeState(digest="t", files=9, bytes=3900 << 20), memory_mb=4096, volume_mb=8192
        )
        assert plan_sessions([d], {}, StatusDoc(), NOW, owner=OWNER).warnings == ()

    def test_the_instance_hash_of_a_volume_less_session_is_the_one_from_before_volumes(
        self,
    ) -> None:
        # why: a changed hash would replace every existing instance after an upgrade
        assert identity.instance_hash("img:1", None) == identity.instance_hash("img:1", None, None)
        assert identity.instance_hash("img:1", 512) == "f732379b82e4"  # as before volumes
        assert identity.instance_hash("img:1", None, 2048) != identity.instance_hash("img:1", None)


class TestDeleteWithVolumes:
    def _world(self) -> tuple[DesiredSession, Instance, StatusDoc]:
        d = desired()
        inst = instance(d)
        return d, inst, StatusDoc(sessions={d.name: converged_record(d, inst)})

    def test_the_sessions_volumes_proven_ours_go_with_its_instance(self) -> None:
        d, inst, doc = self._world()
        ours = Volume("v-1", "ws-1", tags=d.tags, metro="local")
        p = plan_delete(
            [(d.name, d.instance_name, "local")], {inst.name: inst}, doc, OWNER, {d.name: [ours]}
        )
        [delete] = p.sessions[0].actions
        assert isinstance(delete, actions.DeleteInstance)
        assert delete.volumes == (("v-1", "ws-1"),)
        assert "and 1 volume(s)" in delete.describe()

    @pytest.mark.parametrize(
        "tags",
        [
            # another checkout's (or an attacker's) volume claiming the session
            ("ukc", f"ukc.project={PROJECT}", "ukc.session=hello", "ukc.owner=" + "f" * 32),
            # ours and someone else's owner tag: not provably ours
            (
                "ukc",
                f"ukc.project={PROJECT}",
                "ukc.session=hello",
                f"ukc.owner={OWNER_ID}",
                "ukc.owner=" + "f" * 32,
            ),
            # no owner tag at all
            ("ukc", f"ukc.project={PROJECT}", "ukc.session=hello"),
            # our owner tag on another session's volume
            ("ukc", f"ukc.project={PROJECT}", "ukc.session=other", f"ukc.owner={OWNER_ID}"),
        ],
    )
    def test_a_volume_not_provably_the_sessions_is_left_alone(self, tags: tuple[str, ...]) -> None:
        d, inst, doc = self._world()
        theirs = Volume("v-2", "not-mine", tags=tags, metro="local")
        p = plan_delete(
            [(d.name, d.instance_name, "local")], {inst.name: inst}, doc, OWNER, {d.name: [theirs]}
        )
        [delete] = p.sessions[0].actions
        assert isinstance(delete, actions.DeleteInstance)
        assert delete.volumes == ()
        assert any("not-mine" in n and "left alone" in n for n in p.sessions[0].noops)
