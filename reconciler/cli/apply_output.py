"""What `ukc apply --output json` prints: per spec directory, how the apply ended and the plan it
set out to carry out, in the same shape as `ukc plan --output json`'s groups.

`ApplyDocument` is a contract (`schema_version` 1, schema in `docs/apply.schema.json`): fields
are only ever added; a rename or a change of meaning takes a new version.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from reconciler.cli.plan_output import GroupPlan, OutputModel, PlannedGroup, group_plan
from reconciler.reconcile.loop import ApplyResult

__all__ = ["APPLY_SCHEMA_VERSION", "AppliedGroup", "ApplyDocument", "apply_schema", "build_apply"]

APPLY_SCHEMA_VERSION: Literal[1] = 1


class ApplyGroup(OutputModel):
    """One spec directory's apply."""

    directory: str
    status_file: str
    #: every session of the directory converged
    ok: bool
    #: rounds of actions that ran (0: the first plan found nothing to do)
    rounds: int
    #: the first plan had something to do
    changes_made: bool
    #: session name → why it failed (interrupted sessions are listed apart)
    failed: dict[str, str]
    #: sessions Ctrl-C stopped
    interrupted: list[str]
    #: the plan of the first round, as `ukc plan --output json` shows it
    plan: GroupPlan


class ApplyDocument(OutputModel):
    """What `ukc apply --output json` prints."""

    schema_version: Literal[1] = APPLY_SCHEMA_VERSION
    #: every session of every directory converged
    ok: bool
    #: Ctrl-C stopped the apply (no later directory started)
    interrupted: bool
    groups: list[ApplyGroup]
    #: requests this apply made to the platform APIs
    api_requests: int


@dataclass(frozen=True)
class AppliedGroup:
    """One group's apply as the command line has it."""

    directory: Path
    status_file: Path
    prune: bool
    result: ApplyResult


def _group(item: AppliedGroup) -> ApplyGroup:
    result = item.result
    stopped = {k for k, o in result.outcomes.items() if o.interrupted}
    shown = group_plan(PlannedGroup(item.directory, item.status_file, item.prune, result.plan))
    return ApplyGroup(
        directory=shown.directory,
        status_file=shown.status_file,
        ok=result.ok,
        rounds=result.rounds,
        changes_made=not result.plan.empty,
        failed={k: v for k, v in result.failed.items() if k not in stopped},
        interrupted=sorted(stopped),
        plan=shown,
    )


def build_apply(
    groups: Sequence[AppliedGroup], *, interrupted: bool, api_requests: int
) -> ApplyDocument:
    out = [_group(g) for g in groups]
    return ApplyDocument(
        ok=all(g.ok for g in out),
        interrupted=interrupted,
        groups=out,
        api_requests=api_requests,
    )


def apply_schema() -> dict[str, Any]:
    """The JSON Schema of `ApplyDocument` (committed as docs/apply.schema.json)."""
    schema = ApplyDocument.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ukc apply",
        **{k: v for k, v in schema.items() if k != "title"},
    }
