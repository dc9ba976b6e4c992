"""How often a session's run writes the status file: the records of steps that nothing
irreversible depends on (an instance seen up) go out with the session's next save, not in a
write of their own. Why it matters: every write is the whole document, so in a fan-out each
extra write per session is a write of all the sessions, and a session waits for it."""

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
