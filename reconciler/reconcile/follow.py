"""`ukc follow`: apply each new revision of a git repository's specs, at an interval.

One check: (suspended? then nothing) → fetch the ref → a revision already applied is left
alone → check it out → load and validate every spec → apply (prune only with `--prune`) →
record it in the status file. A revision whose specs do not load (a parse error, a path
that leaves the repository) applies nothing and prunes nothing: the sessions keep running
as the last good revision left them, and the status file says which revision is broken and
why. A revision that failed to apply (a command failed, the cloud refused) is tried again at
the next check; a broken one only when the ref moves. With `resync_s`, the applied revision
is applied again once that long passed since it last converged, as `ukc apply` would: a
deleted instance comes back, ttls are enforced (no new entry in the revision history).

The status file (`.ukc/status.json` beside the specs in the checkout) records `source` (url
without credentials, ref, path, revision, applied_at), `last_applied_revision`,
`last_attempted_revision`, `last_attempted_at`, `last_attempt_error`, and `revisions` (the
last 20 tried, oldest first, with how each ended).

Suspend: a `suspended` file in the follower's state directory (`ukc follow --suspend`)
stops checks, fetches included, until it is removed (`--resume`). A running follower sees
it at its next check.

Shutdown: the first SIGINT or SIGTERM stops the follower; an apply in flight stops as a
Ctrl-C stops `ukc apply` (the command in flight is stopped, the sessions are recorded
`Interrupted`), its revision is recorded as not applied. A second signal quits at once.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Literal

from reconciler import errors
from reconciler.cloud.metros import MetroRegistry
from reconciler.reconcile.desired import load_groups
from reconciler.reconcile.events import Event, Reporter
from reconciler.reconcile.loop import apply_group, check_prune
from reconciler.reconcile.plan import parse_time
from reconciler.spec.gitsource import GitSource, Revision
from reconciler.status import journal
from reconciler.status.schema import REVISION_HISTORY, RevisionRecord, SourceRecord, StatusDoc

__all__ = [
    "Attempt",
    "FollowOptions",
    "Follower",
    "check_spec_path",
    "is_suspended",
    "resume",
    "suspend",
]

SUSPEND_FILE = "suspended"

Outcome = Literal["applied", "current", "failed", "broken", "suspended", "unreachable"]
RevisionOutcome = Literal["applying", "applied", "failed", "broken"]


@dataclass(frozen=True)
class FollowOptions:
    #: the specs' directory or file inside the repository ("" for its root)
    path: str = ""
    interval_s: float = 60.0
    prune: bool = False
    allow_empty: bool = False
    concurrency: int = 8
    lock_timeout_s: float = 0.0
    #: re-apply the applied revision once this long passed since it last converged (drift,
    #: ttls); None: only new revisions are applied
    resync_s: float | None = None


@dataclass(frozen=True)
class Attempt:
    """What one check did."""

    outcome: Outcome
    revision: Revision | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.outcome in ("applied", "current", "suspended")


def suspend(state_dir: Path, reason: str = "") -> None:
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / SUSPEND_FILE).write_text(f"{journal.utc_now()} {reason}".rstrip() + "\n")


def resume(state_dir: Path) -> bool:
    """Remove the suspend mark; False when there was none."""
    try:
        (state_dir / SUSPEND_FILE).unlink()
    except FileNotFoundError:
        return False
    return True


def is_suspended(state_dir: Path) -> bool:
    return (state_dir / SUSPEND_FILE).exists()


def check_spec_path(path: str) -> str:
    """A path inside the repository: relative, no `..` (symlinks are checked at checkout)."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    if path.startswith("/") or ".." in parts:
        raise errors.UsageError(f"--path {path!r} must be a path inside the repository")
    return "/".join(parts)


