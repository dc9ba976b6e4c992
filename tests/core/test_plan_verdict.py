"""The planner's verdict is apply's: errors it can know, reasons after failures, sync-back
after a failed run, commands judged without an unset secret, and orphans."""

from __future__ import annotations

from dataclasses import replace

from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import TreeState
from reconciler.reconcile.plan import command_public_hash, plan_sessions
from reconciler.status.schema import StatusDoc
from tests.support.planning import (
    INST_HASH,
    NOW,
    OWNER,
    PROJECT,
    converged_record,
    desired,
    instance,
    plan_one,
)


def test_a_tree_that_cannot_be_synced_is_an_error_of_the_plan_not_up_to_date() -> None:
    d = desired(tree=TreeState(digest="", files=0, bytes=0, halted="work does not exist"))
    splan = plan_one(d, None, None)
    assert splan.actions == ()
    assert "work does not exist" in splan.error
    whole = plan_sessions([d], {}, StatusDoc(), NOW, owner=OWNER)
    assert whole.errors == {"hello": splan.error}


def test_the_reason_after_a_timed_out_or_interrupted_first_run_names_it() -> None:
    d = desired()
    inst = instance(d)
    for flag, reason in (
        ("timed_out", "last run timed out"),
        ("interrupted", "last run was interrupted"),
    ):
        rec = converged_record(d, inst)
        # a first run that never succeeded: no success hash, no instance recorded
        rec.commands[0] = rec.commands[0].model_copy(
            update={flag: True, "exit_code": None, "last_success_hash": "", "instance_uuid": ""}
        )
        runs = [a for a in plan_one(d, inst, rec).actions if isinstance(a, actions.RunCommand)]
        assert (runs[0].name, runs[0].reason) == ("build", reason)


def test_the_sync_back_after_commands_is_performed_even_when_one_fails() -> None:
    d = desired()
    splan = plan_one(d, None, None)
    back = [a for a in splan.actions if isinstance(a, actions.SyncBack)]
    assert len(back) == 1 and back[0].always


def test_without_a_secrets_value_commands_are_judged_by_the_rest_of_their_inputs() -> None:
    d = desired()
    inst = instance(d)
    rec = converged_record(d, inst)
    for c, cmd in zip(rec.commands, d.commands, strict=True):
        c.last_success_public_hash = command_public_hash(d, cmd)
    blind = replace(d, env_fingerprint="", secrets_missing=("s.yaml:4: secret_env.K: ...",))
    assert plan_one(blind, inst, rec).changes == ()
    changed = replace(blind, tree=replace(d.tree, digest="tree2"))
    splan = plan_one(changed, inst, rec)
    assert splan.actions == ()
    assert splan.error.startswith("s.yaml:4: secret_env.K")
    assert "command 'build' must run" in splan.error


def test_a_session_in_the_inventory_without_a_spec_is_listed_as_an_orphan_without_prune() -> None:
    tags = tuple(identity.owner_tags(PROJECT, "gone", INST_HASH, OWNER.id))
    keep, gone = desired(), desired(name="gone", instance_name="ukc-abcd1234-gone", tags=tags)
    inst_keep, inst_gone = instance(keep), instance(gone, uuid="u-2", name=gone.instance_name)
    doc = StatusDoc(
        sessions={
            "hello": converged_record(keep, inst_keep),
            "gone": converged_record(gone, inst_gone),
        }
    )
    observed = {i.name: i for i in (inst_keep, inst_gone)}
    claimed = {"hello": inst_keep, "gone": inst_gone}
    plan = plan_sessions([keep], observed, doc, NOW, owner=OWNER, claimed=claimed)
    assert plan.orphans == (("gone", "ukc-abcd1234-gone"),)
    assert plan.empty and plan.prunes == ()
    pruning = plan_sessions([keep], observed, doc, NOW, owner=OWNER, prune=True, claimed=claimed)
    assert pruning.orphans == () and [p.session for p in pruning.prunes] == ["gone"]
