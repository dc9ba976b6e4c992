"""How often a session's run writes the status file: the records of steps that nothing
irreversible depends on (an instance seen up) go out with the session's next save, not in a
write of their own; what a command did is on disk before the session's next action, and after
its last one the save that closes the run writes it. Why it matters: every write is the whole
document, so in a fan-out each extra write per session is a write of all the sessions, and a
session waits for it."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reconciler.cloud.model import Instance
from reconciler.reconcile import actions
from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.execute import Executor
from reconciler.status import journal
from reconciler.status.schema import StatusDoc
from reconciler.transport.base import CommandResult
from tests.support.planning import converged_record, desired, instance


class _Api:
    """A metro holding one stopped instance; a start makes it run (a new boot)."""

    def __init__(self, inst: Instance) -> None:
        self.inst = inst

    def start_instance(self, name: str) -> None:
        self.inst = dataclasses.replace(self.inst, state="running", start_count=2)

    def get_instance(self, name: str) -> Instance:
        return self.inst


class _Writes:
    """The status file's writes, recorded (nothing reaches the disk)."""

    def __init__(self) -> None:
        self.written: list[StatusDoc] = []

    def __call__(self, path: Path, data: bytes) -> None:
        self.written.append(StatusDoc.model_validate_json(data))


class _Shell:
    """A sandbox connection whose commands exit 0; `on_run` sees each one as it starts."""

    pin = "SHA256:pin"
    kind = "ssh"

    def __init__(self, on_run: Any) -> None:
        self.on_run = on_run

    def run(self, command: str, **_: Any) -> CommandResult:
        self.on_run(command)
        return CommandResult(0, False, "", "", 0.01)

    def close(self) -> None:
        return None


class _Pool:
    """Kept connections: the session's is `shell`."""

    def __init__(self, shell: _Shell) -> None:
        self.shell = shell

    def take(self, session: str, uuid: str) -> _Shell:
        return self.shell

    def keep(self, *_: Any) -> None:
        return None

    def drop(self, session: str) -> None:
        return None


def _commands(tmp_path: Path, runs: list[str]) -> tuple[Executor, _Writes, list[list[str]]]:
    """An executor of the session's plan: reach its running sandbox, then run `runs`; and, per
    command as it starts, the names of the commands the last write held."""
    d = desired()
    inst = instance(d)
    rec = converged_record(d, inst)
    rec.commands = []
    assert rec.instance is not None
    rec.instance.boot_mark = "marked"
    doc = StatusDoc(sessions={d.name: rec})
    lock = threading.Lock()
    writes = _Writes()
    seen: list[list[str]] = []

    def on_run(command: str) -> None:
        last = writes.written[-1].sessions[d.name].commands if writes.written else []
        seen.append([c.name for c in last])

    obs: Any = SimpleNamespace(
        contexts={d.name: SimpleNamespace(desired=d, credentials=None, secret_values=(), env={})},
        claimed={d.name: inst},
        owner=SimpleNamespace(key_root=None),
        dying=set(),
    )
    group: Any = SimpleNamespace(status_path=tmp_path / "status.json", state_dir=tmp_path)
    metros: Any = SimpleNamespace(get=lambda label: SimpleNamespace(api=None, label=label))
    pool: Any = _Pool(_Shell(on_run))
    executor = Executor(
        group=group,
        doc=doc,
        observation=obs,
        metros=metros,
        reporter=RecordingReporter(),
        doc_lock=lock,
        pool=pool,
        committer=journal.Committer(group.status_path, doc, lock, write=writes),
    )
    return executor, writes, seen


def _plan(runs: list[str]) -> actions.SessionPlan:
    d = desired()
    steps: list[actions.Action] = [actions.WaitReady(d.name, d.instance_name, "ssh")]
    steps += [
        actions.RunCommand(d.name, i, name, f"run {name}", 60.0, f"hash-{name}", "changed")
        for i, name in enumerate(runs)
    ]
    return actions.SessionPlan(d.name, tuple(steps))


def test_a_commands_record_is_on_disk_before_the_sessions_next_command_starts(
    tmp_path: Path,
) -> None:
    executor, writes, seen = _commands(tmp_path, ["build", "test"])
    outcome = executor.run_session(_plan(["build", "test"]))
    assert outcome.ok, outcome.error
    assert seen == [[], ["build"]]
    assert [c.name for c in writes.written[-1].sessions["hello"].commands] == ["build", "test"]


def test_a_sessions_last_command_is_written_once_with_the_save_that_closes_its_run(
    tmp_path: Path,
) -> None:
    executor, writes, _ = _commands(tmp_path, ["build"])
    outcome = executor.run_session(_plan(["build"]))
    assert outcome.ok, outcome.error
    assert len(writes.written) == 1
    rec = writes.written[0].sessions["hello"]
    assert [c.name for c in rec.commands] == ["build"] and rec.timings


def test_a_started_instance_is_journaled_by_the_sessions_closing_save_not_a_write_of_its_own(
    tmp_path: Path,
) -> None:
    d = desired()
    stopped = instance(d, state="stopped", start_count=1)
    doc = StatusDoc(sessions={d.name: converged_record(d, stopped)})
    lock = threading.Lock()
    writes = _Writes()
    api = _Api(stopped)
    obs: Any = SimpleNamespace(
        contexts={d.name: SimpleNamespace(desired=d, credentials=None, secret_values=())},
        claimed={d.name: stopped},
        owner=SimpleNamespace(key_root=None),
        dying=set(),
    )
    group: Any = SimpleNamespace(status_path=tmp_path / "status.json", state_dir=tmp_path)
    metros: Any = SimpleNamespace(get=lambda label: SimpleNamespace(api=api, label=label))
    executor = Executor(
        group=group,
        doc=doc,
        observation=obs,
        metros=metros,
        reporter=RecordingReporter(),
        doc_lock=lock,
        committer=journal.Committer(group.status_path, doc, lock, write=writes),
    )
    plan = actions.SessionPlan(d.name, (actions.StartInstance(d.name, d.instance_name, "stopped"),))
    outcome = executor.run_session(plan)
    assert outcome.ok, outcome.error
    assert len(writes.written) == 1
    record = writes.written[0].sessions[d.name].instance
    # ... and that one write holds the new boot
    assert record is not None and record.state == "running" and record.start_count == 2
