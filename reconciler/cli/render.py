"""What the command line shows: plans, the status file, and live progress of apply and watch.

`PlainReporter` prints one line per event, `[session]` prefixed, for pipes and CI logs;
`LiveReporter` redraws a per-session table on a TTY with command output streamed above it.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TextIO

from pydantic import BaseModel, Field

from reconciler._util.text import escape_controls
from reconciler.reconcile import actions
from reconciler.reconcile.events import Event
from reconciler.reconcile.plan import parse_time
from reconciler.status.schema import (
    BackFrom,
    CommandRecord,
    RevisionRecord,
    SessionStatus,
    SourceRecord,
    StatusDoc,
)

__all__ = [
    "STATUS_COLUMNS",
    "FollowedSource",
    "LiveReporter",
    "PlainReporter",
    "StatusDocument",
    "StatusRow",
    "printable",
    "render_plan",
    "render_source",
    "render_status",
    "render_table",
    "source_json",
    "span",
    "status_document",
    "status_exit_code",
    "status_schema",
]


class PlainReporter:
    """One line per event; command output lines prefixed with the session name."""

    def __init__(self, out: TextIO | None = None, *, quiet: bool = False) -> None:
        self._out = out or sys.stdout
        self._quiet = quiet
        self._lock = threading.Lock()
        self._partial: dict[tuple[str, str], str] = {}

    def event(self, event: Event) -> None:
        with self._lock:
            if event.kind == "output":
                key = (event.session, event.stream)
                text = self._partial.pop(key, "") + event.text
                *lines, rest = text.split("\n")
                if rest:
                    self._partial[key] = rest
                for line in lines:
                    mark = "|" if event.stream == "stdout" else "!"
                    self._out.write(f"[{event.session}] {mark} {_output_line(line)}\n")
            elif not self._quiet or event.kind in ("failed",):
                self._out.write(f"[{event.session}] {printable(event.text)}\n")
            self._out.flush()

    def close(self) -> None:
        with self._lock:
            for (session, stream), rest in self._partial.items():
                mark = "|" if stream == "stdout" else "!"
                self._out.write(f"[{session}] {mark} {_output_line(rest)}\n")
            self._partial.clear()
            self._out.flush()


def _output_line(line: str) -> str:
    """A line of a sandbox command's output, made safe for the terminal (see `printable`);
    a CR before its newline is the line's end, not a character to show."""
    return escape_controls(line.removesuffix("\r"), keep="\t")


@dataclass
class _Row:
    state: str = "waiting"
    detail: str = ""
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None


class LiveReporter:
    """A live per-session table at the bottom of a TTY; finished lines scroll above it."""

    def __init__(self, out: TextIO | None = None) -> None:
        self._out = out or sys.stdout
        self._rows: dict[str, _Row] = {}
        self._drawn = 0
        self._lock = threading.Lock()
        self._plain = PlainReporter(self._out)

    def _clear(self) -> None:
        if self._drawn:
            self._out.write(f"\x1b[{self._drawn}F\x1b[J")
            self._drawn = 0

    def _draw(self) -> None:
        width = shutil.get_terminal_size((100, 20)).columns
        now = time.monotonic()
        for name, row in self._rows.items():
            took = (row.ended or now) - row.started
            line = f"  {name:<20} {row.state:<10} {took:6.1f}s  {row.detail}"
            self._out.write(line[: width - 1] + "\n")
        self._drawn = len(self._rows)
        self._out.flush()

    def event(self, event: Event) -> None:
        with self._lock:
            self._clear()
            if event.kind in ("interrupt", "notice"):  # a line above the table, no row
                self._plain.event(event)
                self._draw()
                return
            row = self._rows.setdefault(event.session, _Row())
            detail = escape_controls(event.text)
            if event.kind == "action":
                row.state, row.detail = "working", detail
            elif event.kind == "done":
                row.state, row.detail, row.ended = "ready", detail, time.monotonic()
            elif event.kind == "failed":
                row.state, row.detail, row.ended = "FAILED", detail, time.monotonic()
            if event.kind in ("output", "failed", "done", "info", "session"):
                self._plain.event(event)
            self._draw()

    def close(self) -> None:
        with self._lock:
            self._clear()
            self._plain.close()
            self._draw()


