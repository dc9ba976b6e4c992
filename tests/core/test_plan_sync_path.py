"""`ukc plan -v` names each session's sync path, from what an earlier contact recorded."""

from __future__ import annotations

from dataclasses import replace

from reconciler.cli.render import render_plan
from reconciler.reconcile import actions
from tests.support.planning import converged_record, desired, instance, plan_one


def test_a_recorded_shell_path_of_the_observed_instance_is_named() -> None:
    d = desired()
    inst = instance(d)
    d = replace(d, tree=replace(d.tree, tools=(inst.uuid, "shell")))
    assert plan_one(d, inst, converged_record(d, inst)).sync_path == "shell+tar"


def test_a_recorded_python_path_is_named_the_python_helper() -> None:
    d = desired()
    inst = instance(d)
    d = replace(d, tree=replace(d.tree, tools=(inst.uuid, "python")))
    assert plan_one(d, inst, converged_record(d, inst)).sync_path == "python helper"


def test_a_record_of_another_instance_says_nothing_about_this_one() -> None:
    d = desired()
    inst = instance(d)
    d = replace(d, tree=replace(d.tree, tools=("an-older-uuid", "shell")))
    path = plan_one(d, inst, converged_record(d, inst)).sync_path
    assert path == "not known until first contact"


def test_a_new_instance_is_not_known_until_first_contact() -> None:
    d = desired()
    d = replace(d, tree=replace(d.tree, tools=("whatever", "python")))
    assert plan_one(d, None, None).sync_path == "not known until first contact"


def test_plan_verbose_prints_it_and_the_short_plan_does_not() -> None:
    d = desired()
    inst = instance(d)
    d = replace(d, tree=replace(d.tree, tools=(inst.uuid, "shell")))
    plan = actions.Plan(sessions=(plan_one(d, inst, converged_record(d, inst)),))
    assert "    = sync path: shell+tar" in render_plan(plan, verbose=True)
    assert not any("sync path" in line for line in render_plan(plan))
