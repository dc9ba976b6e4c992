"""Per-command `inputs` and `shell`, at the planner: a command re-runs only when the files it
depends on (or its own definition) changed, and once one re-runs every later one does."""

from __future__ import annotations

import json
from dataclasses import replace
from hashlib import sha256

from reconciler.reconcile import actions
from reconciler.reconcile.desired import CommandIntent, DesiredSession, TreeState, command_intents
from reconciler.reconcile.plan import command_input_hash
from reconciler.spec.models import SessionSpec
from reconciler.sync.manifest import Entry, Manifest
from tests.support.planning import converged_record, desired, instance, plan_one


def _files(**contents: str) -> Manifest:
    entries = {"src": Entry("d", 0, 0, 0o755, "")}
    for key, text in contents.items():
        path = key.replace("__", "/").replace("_dot_", ".")
        entries[path] = Entry("f", len(text), 1, 0o644, sha256(text.encode()).hexdigest())
    return Manifest(entries)


def _spec(*commands: dict[str, object], shell: str | None = None) -> SessionSpec:
    extra = {"shell": shell} if shell else {}
    return SessionSpec.model_validate(
        {"name": "hello", "image": "img:1", "commands": list(commands), **extra}
    )


BUILD = {"name": "build", "run": "make", "inputs": ["src/**/*.py"]}
DOCS = {"name": "docs", "run": "make docs", "inputs": ["docs/"]}


def _world(
    manifest: Manifest, pending: tuple[str, ...] = (), *cmds: dict[str, object]
) -> DesiredSession:
    commands = command_intents(_spec(*(cmds or (BUILD, DOCS))), manifest, pending)
    tree = TreeState(manifest.digest, manifest.file_count, manifest.total_bytes, uploads=pending)
    return desired(commands=commands, tree=tree)


def _runs(plan: actions.SessionPlan) -> list[tuple[str, str]]:
    return [(a.name, a.reason) for a in plan.actions if isinstance(a, actions.RunCommand)]


OLD = _files(src__app_dot_py="v1", docs__index_dot_md="d1", README="r1")


class TestInputs:
    def test_a_change_outside_every_commands_inputs_syncs_but_runs_nothing(self) -> None:
        before = _world(OLD)
        inst = instance(before)
        rec = converged_record(before, inst)
        after = _world(
            _files(src__app_dot_py="v1", docs__index_dot_md="d1", README="r2"), ("README",)
        )
        p = plan_one(after, inst, rec)
        assert [type(a).__name__ for a in p.actions] == ["WaitReady", "SyncUp"]
        assert _runs(p) == []

    def test_a_command_re_runs_when_one_of_its_inputs_changed_and_the_plan_names_the_file(
        self,
    ) -> None:
        before = _world(OLD)
        inst = instance(before)
        rec = converged_record(before, inst)
        after = _world(
            _files(src__app_dot_py="v2", docs__index_dot_md="d1", README="r1"), ("src/app.py",)
        )
        p = plan_one(after, inst, rec)
        assert _runs(p)[0] == ("build", "inputs changed: src/app.py")
        run = next(a for a in p.actions if isinstance(a, actions.RunCommand))
        assert (
            run.inputs_digest == after.commands[0].inputs_digest != before.commands[0].inputs_digest
        )

    def test_when_an_earlier_command_re_runs_every_later_one_re_runs_too(self) -> None:
        before = _world(OLD)
        inst = instance(before)
        after = _world(
            _files(src__app_dot_py="v2", docs__index_dot_md="d1", README="r1"), ("src/app.py",)
        )
        p = plan_one(after, inst, converged_record(before, inst))
        # docs' own inputs did not change: it re-runs because it may read what build wrote
        assert _runs(p) == [
            ("build", "inputs changed: src/app.py"),
            ("docs", "an earlier command re-ran"),
        ]

    def test_a_later_command_whose_inputs_changed_re_runs_alone(self) -> None:
        before = _world(OLD)
        inst = instance(before)
        after = _world(
            _files(src__app_dot_py="v1", docs__index_dot_md="d2", README="r1"),
            ("docs/index.md",),
        )
        p = plan_one(after, inst, converged_record(before, inst))
        assert _runs(p) == [("docs", "inputs changed: docs/index.md")]

    def test_a_command_without_inputs_still_re_runs_on_any_synced_change(self) -> None:
        plain = {"name": "all", "run": "make all"}
        before = _world(OLD, (), BUILD, plain)
        inst = instance(before)
        after = _world(
            _files(src__app_dot_py="v1", docs__index_dot_md="d1", README="r2"),
            ("README",),
            BUILD,
            plain,
        )
        p = plan_one(after, inst, converged_record(before, inst))
        assert _runs(p) == [("all", "inputs changed (files, env or image)")]

    def test_a_changed_input_already_sent_by_an_interrupted_apply_still_re_runs_it(self) -> None:
        before = _world(OLD)
        inst = instance(before)
        rec = converged_record(before, inst)
        # the push went through, the command never ran: nothing is pending any more
        after = _world(_files(src__app_dot_py="v2", docs__index_dot_md="d1", README="r1"))
        rec.commands[0].inputs_digest = before.commands[0].inputs_digest
        rec.sync.digest = after.tree.digest
        p = plan_one(after, inst, rec)
        assert _runs(p)[0] == ("build", "inputs changed")
        assert "SyncUp" not in [type(a).__name__ for a in p.actions]

    def test_an_empty_inputs_list_runs_once_and_then_only_when_the_command_changes(self) -> None:
        once = {"name": "setup", "run": "pip install -r requirements.txt", "inputs": []}
        before = _world(OLD, (), once)
        inst = instance(before)
        after = _world(_files(src__app_dot_py="v2", README="r2"), ("src/app.py", "README"), once)
        assert _runs(plan_one(after, inst, converged_record(before, inst))) == []
        changed = _world(OLD, (), {**once, "run": "pip install -U -r requirements.txt"})
        assert _runs(plan_one(changed, inst, converged_record(before, inst))) == [
            ("setup", "command changed")
        ]

    def test_adding_inputs_to_a_command_re_runs_it_once(self) -> None:
        before = _world(OLD, (), {"name": "build", "run": "make"})
        inst = instance(before)
        after = _world(OLD, (), BUILD)
        p = plan_one(after, inst, converged_record(before, inst))
        assert _runs(p) == [("build", "env, image or inputs patterns changed")]