class Follower:
    """Follows one `GitSource`; `check()` is one poll, `run()` polls until stopped."""

    def __init__(
        self,
        source: GitSource,
        options: FollowOptions,
        *,
        metros: MetroRegistry,
        reporter: Reporter,
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.source = source
        self.options = options
        self.metros = metros
        self.reporter = reporter
        self.environ = environ
        self.clock = clock
        self._sleep = sleep
        self._now = now
        # why a flag, not an Event: the signal handler sets it in the main thread, which
        # may be inside Event.wait's own bookkeeping
        self._stopping = False
        #: a revision whose specs did not load: not tried again until the ref moves
        self._broken: str | None = None
        self._applying = False
        self._forwarded = False

    # -- one check -------------------------------------------------------------------------

    def _say(self, text: str, kind: str = "info") -> None:
        self.reporter.event(Event("follow", kind, text))

    def _spec_target(self) -> Path:
        """The specs' path in the checkout; refused when it leads outside it (a symlink)."""
        root = self.source.work_tree.resolve()
        target = (self.source.work_tree / self.options.path).resolve()
        if target != root and root not in target.parents:
            raise errors.SpecError(
                f"--path {self.options.path!r} leads outside the repository (a symlink)"
            )
        if not target.exists():
            raise errors.SpecError(f"--path {self.options.path!r} is not in this revision")
        return target

    def _status_path(self) -> Path:
        target = self.source.work_tree / self.options.path
        base = target if not target.is_file() else target.parent
        return journal.status_path_for(base.resolve() if base.exists() else base)

    def _record(self, status_path: Path, update: Callable[[StatusDoc], None]) -> None:
        with journal.lock(status_path, timeout_s=max(self.options.lock_timeout_s, 60.0)):
            doc = journal.load(status_path)
            update(doc)
            journal.save(status_path, doc)

    def check(self) -> Attempt:
        if is_suspended(self.source.state_dir):
            self._say("suspended (ukc follow --resume to continue): not checking")
            return Attempt("suspended")
        try:
            revision = self.source.fetch()
        except errors.SourceError as err:
            self._say(str(err), "failed")
            return Attempt("unreachable", message=str(err))
        status_path = self._status_path()
        doc = journal.load(status_path) if status_path.exists() else StatusDoc()
        if revision.sha == doc.last_applied_revision:
            if not self._resync_due(doc):
                return Attempt("current", revision)
            return self._attempt(revision, resync=True)
        if revision.sha == self._broken:
            return Attempt("broken", revision, "specs did not load (unchanged)")
        return self._attempt(revision)

    def _resync_due(self, doc: StatusDoc) -> bool:
        """The applied revision last converged `resync_s` ago or more (as the status file says,
        so a follower run by cron resyncs as one that keeps running does)."""
        if self.options.resync_s is None:
            return False
        if doc.last_attempted_revision != doc.last_applied_revision:
            return True  # a later attempt failed and the ref went back: converge again
        last = parse_time(doc.last_attempted_at)
        return last is None or self._now() - last >= self.options.resync_s

    def _attempt(self, revision: Revision, *, resync: bool = False) -> Attempt:
        if resync:
            self._say(f"revision {revision.short} of {self.source.ref}: current; resyncing")
        else:
            self._say(f"revision {revision.short} of {self.source.ref}: applying")
        try:
            self.source.checkout(revision)
        except errors.SourceError as err:
            self._say(str(err), "failed")
            return Attempt("unreachable", revision, str(err))
        status_path = self._status_path()
        if not resync:
            self._record(
                status_path,
                lambda doc: self._attempted(
                    doc, revision, "applying", "not finished (being applied, or stopped)"
                ),
            )
        try:
            target = self._spec_target()
            groups = load_groups([target], self.environ)
            # why here: an empty spec set with --prune would delete every session
            check_prune(
                groups, prune=self.options.prune, allow_empty=self.options.allow_empty, only=()
            )
        except (errors.SpecError, errors.UsageError) as err:
            self._broken = revision.sha
            why = f"specs of revision {revision.short} not applied, nothing pruned: {err}"
            self._say(why, "failed")
            self._record(status_path, lambda doc: self._attempted(doc, revision, "broken", why))
            return Attempt("broken", revision, why)
        failures: list[str] = []
        self._applying = True
        try:
            for group in groups:
                try:
                    result = apply_group(
                        group,
                        metros=self.metros,
                        reporter=self.reporter,
                        environ=self.environ,
                        prune=self.options.prune,
                        concurrency=self.options.concurrency,
                        lock_timeout_s=self.options.lock_timeout_s,
                        # between revisions nothing runs: idle instances cost nothing
                        suspend_idle=True,
                    )
                except errors.UkcError as err:
                    failures.append(str(err))
                    continue
                if result.interrupted:
                    failures.append("interrupted")
                failures += [f"{name}: {why}" for name, why in sorted(result.failed.items())]
        finally:
            self._applying = False
        if failures:
            why = f"revision {revision.short} failed to apply: " + "; ".join(failures)[:2000]
            self._say(why, "failed")
            self._record(status_path, lambda doc: self._attempted(doc, revision, "failed", why))
            return Attempt("failed", revision, why)
        if resync:
            # converged again: when, without a new entry in the revision history
            self._record(status_path, lambda doc: self._resynced(doc, revision))
            self._say(f"revision {revision.short} resynced")
            return Attempt("applied", revision)
        self._record(status_path, lambda doc: self._applied(doc, revision))
        self._say(f"revision {revision.short} applied")
        return Attempt("applied", revision)

    def _attempted(
        self, doc: StatusDoc, revision: Revision, outcome: RevisionOutcome, error: str = ""
    ) -> None:
        doc.last_attempted_revision = revision.sha
        doc.last_attempted_at = journal.utc_now()
        doc.last_attempt_error = error
        entry = RevisionRecord(
            revision=revision.sha, at=doc.last_attempted_at, outcome=outcome, error=error
        )
        last = doc.revisions[-1] if doc.revisions else None
        if last is not None and last.revision == revision.sha and last.outcome == "applying":
            doc.revisions[-1] = entry  # how the attempt it opened ended
        else:
            doc.revisions.append(entry)
        del doc.revisions[:-REVISION_HISTORY]

    def _resynced(self, doc: StatusDoc, revision: Revision) -> None:
        doc.last_attempted_revision = revision.sha
        doc.last_attempted_at = journal.utc_now()
        doc.last_attempt_error = ""

    def _applied(self, doc: StatusDoc, revision: Revision) -> None:
        self._attempted(doc, revision, "applied")
        doc.last_applied_revision = revision.sha
        doc.source = SourceRecord(
            url=self.source.url,
            ref=revision.ref,
            path=self.options.path,
            revision=revision.sha,
            applied_at=doc.last_attempted_at,
        )

    # -- the loop --------------------------------------------------------------------------

    def stop(self) -> None:
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds` in short steps; True when stopped meanwhile."""
        deadline = self.clock() + seconds
        while not self._stopping:
            left = deadline - self.clock()
            if left <= 0:
                return False
            self._sleep(min(0.2, left))
        return True

    def run(self, *, once: bool = False) -> int:
        """Check at every interval until stopped; with `once`, one check (exit 0 when the
        source is applied or suspended, 1 otherwise)."""
        # one follower per state directory: two would check out over each other
        with journal.lock(self.source.state_dir / "follow"):
            while True:
                started = self.clock()
                try:
                    attempt = self.check()
                except errors.UkcError as err:
                    # why: one bad check (a status file another ukc holds too long, one
                    # unreadable) must not end an agent that is meant to keep running
                    self._say(str(err), "failed")
                    attempt = Attempt("failed", message=str(err))
                if once:
                    return 0 if attempt.ok else 1
                wait = max(0.0, self.options.interval_s - (self.clock() - started))
                if self._stopping or self._wait(wait):
                    self._say("stopped")
                    return 0

    def install_signal_handlers(self) -> None:
        """First SIGINT/SIGTERM: stop (an apply in flight stops as on Ctrl-C). Second: quit."""
        hits = {"n": 0}

        def handler(signum: int, frame: FrameType | None) -> None:
            if signum == signal.SIGINT and self._forwarded:
                self._forwarded = False  # our own forward of a SIGTERM, already counted
                return
            hits["n"] += 1
            if hits["n"] > 1:
                os._exit(130)
            self._say("stopping (a second signal quits at once)")
            self.stop()
            if signum == signal.SIGTERM and self._applying:
                # why: apply stops its command in flight on SIGINT (seen at once through the
                # wakeup fd, whichever thread runs); SIGTERM must stop it the same way
                self._forwarded = True
                os.kill(os.getpid(), signal.SIGINT)

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