def _verbose_notes(splan: actions.SessionPlan) -> tuple[str, ...]:
    """What `plan -v` adds under a session: why unchanged things are fine, and the sync
    path."""
    path = (f"sync path: {splan.sync_path}",) if splan.sync_path else ()
    return (*splan.noops, *path)


def render_plan(plan: actions.Plan, verbose: bool = False) -> list[str]:
    lines: list[str] = []
    marks = {
        actions.CreateInstance: "+",
        actions.DeleteInstance: "-",
        actions.StartInstance: "^",
        actions.SetAutokill: "*",
        actions.WaitReady: " ",
        actions.SyncUp: "~",
        actions.RunCommand: ">",
        actions.SyncBack: "<",
    }
    for splan in plan.sessions:
        if splan.refusal is not None:
            lines.append(f"session {splan.session}: refused: {splan.refusal.reason}")
            continue
        if splan.error:
            lines.append(f"session {splan.session}: error: {splan.error}")
            if verbose:
                lines.extend(f"    = {n}" for n in splan.noops)
            continue
        if splan.expired:
            lines.append(f"session {splan.session}: Expired: {splan.expired}")
        elif not splan.changes:
            lines.append(f"session {splan.session}: up to date")
        if not splan.changes:
            if verbose:
                lines.extend(f"    = {n}" for n in _verbose_notes(splan))
            continue
        if not splan.expired:
            lines.append(f"session {splan.session}:")
        for act in splan.actions:
            if isinstance(act, actions.WaitReady):
                continue
            lines.append(f"  {marks[type(act)]} {act.describe()}")
        if verbose:
            lines.extend(f"    = {n}" for n in _verbose_notes(splan))
    if plan.prunes:
        lines.append("prune:")
        lines.extend(f"  - {p.describe()}" for p in plan.prunes)
    for refusal in plan.prune_refusals:
        lines.append(f"prune of session {refusal.session}: refused: {refusal.reason}")
    for session, instance in plan.orphans:
        lines.append(
            f"session {session}: not declared (use --prune to delete); instance {instance}"
        )
    if plan.suspends:
        shown = ", ".join(s.session for s in plan.suspends[:5])
        more = len(plan.suspends) - 5
        lines.append(
            f"then: suspend {len(plan.suspends)} instance(s) once converged ({shown}"
            + (f" and {more} more" if more > 0 else "")
            + "; `suspend: true`: memory kept, idle they cost nothing, the next apply with "
            "work wakes them; `ukc watch` keeps them up)"
        )
    lines.extend(f"warning: {w}" for w in plan.warnings)
    creates = sum(isinstance(a, actions.CreateInstance) for s in plan.sessions for a in s.actions)
    runs = sum(isinstance(a, actions.RunCommand) for s in plan.sessions for a in s.actions)
    files = sum(a.files for s in plan.sessions for a in s.actions if isinstance(a, actions.SyncUp))
    deletes = sum(isinstance(a, actions.DeleteInstance) for s in plan.sessions for a in s.actions)
    deletes += len(plan.prunes)
    refused = len(plan.refusals)
    failing = len(plan.errors) - refused
    if not plan.empty:
        lines.append(
            f"Plan: {creates} to create, {deletes} to delete, {files} file(s) to send, "
            f"{runs} command(s) to run."
        )
    elif not refused and not failing:
        lines.append("No changes. Sessions match their specs.")
    if failing:
        lines.append(f"Errors: apply would fail {failing} session(s) (see above).")
    if refused:
        lines.append(f"Refused: {refused} session(s) hold an instance ukc cannot prove it owns.")
    return lines


@dataclass(frozen=True)
class StatusRow:
    """One session `ukc status` shows: its record (None: never applied) and where it is kept."""

    name: str
    status_file: str
    record: SessionStatus | None
    #: a spec among the given paths declares it (False: only the status file remembers it)
    declared: bool = True


#: `ukc status --exit-code`: every session Ready, one Failed, the rest (pending or unknown)
STATUS_EXIT_READY, STATUS_EXIT_FAILED, STATUS_EXIT_PENDING = 0, 1, 3


