"""The plan for machines and for reviewers: `ukc plan --output json` and `--output markdown`.

`PlanDocument` is a contract (`schema_version` 1, schema in `docs/plan.schema.json`): fields
are only ever added; a rename or a change of meaning takes a new version. The markdown is a
pull-request comment: a summary line and table, then per session what changes and why, the
files and commands affected in collapsed details, and what prune would delete.

Everything a spec or its tree controls (file names, commands, messages) is shown as code, so
a file name cannot add markdown, HTML, mentions or links to the comment, nor end a section
early (see `_code` and `_fence`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconciler._util.text import escape_controls
from reconciler.reconcile import actions
from reconciler.spec.sizes import human_size

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "GroupPlan",
    "OutputModel",
    "PlanDocument",
    "build_document",
    "group_plan",
    "plan_schema",
    "render_error_markdown",
    "render_markdown",
]

PLAN_SCHEMA_VERSION: Literal[1] = 1


class OutputModel(BaseModel):
    """A document ukc prints: strict, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CreateAction(OutputModel):
    type: Literal["create_instance"] = "create_instance"
    instance: str
    metro: str
    reason: str
    description: str


class DeleteAction(OutputModel):
    type: Literal["delete_instance"] = "delete_instance"
    instance: str
    metro: str
    reason: str
    #: the session goes away for good (prune, ttl) rather than being replaced
    final: bool
    description: str


class StartAction(OutputModel):
    type: Literal["start_instance"] = "start_instance"
    instance: str
    reason: str
    description: str


class SetAutokillAction(OutputModel):
    type: Literal["set_autokill"] = "set_autokill"
    instance: str
    #: the platform deletes the instance once down this long (0: never)
    time_ms: int
    reason: str
    description: str


class SendFilesAction(OutputModel):
    type: Literal["send_files"] = "send_files"
    files: int
    bytes: int
    #: files deleted in the sandbox because they are gone here
    deletes: int
    #: the sandbox's tree is scanned whole (no record of it): `files` is an upper bound
    full_scan: bool
    #: some of the files to send, and some of those to delete (not all when there are many)
    sample: list[str]
    deleted_sample: list[str]
    reason: str
    description: str


class RunCommandAction(OutputModel):
    type: Literal["run_command"] = "run_command"
    command: str
    run: str
    timeout_s: float
    reason: str
    description: str


class BringBackAction(OutputModel):
    type: Literal["bring_back"] = "bring_back"
    paths: list[str]
    #: what the last sync-back brought (the exact list is known once the sandbox answers)
    last_files: int
    last_bytes: int
    mirror_deletes: bool
    reason: str
    description: str


Action = Annotated[
    CreateAction
    | DeleteAction
    | StartAction
    | SetAutokillAction
    | SendFilesAction
    | RunCommandAction
    | BringBackAction,
    Field(discriminator="type"),
]

Verdict = Literal["create", "replace", "update", "delete", "up_to_date", "error", "refused"]


class SessionEntry(OutputModel):
    name: str
    #: create: no instance yet; replace: the instance is deleted and made anew; update:
    #: files, commands or a start on the same instance; delete: it goes (ttl); error: apply
    #: would fail it (see `error`); refused: an instance ukc cannot prove it owns is in the way
    verdict: Verdict
    error: str | None = None
    actions: list[Action]
    #: why what is already right is right ("command 'build' unchanged since its last success")
    unchanged: list[str]
    #: set when the session's ttl has passed: apply deletes it (verdict delete), or it was
    #: deleted and stays so until its spec changes; says how to renew it
    expired: str | None = None


class PruneEntry(OutputModel):
    session: str
    instance: str
    metro: str
    reason: str


class RefusedPrune(OutputModel):
    session: str
    instance: str
    reason: str


class Orphan(OutputModel):
    session: str
    instance: str


class GroupPlan(OutputModel):
    """The sessions of one status file (one spec directory)."""

    directory: str
    status_file: str
    prune: bool
    sessions: list[SessionEntry]
    #: instances `--prune` deletes (sessions no spec declares)
    prune_deletes: list[PruneEntry]
    prune_refused: list[RefusedPrune]
    #: sessions ukc owns that no spec declares, without `--prune` (left alone)
    orphans: list[Orphan]
    warnings: list[str]
    #: the instances `ukc apply` suspends once every session converged (their spec's
    #: `suspend`: memory kept; the next apply with work wakes them)
    suspend_after: list[str] = Field(default_factory=list)


