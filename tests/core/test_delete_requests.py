"""`ukc delete` against a fake metro: the volumes are listed while the instances are (two
round trips at once, not one after the other) and on the thread that then deletes (one
connection to the metro fewer), and the status file is written once."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reconciler.cloud.model import Instance, Volume
from reconciler.reconcile import identity
from reconciler.reconcile.desired import Group, load_groups
from reconciler.reconcile.events import RecordingReporter
from reconciler.reconcile.loop import delete_group
from reconciler.status import journal
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from tests.support.planning import INST_HASH

#: how long the instance list waits for the volume list to begin before it answers anyway
OVERLAP_WAIT_S = 5.0


class _Metro:
    """A metro holding one instance of session `web` (ours); its instance list answers once
    the volume list began, or after `OVERLAP_WAIT_S`; `overlapped` says which."""

    def __init__(self, inst: Instance | None) -> None:
        self.inst = inst
        self.volumes_asked = threading.Event()
        self.overlapped: bool | None = None
        self.deleted: list[str] = []
        #: the threads that asked for the volumes and for each delete
        self.asking: dict[str, threading.Thread] = {}

    def list_instances(self, tags: list[str]) -> list[Instance]:
        self.overlapped = self.volumes_asked.wait(OVERLAP_WAIT_S)
        return [self.inst] if self.inst is not None else []

    def list_volumes(self, tags: list[str]) -> list[Volume]:
        self.asking["volumes"] = threading.current_thread()
        self.volumes_asked.set()
        return []

    def delete_instance(self, name: str, *, uuid: str, wait: bool) -> None:
        self.asking["delete"] = threading.current_thread()
        self.deleted.append(uuid)
        self.inst = None


def _setup(tmp_path: Path, *, listed: bool) -> tuple[Group, _Metro]:
    (tmp_path / "tree").mkdir()
    spec = tmp_path / "session.yaml"
    spec.write_text("name: web\ndirectory: ./tree\n")
    [group] = load_groups([spec], {})
    project = identity.project_id(group.base_dir, {})
    owner = identity.load_owner(group.state_dir, project, {})
    name = identity.instance_name(project, "web")
    inst = Instance(
        uuid="u-web",
        name=name,
        state="running",
        fqdn="web.local",
        tags=tuple(identity.owner_tags(project, "web", INST_HASH, owner.id)),
        start_count=1,
        metro="local",
    )
    doc = StatusDoc()
    doc.sessions["web"] = SessionStatus(
        phase="Ready", metro="local", instance=InstanceRecord(name=name, uuid="u-web")
    )
    journal.save(group.status_path, doc)
    return group, _Metro(inst if listed else None)


def _delete(group: Group, metro: _Metro) -> bool:
    metros: Any = SimpleNamespace(get=lambda label: SimpleNamespace(api=metro))
    return delete_group(group, metros=metros, reporter=RecordingReporter(), environ={})


def _backup(group: Group) -> StatusDoc:
    path = group.status_path.with_name(group.status_path.name + ".bak")
    return StatusDoc.model_validate_json(path.read_bytes())


def test_a_delete_lists_the_volumes_while_the_instances_are_listed(tmp_path: Path) -> None:
    group, metro = _setup(tmp_path, listed=True)
    assert _delete(group, metro)
    assert metro.overlapped, "the instance list ended before the volume list began"
    assert metro.deleted == ["u-web"]


def test_a_delete_asks_for_the_volumes_on_the_thread_that_then_deletes(tmp_path: Path) -> None:
    """The api keeps a connection per thread: a thread of the volumes' own was one more
    connection (a TLS handshake with the metro on both sides) for one request."""
    group, metro = _setup(tmp_path, listed=True)
    assert _delete(group, metro)
    assert metro.asking["volumes"] is metro.asking["delete"]


def test_a_delete_writes_the_status_file_once(tmp_path: Path) -> None:
    # each write keeps the file it replaces as the backup: after one write, the backup is the
    # status as it was before the delete
    group, metro = _setup(tmp_path, listed=True)
    assert _delete(group, metro)
    assert journal.load(group.status_path).sessions["web"].phase == "Deleted"
    assert _backup(group).sessions["web"].phase == "Ready"


def test_a_delete_of_a_session_already_gone_writes_the_status_file_once(
    tmp_path: Path,
) -> None:
    group, metro = _setup(tmp_path, listed=False)
    assert _delete(group, metro)
    assert metro.deleted == []
    assert journal.load(group.status_path).sessions["web"].phase == "Deleted"
    assert _backup(group).sessions["web"].phase == "Ready"