def status_exit_code(rows: Sequence[StatusRow]) -> int:
    """0 when every session shown is Ready, 1 when one is Failed, else 3 (one is Pending,
    Progressing, Interrupted, Expired, Deleted or was never applied)."""
    phases = [row.record.phase if row.record is not None else "Pending" for row in rows]
    if not phases:
        return STATUS_EXIT_PENDING  # nothing known is not "all Ready"
    if "Failed" in phases:
        return STATUS_EXIT_FAILED
    if all(phase == "Ready" for phase in phases):
        return STATUS_EXIT_READY
    return STATUS_EXIT_PENDING


def span(seconds: float) -> str:
    """A duration in at most two units: 42s, 12m, 3h05m, 2d04h."""
    total = int(max(seconds, 0))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"


def _age(created_at: str | None, now: float) -> str:
    created = parse_time(created_at)
    return "-" if created is None else span(now - created)


def _ttl_left(rec: SessionStatus, now: float) -> str:
    expires = parse_time(rec.expires_at)
    if expires is None:
        return "-"
    return "expired" if now >= expires else span(expires - now)


def _created_at(rec: SessionStatus) -> str | None:
    return rec.created_at or (rec.instance.created_at if rec.instance else None)


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart; the last one unpadded."""
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    out = []
    for r in (header, *rows):
        cells = [str(c).ljust(w) for c, w in zip(r[:-1], widths, strict=False)]
        out.append("  ".join([*cells, str(r[-1])]).rstrip())
    return out


def _command_state(cmd: CommandRecord) -> str:
    """How the command's last run ended; for one this apply did not run, said as such (its
    result is an earlier run's)."""
    if cmd.interrupted:
        state = "interrupted"
    elif cmd.timed_out:
        state = "timed out"
    elif cmd.exit_code is not None:
        state = f"exit {cmd.exit_code}"
    else:
        return "skipped (never ran)" if cmd.skipped else "no exit code"
    return f"skipped (last run: {state})" if cmd.skipped else state


def _how(back: BackFrom) -> str:
    if back.timed_out:
        return "timed out"
    return "no exit code" if back.exit_code is None else f"exit {back.exit_code}"


STATUS_COLUMNS = ("NAME", "PHASE", "AGE", "TTL LEFT", "LAST APPLY", "INSTANCE")


def render_status(rows: Sequence[StatusRow], now: float) -> list[str]:
    """A table of the sessions (with column headers), then each session's commands and
    message; AGE is the instance's, LAST APPLY how long ago apply last converged it; a
    STATUS FILE column when the sessions come from more than one."""
    table: list[tuple[str, ...]] = []
    for row in rows:
        rec = row.record
        if rec is None:
            table.append((row.name, "Pending", "-", "-", "never", "-"))
            continue
        inst = rec.instance
        where = (
            f"{inst.name} ({inst.state})" if inst and inst.state else (inst.name if inst else "-")
        )
        last = parse_time(rec.last_applied_at)
        table.append(
            (
                row.name,
                rec.phase if row.declared else f"{rec.phase} (not declared)",
                _age(_created_at(rec), now),
                _ttl_left(rec, now),
                "never" if last is None else f"{span(now - last)} ago",
                where,
            )
        )
    if not rows:
        return ["no sessions"]
    columns: tuple[str, ...] = STATUS_COLUMNS
    if len({row.status_file for row in rows}) > 1:
        # sessions of several spec directories: same names may recur, say which is which
        columns = (*columns, "STATUS FILE")
        table = [(*cells, row.status_file) for cells, row in zip(table, rows, strict=True)]
    header, *lines = render_table(columns, table)
    out = [header]
    for line, row in zip(lines, rows, strict=True):
        out.append(line)
        if row.record is None:
            continue
        for cmd in row.record.commands:
            out.append(f"    {cmd.name:<18} {_command_state(cmd)}")
        back = row.record.sync.back_from
        if back is not None:
            # why: after a failed run, whether a report at home is this run's is the question
            how = f"{_how(back)}), {_ago(back.finished_at, now)}"
            out.append(f"    outputs brought home from command {back.command!r} ({how}")
        if row.record.message:
            out.append(f"    {row.record.message}")
    return out