class Summary(OutputModel):
    sessions: int
    create: int
    replace: int
    update: int
    delete: int
    up_to_date: int
    errors: int
    refused: int
    files_to_send: int
    bytes_to_send: int
    commands_to_run: int
    prune_deletes: int
    orphans: int


class PlanDocument(OutputModel):
    """What `ukc plan --output json` prints."""

    schema_version: Literal[1] = PLAN_SCHEMA_VERSION
    #: apply would fail no session
    ok: bool
    #: apply would change something (the `--detailed-exitcode` 2)
    changes_pending: bool
    summary: Summary
    groups: list[GroupPlan]
    #: requests this plan made to the platform APIs
    api_requests: int


@dataclass(frozen=True)
class PlannedGroup:
    """One group's plan as the command line has it."""

    directory: Path
    status_file: Path
    prune: bool
    plan: actions.Plan


def plan_schema() -> dict[str, Any]:
    """The JSON Schema of `PlanDocument` (committed as docs/plan.schema.json)."""
    schema = PlanDocument.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ukc plan",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def _action(act: actions.Action) -> Action | None:
    text = act.describe()
    if isinstance(act, actions.CreateInstance):
        return CreateAction(
            instance=act.instance_name, metro=act.metro, reason=act.reason, description=text
        )
    if isinstance(act, actions.DeleteInstance):
        return DeleteAction(
            instance=act.instance_name,
            metro=act.metro,
            reason=act.reason,
            final=act.forget,
            description=text,
        )
    if isinstance(act, actions.StartInstance):
        return StartAction(instance=act.instance_name, reason=act.reason, description=text)
    if isinstance(act, actions.SetAutokill):
        return SetAutokillAction(
            instance=act.instance_name, time_ms=act.time_ms, reason=act.reason, description=text
        )
    if isinstance(act, actions.SyncUp):
        return SendFilesAction(
            files=act.files,
            bytes=act.bytes,
            deletes=act.deletes,
            full_scan=act.full,
            sample=list(act.sample),
            deleted_sample=list(act.deleted_sample),
            reason=act.reason,
            description=text,
        )
    if isinstance(act, actions.RunCommand):
        return RunCommandAction(
            command=act.name,
            run=act.run,
            timeout_s=act.timeout_s,
            reason=act.reason,
            description=text,
        )
    if isinstance(act, actions.SyncBack):
        return BringBackAction(
            paths=list(act.paths),
            last_files=act.last_files,
            last_bytes=act.last_bytes,
            mirror_deletes=act.mirror_deletes,
            reason=act.reason,
            description=text,
        )
    return None  # waiting for readiness changes nothing


def _verdict(splan: actions.SessionPlan) -> Verdict:
    if splan.refusal is not None:
        return "refused"
    if splan.error:
        return "error"
    kinds = {type(a) for a in splan.changes}
    if actions.DeleteInstance in kinds:
        return "replace" if actions.CreateInstance in kinds else "delete"
    if actions.CreateInstance in kinds:
        return "create"
    return "update" if kinds else "up_to_date"