class TestInputDigests:
    def test_the_digest_covers_only_the_files_the_patterns_match(self) -> None:
        (a,) = command_intents(_spec(BUILD), OLD, ())
        (b,) = command_intents(
            _spec(BUILD), _files(src__app_dot_py="v1", docs__index_dot_md="x", README="y"), ()
        )
        (c,) = command_intents(_spec(BUILD), _files(src__app_dot_py="v2", README="r1"), ())
        assert a.inputs_digest == b.inputs_digest != c.inputs_digest

    def test_a_negated_pattern_takes_files_back_out(self) -> None:
        cmd = {"name": "t", "run": "pytest", "inputs": ["src/", "!src/**/*_test.py"]}
        old = _files(src__app_dot_py="v1", src__app_test_dot_py="t1")
        new = _files(src__app_dot_py="v1", src__app_test_dot_py="t2")
        (a,) = command_intents(_spec(cmd), old, ())
        (b,) = command_intents(_spec(cmd), new, ("src/app_test.py",))
        assert a.inputs_digest == b.inputs_digest and b.inputs_changed == ()

    def test_a_deleted_input_changes_the_digest_and_is_named(self) -> None:
        (a,) = command_intents(_spec(BUILD), OLD, ())
        (b,) = command_intents(
            _spec(BUILD), _files(docs__index_dot_md="d1", README="r1"), ("src/app.py",)
        )
        assert a.inputs_digest != b.inputs_digest and b.inputs_changed == ("src/app.py",)

    def test_the_shell_comes_from_the_command_else_the_session_else_sh(self) -> None:
        cmds = command_intents(
            _spec(
                {"name": "a", "run": "x"}, {"name": "b", "run": "y", "shell": "zsh"}, shell="bash"
            ),
            OLD,
            (),
        )
        assert [c.shell for c in cmds] == ["bash", "zsh"]
        assert command_intents(_spec({"name": "a", "run": "x"}), OLD, ())[0].shell == "sh"


class TestHashes:
    def test_a_command_without_inputs_or_shell_keeps_the_hash_it_had_before_they_existed(
        self,
    ) -> None:
        d = desired()
        cmd = d.commands[0]
        before = json.dumps(
            [d.tree.digest, d.image, d.env_fingerprint, cmd.name, cmd.run], separators=(",", ":")
        )
        assert command_input_hash(d, cmd) == sha256(before.encode()).hexdigest()[:32]

    def test_changing_the_shell_re_runs_the_command(self) -> None:
        d = desired()
        inst = instance(d)
        bash = replace(d, commands=(replace(d.commands[0], shell="bash"), d.commands[1]))
        p = plan_one(bash, inst, converged_record(d, inst))
        assert _runs(p) == [
            ("build", "shell changed from sh to bash"),
            ("test", "an earlier command re-ran"),
        ]
        run = next(a for a in p.actions if isinstance(a, actions.RunCommand))
        assert run.shell == "bash"

    def test_a_command_with_inputs_is_unchanged_when_only_other_files_differ(self) -> None:
        a = _world(OLD)
        b = _world(_files(src__app_dot_py="v1", README="other"))
        assert command_input_hash(a, a.commands[0]) == command_input_hash(b, b.commands[0])
        assert CommandIntent("x", "y", 1.0).inputs is None