STATUS_SCHEMA_VERSION: Literal[1] = 1


class StatusEntry(SessionStatus):
    """One session of `ukc status -o json`: its status-file record, and where it stands now."""

    name: str
    status_file: str
    #: a spec among the given paths declares it (False: only the status file remembers it)
    declared: bool
    #: seconds since its instance was created (None: no instance known)
    age_s: int | None
    #: seconds until its ttl passes, negative once passed (None: no ttl)
    ttl_left_s: int | None


class FollowedSource(BaseModel):
    """What `ukc follow` recorded in one status file."""

    #: the revision applied last (None: none applied yet)
    source: SourceRecord | None
    last_applied_revision: str
    last_attempted_revision: str
    last_attempted_at: str | None
    #: why the last attempted revision was not applied ("" when it was)
    last_attempt_error: str
    #: the revisions tried, oldest first
    revisions: list[RevisionRecord]


class StatusDocument(BaseModel):
    """What `ukc status --output json` prints (`schema_version` changes only when a field
    changes meaning or goes away)."""

    schema_version: Literal[1] = STATUS_SCHEMA_VERSION
    #: when it was read (UTC)
    now: str
    #: what `--exit-code` exits with: 0 all Ready, 1 one Failed, 3 one not Ready yet
    exit_code: int
    sessions: list[StatusEntry]
    #: per status file `ukc follow` wrote to: the git revision applied and the last attempt
    sources: dict[str, FollowedSource] = Field(default_factory=dict)


def status_document(rows: Sequence[StatusRow], now: float) -> StatusDocument:
    """`ukc status -o json` (ages at `now`)."""
    entries = []
    for row in rows:
        rec = row.record if row.record is not None else SessionStatus()
        created = parse_time(_created_at(rec))
        expires = parse_time(rec.expires_at)
        entries.append(
            StatusEntry(
                **rec.model_dump(),
                name=row.name,
                status_file=row.status_file,
                declared=row.declared,
                age_s=None if created is None else int(now - created),
                ttl_left_s=None if expires is None else int(expires - now),
            )
        )
    return StatusDocument(
        now=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
        exit_code=status_exit_code(rows),
        sessions=entries,
    )


def status_schema() -> dict[str, Any]:
    """The JSON Schema of `StatusDocument` (committed as docs/status.schema.json)."""
    schema = StatusDocument.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "ukc status",
        **{k: v for k, v in schema.items() if k != "title"},
    }


def printable(text: str) -> str:
    """Sandbox text made safe for a terminal: control characters but newline and tab (escape
    sequences that could retitle, recolour or rewrite the user's screen) shown escaped."""
    return escape_controls(text.replace("\r\n", "\n"), keep="\n\t")


def _ago(value: str | None, now: float) -> str:
    at = parse_time(value)
    return "at an unknown time" if at is None else f"{span(now - at)} ago"


def render_source(doc: StatusDoc, now: float) -> list[str]:
    """The git revision `ukc follow` applied last, and a later attempt that failed."""
    lines: list[str] = []
    src = doc.source
    if src is not None:
        where = f" {src.path}" if src.path else ""
        lines.append(
            f"source: {src.url} {src.ref}{where} at {src.revision[:12]}, "
            f"applied {_ago(src.applied_at, now)}"
        )
    attempted = doc.last_attempted_revision
    if attempted and (attempted != doc.last_applied_revision or doc.last_attempt_error):
        why = doc.last_attempt_error or "not finished"
        lines.append(
            f"last attempt: {attempted[:12]} {_ago(doc.last_attempted_at, now)}, not applied: {why}"
        )
    return lines


def source_json(doc: StatusDoc) -> FollowedSource | None:
    """What `ukc follow` recorded in a status file, or None when it never ran there."""
    if doc.source is None and not doc.last_attempted_revision:
        return None
    return FollowedSource(
        source=doc.source,
        last_applied_revision=doc.last_applied_revision,
        last_attempted_revision=doc.last_attempted_revision,
        last_attempted_at=doc.last_attempted_at,
        last_attempt_error=doc.last_attempt_error,
        revisions=list(doc.revisions),
    )
