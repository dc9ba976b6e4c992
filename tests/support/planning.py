"""Planner inputs for table tests: a desired session, its instance, a converged record."""

from __future__ import annotations

from dataclasses import replace

from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import CommandIntent, DesiredSession, TreeState
from reconciler.reconcile.plan import command_input_hash, plan_sessions
from reconciler.status.schema import (
    CommandRecord,
    InstanceRecord,
    SessionStatus,
    StatusDoc,
    SyncRecord,
)

NOW = 1_800_000_000.0
PROJECT = "abcd1234"
INST_HASH = identity.instance_hash("img:1", None)
OWNER_ID = "0123456789abcdef0123456789abcdef"
OWNER = identity.Owner(PROJECT, OWNER_ID, frozenset({OWNER_ID}), "UKC_SESSION_SECRET")


def desired(**overrides: object) -> DesiredSession:
    base = DesiredSession(
        name="hello",
        metro="local",
        instance_name=identity.instance_name(PROJECT, "hello"),
        instance_hash=INST_HASH,
        image="img:1",
        ttl_s=None,
        spec_hash="spec1",
        commands=(
            CommandIntent("build", "make", 60.0),
            CommandIntent("test", "make test", 60.0),
        ),
        env_fingerprint="env1",
        tree=TreeState(digest="tree1", files=3, bytes=30),
        back=("out/",),
        tags=tuple(identity.owner_tags(PROJECT, "hello", INST_HASH, OWNER_ID)),
        credentials_noun="ssh key",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def instance(d: DesiredSession, **overrides: object) -> Instance:
    base = Instance(
        uuid="u-1",
        name=d.instance_name,
        state="running",
        fqdn="x.local",
        tags=d.tags,
        created_at="2027-01-15T08:00:00Z",
        start_count=1,
        metro="local",
    )
    return replace(base, **overrides)  # type: ignore[arg-type]


def converged_record(d: DesiredSession, inst: Instance) -> SessionStatus:
    return SessionStatus(
        phase="Ready",
        spec_hash=d.spec_hash,
        instance=InstanceRecord(name=inst.name, uuid=inst.uuid, start_count=inst.start_count),
        sync=SyncRecord(
            digest=d.tree.digest, instance_uuid=inst.uuid, start_count=inst.start_count
        ),
        commands=[
            CommandRecord(
                name=c.name,
                run=c.run,
                exit_code=0,
                input_hash=command_input_hash(d, c),
                last_success_hash=command_input_hash(d, c),
                instance_uuid=inst.uuid,
                start_count=inst.start_count,
            )
            for c in d.commands
        ],
    )


def kinds(plan: actions.SessionPlan) -> list[str]:
    return [type(a).__name__ for a in plan.actions]


def plan_one(
    d: DesiredSession, inst: Instance | None, rec: SessionStatus | None
) -> actions.SessionPlan:
    doc = StatusDoc(sessions={d.name: rec} if rec is not None else {})
    observed = {inst.name: inst} if inst is not None else {}
    return plan_sessions([d], observed, doc, NOW, owner=OWNER).sessions[0]
