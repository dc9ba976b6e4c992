"""The quota check before a fan-out: what a plan takes of the account's quota on each metro,
against what the quota leaves. Pure: the quota comes in as a value (read by the observer).

A plan takes an instance (and its inline volume) for each session it creates, not for one it
replaces (the old one goes first); live memory for each instance it boots or wakes from a
state that holds none (`stopped`, `standby`), less what a replaced live one frees.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from reconciler.cloud.model import Instance
from reconciler.cloud.quotas import Quota
from reconciler.reconcile import actions
from reconciler.reconcile.desired import DesiredSession

__all__ = ["LIVE_STATES", "Need", "needs", "shortfall"]

#: the states whose memory counts against the live quota (the platform's docs)
LIVE_STATES = frozenset({"starting", "running", "draining", "stopping"})


@dataclass(frozen=True)
class Need:
    """What a plan takes of one metro's quota."""

    instances: int = 0
    memory_mb: int = 0
    volumes: int = 0
    #: the sessions behind it (for the message)
    sessions: int = 0

    def __add__(self, other: Need) -> Need:
        return Need(
            self.instances + other.instances,
            self.memory_mb + other.memory_mb,
            self.volumes + other.volumes,
            self.sessions + other.sessions,
        )


def _need(splan: actions.SessionPlan, d: DesiredSession, inst: Instance | None) -> Need:
    kinds = {type(a) for a in splan.changes}
    live_now = inst is not None and inst.state in LIVE_STATES
    if actions.CreateInstance in kinds:
        if actions.DeleteInstance in kinds:
            freed = (inst.memory_mb or 0) if inst is not None and live_now else 0
            return Need(memory_mb=max(d.memory_mb - freed, 0), sessions=1)
        return Need(1, d.memory_mb, 1 if d.volume_mb is not None else 0, 1)
    woken = actions.StartInstance in kinds or any(
        isinstance(a, actions.WaitReady) and a.wake for a in splan.actions
    )
    if woken and not live_now:
        held = inst.memory_mb if inst is not None and inst.memory_mb else d.memory_mb
        return Need(memory_mb=held, sessions=1)
    return Need()


def needs(
    plan: actions.Plan, desired: Sequence[DesiredSession], observed: Mapping[str, Instance]
) -> dict[str, Need]:
    """What `plan` takes of each metro's quota (metros it takes nothing of are left out)."""
    by_name = {d.name: d for d in desired}
    out: dict[str, Need] = {}
    for splan in plan.sessions:
        d = by_name.get(splan.session)
        if d is None:
            continue
        need = _need(splan, d, observed.get(d.instance_name))
        if need != Need():
            out[d.metro] = out.get(d.metro, Need()) + need
    return out


def shortfall(metro: str, need: Need, quota: Quota) -> str | None:
    """Why `need` does not fit what `quota` leaves, naming the figures; None when it fits
    (a figure the quota does not state is taken to fit)."""
    problems = []
    for figure, wanted, noun in (
        ("instances", need.instances, "instance(s)"),
        ("live_memory_mb", need.memory_mb, "MiB of live memory"),
        ("volumes", need.volumes, "volume(s)"),
    ):
        room = quota.room(figure)
        if wanted and room is not None and wanted > room:
            used, hard = getattr(quota.used, figure), getattr(quota.hard, figure)
            problems.append(f"{wanted} {noun}, {room} left ({used} of {hard} used)")
    if not problems:
        return None
    return (
        f"the {need.sessions} session(s) to create or wake on metro {metro} need "
        + "; ".join(problems)
        + " by the account's quota"
    )