def _shown(path: Path) -> str:
    """A path relative to the working directory when it lies below it (stable across runners)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if rel.startswith("..") else rel


def group_plan(item: PlannedGroup) -> GroupPlan:
    """One group's plan as the versioned document shows it (also inside apply's)."""
    plan = item.plan
    sessions = []
    for splan in plan.sessions:
        acts = [a for a in (_action(x) for x in splan.changes) if a is not None]
        sessions.append(
            SessionEntry(
                name=splan.session,
                verdict=_verdict(splan),
                error=(splan.refusal.reason if splan.refusal else splan.error) or None,
                actions=acts,
                unchanged=list(splan.noops) if not splan.refusal else [],
                expired=splan.expired or None,
            )
        )
    return GroupPlan(
        directory=_shown(item.directory),
        status_file=_shown(item.status_file),
        prune=item.prune,
        sessions=sessions,
        prune_deletes=[
            PruneEntry(session=p.session, instance=p.instance_name, metro=p.metro, reason=p.reason)
            for p in plan.prunes
        ],
        prune_refused=[
            RefusedPrune(session=r.session, instance=r.instance_name, reason=r.reason)
            for r in plan.prune_refusals
        ],
        orphans=[Orphan(session=s, instance=i) for s, i in plan.orphans],
        warnings=list(plan.warnings),
        suspend_after=[s.instance_name for s in plan.suspends],
    )


def build_document(groups: Sequence[PlannedGroup], api_requests: int) -> PlanDocument:
    out = [group_plan(g) for g in groups]
    sessions = [s for g in out for s in g.sessions]
    acts = [a for s in sessions for a in s.actions]

    def count(verdict: str) -> int:
        return sum(s.verdict == verdict for s in sessions)

    summary = Summary(
        sessions=len(sessions),
        create=count("create"),
        replace=count("replace"),
        update=count("update"),
        delete=count("delete"),
        up_to_date=count("up_to_date"),
        errors=count("error"),
        refused=count("refused") + sum(len(g.prune_refused) for g in out),
        files_to_send=sum(a.files for a in acts if isinstance(a, SendFilesAction)),
        bytes_to_send=sum(a.bytes for a in acts if isinstance(a, SendFilesAction)),
        commands_to_run=sum(isinstance(a, RunCommandAction) for a in acts),
        prune_deletes=sum(len(g.prune_deletes) for g in out),
        orphans=sum(len(g.orphans) for g in out),
    )
    return PlanDocument(
        ok=all(not g.plan.errors for g in groups),
        changes_pending=any(not g.plan.empty for g in groups),
        summary=summary,
        groups=out,
        api_requests=api_requests,
    )


# --- markdown -------------------------------------------------------------------------------


def _code(text: str, *, cell: bool = False) -> str:
    """`text` as one inline code span: markdown, HTML, mentions and links inside are inert.

    The fence is one backtick longer than the longest run inside (padded with spaces when
    the text starts or ends with one, so it stays text); line breaks and control characters
    become visible escapes (a line break would end a list item or a table row). In a table
    `cell`, `|` is escaped: GitHub splits cells on it even inside code.
    """
    flat = escape_controls(text, keep="\n\t")
    flat = flat.replace("\n", "\\n").replace("\t", " ")
    if cell:
        flat = flat.replace("|", "\\|")
    if not flat.strip():
        flat = repr(flat)
    longest = max((len(run) for run in re.findall(r"`+", flat)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if flat[0] in "` " or flat[-1] in "` " else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


#: what can start markup, HTML, an entity, math, an autolink or a mention in running text
_MARKUP = re.compile(r"""([\\`*_{}\[\]<>!|#~&$:./@+=^%?])""")


def _text(text: str) -> str:
    """ukc's prose (reasons, errors, warnings: they quote paths and names from the specs) as
    inert markdown: every character that can start markup backslash-escaped (any ASCII
    punctuation may be), line breaks and control characters made visible, and a word joiner
    after `@`, so nothing in it becomes markup, HTML, a link or a mention."""
    flat = escape_controls(text, keep="\n\t")
    flat = flat.replace("\n", " ").replace("\t", " ")
    return _MARKUP.sub(r"\\\1", flat).replace("@", "@\u2060")


def _fence(text: str, info: str = "") -> list[str]:
    """`text` as a fenced code block whose fence no line inside can close."""
    longest = max((len(run) for run in re.findall(r"`{3,}|~{3,}", text)), default=0)
    fence = "`" * max(3, longest + 1)
    body = escape_controls(text, keep="\n\t")
    return [f"{fence}{info}", *body.splitlines(), fence]


_VERDICT_TEXT = {
    "create": "create",
    "replace": "**replace**",
    "update": "update",
    "delete": "**delete**",
    "up_to_date": "up to date",
    "error": "**error**",
    "refused": "**refused**",
}


def _headline(doc: PlanDocument) -> str:
    s = doc.summary
    parts = []
    if not doc.ok:
        parts.append(f"apply would fail {s.errors + s.refused} session(s)")
    if doc.changes_pending:
        parts.append(
            f"{s.create} to create, {s.replace} to replace, {s.delete + s.prune_deletes} to "
            f"delete, {s.files_to_send} file(s) to send ({human_size(s.bytes_to_send)}), "
            f"{s.commands_to_run} command(s) to run"
        )
    elif doc.ok:
        parts.append("no changes, sessions match their specs")
    return f"**ukc plan:** {'; '.join(parts)}."


def _action_line(act: Action) -> str:
    if isinstance(act, CreateAction):
        return f"create instance {_code(act.instance)} on {_code(act.metro)} — {_text(act.reason)}"
    if isinstance(act, DeleteAction):
        return f"delete instance {_code(act.instance)} — {_text(act.reason)}"
    if isinstance(act, StartAction):
        return f"start instance {_code(act.instance)} — {_text(act.reason)}"
    if isinstance(act, SetAutokillAction):
        return f"set autokill of instance {_code(act.instance)} — {_text(act.reason)}"
    if isinstance(act, SendFilesAction):
        what = f"send {act.files} file(s) ({human_size(act.bytes)}), delete {act.deletes} remotely"
        if act.full_scan:
            what = (
                f"full sync: up to {act.files} file(s) ({human_size(act.bytes)}), sandbox scanned"
            )
        return f"{what} — {_text(act.reason)}"
    if isinstance(act, RunCommandAction):
        return f"run command {_code(act.command)} — {_text(act.reason)}"
    paths = ", ".join(_code(p) for p in act.paths)
    mirror = " (mirrors deletions)" if act.mirror_deletes else ""
    return f"bring back {paths}{mirror} — {_text(act.reason)}"


def _details(entry: SessionEntry) -> list[str]:
    """The files and commands a session's actions touch, for the collapsed section."""
    body: list[str] = []
    for act in entry.actions:
        if isinstance(act, SendFilesAction):
            for title, paths, total in (
                ("Files to send", act.sample, act.files),
                ("Files to delete in the sandbox", act.deleted_sample, act.deletes),
            ):
                if not paths:
                    continue
                some = " (some of them)" if total > len(paths) else ""
                body += [f"{title}{some}:", ""]
                body.extend(f"- {_code(path)}" for path in paths)
                body.append("")
        elif isinstance(act, RunCommandAction):
            body.append(f"Command {_code(act.command)} (timeout {act.timeout_s:.0f} s):")
            body.append("")
            body.extend(_fence(act.run, "sh"))
            body.append("")
    if entry.unchanged:
        body.append("Unchanged:")
        body.append("")
        body.extend(f"- {_text(line)}" for line in entry.unchanged)
        body.append("")
    if not body:
        return []
    return ["<details><summary>files and commands</summary>", "", *body, "</details>", ""]


def render_markdown(doc: PlanDocument) -> str:
    """The plan as a pull-request comment (GitHub-flavoured markdown)."""
    lines = [_headline(doc), ""]
    sessions = [(g, s) for g in doc.groups for s in g.sessions]
    if sessions:
        lines += [
            "| session | verdict | files to send | commands to run |",
            "| --- | --- | ---: | ---: |",
        ]
        for _, s in sessions:
            files = sum(a.files for a in s.actions if isinstance(a, SendFilesAction))
            runs = sum(isinstance(a, RunCommandAction) for a in s.actions)
            name = _code(s.name, cell=True)
            lines.append(f"| {name} | {_VERDICT_TEXT[s.verdict]} | {files} | {runs} |")
        lines.append("")
    several = len(doc.groups) > 1
    for group in doc.groups:
        if several:
            lines += [f"#### {_code(group.directory)}", ""]
        for s in group.sessions:
            if s.verdict == "up_to_date":
                continue
            lines.append(f"**{_code(s.name)}**: {_VERDICT_TEXT[s.verdict]}")
            lines.append("")
            if s.error is not None:
                lines += [f"- {_text(s.error)}", ""]
            if s.expired is not None:
                lines += [f"- Expired: {_text(s.expired)}", ""]
            lines.extend(f"- {_action_line(a)}" for a in s.actions)
            if s.actions:
                lines.append("")
            lines += _details(s)
        if group.prune_deletes:
            lines += ["**prune** deletes sessions no spec declares:", ""]
            lines.extend(
                f"- {_code(p.session)}: instance {_code(p.instance)} on {_code(p.metro)}"
                for p in group.prune_deletes
            )
            lines.append("")
        for r in group.prune_refused:
            lines += [f"- prune of {_code(r.session)} refused: {_text(r.reason)}", ""]
        if group.orphans:
            lines += ["Not declared by any spec (`--prune` would delete them):", ""]
            lines.extend(
                f"- {_code(o.session)}: instance {_code(o.instance)}" for o in group.orphans
            )
            lines.append("")
        if group.warnings:
            lines += ["Warnings:", ""]
            lines.extend(f"- {_text(w)}" for w in group.warnings)
            lines.append("")
    lines.append(f"<sub>ukc plan, schema version {doc.schema_version}</sub>")
    return "\n".join(lines) + "\n"


def render_error_markdown(message: str) -> str:
    """The comment when there is no plan (a spec that does not load, an unreachable metro)."""
    return (
        f"**ukc plan: failed**, no plan was made: {_text(message)}\n\n"
        f"<sub>ukc plan, schema version {PLAN_SCHEMA_VERSION}</sub>\n"
    )
