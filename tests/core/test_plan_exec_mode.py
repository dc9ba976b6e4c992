"""Exec mode and public ports in the plan: which instances are replaced, which are only warned
about, and the warnings `ukc plan` prints (pure planner and the CLI's rendering)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from reconciler.cli.plan_output import GroupPlan, PlannedGroup, group_plan
from reconciler.cli.render import render_plan
from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import DesiredSession
from reconciler.reconcile.plan import plan_sessions
from reconciler.status.schema import StatusDoc
from reconciler.transport import select
from reconciler.transport.base import Credentials
from tests.support.planning import NOW, OWNER, converged_record, desired, instance, kinds


def _plan(d: DesiredSession, inst: Instance | None) -> actions.Plan:
    rec = converged_record(d, inst) if inst is not None else None
    doc = StatusDoc(sessions={d.name: rec} if rec is not None else {})
    return plan_sessions([d], {inst.name: inst} if inst else {}, doc, NOW, owner=OWNER)


def _made_for(d: DesiredSession, mode: str | None) -> Instance:
    tags = d.tags if mode is None else (*d.tags, identity.transport_tag(mode))
    return instance(d, tags=tags)


def _on(transport: str) -> DesiredSession:
    """The session as the desired state builds it for that `exec`."""
    return desired(transport=transport, warnings=select.kind_for(transport).warnings("hello"))


def _services(transport: str, tmp_path: Path) -> list[tuple[int, int, tuple[str, ...]]]:
    fields = select.kind_for(transport).create_fields(Credentials(tmp_path / transport))
    return [(s.port, s.destination_port, s.handlers) for s in fields.services]


def test_only_http_sessions_declare_port_443(tmp_path: Path) -> None:
    assert [port for port, _, _ in _services("ssh", tmp_path)] == [2222]
    assert _services("http", tmp_path) == [
        (2222, 2222, ("tls",)),
        (443, 8080, ("tls", "http")),
    ]


def test_an_ssh_session_on_an_instance_made_for_ssh_is_up_to_date_without_warnings() -> None:
    d = desired()
    p = _plan(d, _made_for(d, "ssh"))
    assert p.empty and p.warnings == ()


def test_an_older_instance_with_port_443_is_kept_and_named_in_a_warning() -> None:
    d = desired()
    p = _plan(d, _made_for(d, None))
    assert p.empty
    (warning,) = p.warnings
    assert "created by an older ukc" in warning and "port 443" in warning
    assert "`ukc delete` then `ukc apply`" in warning


def test_an_http_session_on_an_older_instance_keeps_it_it_has_port_443() -> None:
    d = _on("http")
    p = _plan(d, _made_for(d, None))
    assert p.empty
    (warning,) = p.warnings
    assert "exec: http" in warning and "anyone who knows the instance's FQDN" in warning


def test_switching_exec_mode_replaces_the_instance_after_bringing_outputs_home() -> None:
    for old, new in (("ssh", "http"), ("http", "ssh")):
        d = _on(new)
        p = _plan(d, _made_for(d, old))
        (session,) = p.sessions
        assert kinds(session)[:4] == ["WaitReady", "SyncBack", "DeleteInstance", "CreateInstance"]
        delete = session.actions[2]
        assert isinstance(delete, actions.DeleteInstance)
        assert delete.reason == f"exec changed from {old} to {new} (its public ports)"
        create = session.actions[3]
        assert isinstance(create, actions.CreateInstance)
        assert create.reason == f"replacing: exec changed from {old} to {new} (its public ports)"
        # a replaced older instance is not warned about; an http session always is
        assert len(p.warnings) == (1 if new == "http" else 0)


def test_plan_text_and_json_carry_the_warnings() -> None:
    d = _on("http")
    p = _plan(d, None)
    text = render_plan(p)
    assert any(line.startswith("warning: session hello: exec: http") for line in text)
    assert _json(p).warnings == list(p.warnings)
    quiet = replace(p, warnings=())
    assert not [line for line in render_plan(quiet) if line.startswith("warning")]
    assert _json(quiet).warnings == []


def _json(p: actions.Plan) -> GroupPlan:
    return group_plan(PlannedGroup(Path("s"), Path("s/.ukc/status.json"), False, p))
