"""The status file's models: the contract other tools read, and the controller's journal.

`.ukc/status.json` in the spec's directory records, per session, the phase, the instance, every
command's last result, conditions and timings, plus what the planner needs to stay idempotent:
the digest of the last synced tree and the input hash of each command's last *successful* run.
It is a cache and a journal, never the source of truth about instances: every pass re-observes
the cloud. Nothing secret is ever stored here (command output tails are redacted before they
arrive).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from reconciler.spec.models import DEFAULT_SHELL

__all__ = [
    "REVISION_HISTORY",
    "STATUS_VERSION",
    "BackFrom",
    "CommandRecord",
    "Condition",
    "InstanceRecord",
    "Interruption",
    "Phase",
    "RevisionRecord",
    "SessionStatus",
    "SourceRecord",
    "StatusDoc",
    "SyncRecord",
    "expiry_time",
    "format_time",
    "parse_time",
]

STATUS_VERSION = 1

Phase = Literal["Pending", "Progressing", "Ready", "Failed", "Interrupted", "Deleted", "Expired"]


def parse_time(value: str | None) -> float | None:
    """An ISO 8601 time of a status file or the platform as a POSIX timestamp (None if
    absent or unreadable)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def format_time(timestamp: float) -> str:
    """A POSIX timestamp as the status file writes times (UTC, seconds)."""
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def expiry_time(created: float, ttl_s: float) -> str:
    """`expires_at` of a session created at `created`: rounded up to the second, so a
    timer set for it never fires before the planner (exact) sees the session expired."""
    return format_time(math.ceil(created + ttl_s))


class _Model(BaseModel):
    # Tolerant on read: a newer ukc may add fields; we keep the ones we know.
    model_config = ConfigDict(extra="ignore")


class InstanceRecord(_Model):
    name: str
    uuid: str
    fqdn: str | None = None
    metro: str = ""
    state: str = ""
    created_at: str | None = None
    start_count: int | None = None
    #: what identified the sandbox on this checkout's first connection (for ssh: its host key
    #: fingerprint); every later connection must present it. Status files of older versions
    #: call it `host_key`
    pin: str | None = Field(default=None, validation_alias=AliasChoices("pin", "host_key"))
    #: the token ukc left in the sandbox's memory on its first connection of this boot
    #: (`reconcile/bootmark.py`): found again under another `start_count`, the boot is the same
    boot_mark: str = ""


class BackFrom(_Model):
    """The command run whose outputs the last sync-back brought home (it may have failed)."""

    command: str
    exit_code: int | None = None
    timed_out: bool = False
    finished_at: str | None = None


class SyncRecord(_Model):
    digest: str = ""
    instance_uuid: str = ""
    start_count: int | None = None
    files: int = 0
    bytes: int = 0
    last_synced_at: str | None = None
    last_files_sent: int = 0
    last_bytes_sent: int = 0
    last_deleted: int = 0
    remote_scanned: bool = False
    pulled_files: int = 0
    conflicts: list[str] = Field(default_factory=list)
    rejected: list[str] = Field(default_factory=list)
    #: `sync.back_delete`: local files removed because the sandbox deleted them, files kept
    #: because they changed here, and why deletions were not mirrored (last sync-back)
    pulled_deleted: int = 0
    deletes_kept: list[str] = Field(default_factory=list)
    deletes_skipped: list[str] = Field(default_factory=list)
    #: commands ran since the last completed sync-back: their outputs are not home yet
    back_pending: bool = False
    #: why the last sync-back stopped before the end of the sandbox's listing (a
    #: `sync.back_max_*` cap with its numbers, a full disk, a broken stream); "" when it did not
    back_stopped: str = ""
    #: which command run the files of the last sync-back come from (None: no command ran
    #: before it in that apply, e.g. a sync-back still owed from an earlier one)
    back_from: BackFrom | None = None


class CommandRecord(_Model):
    name: str
    run: str
    exit_code: int | None = None
    timed_out: bool = False
    stdout: str = ""
    stderr: str = ""
    started_at: str | None = None
    finished_at: str | None = None
    duration_s: float | None = None
    skipped: bool = False
    #: stopped by Ctrl-C before it finished (then `exit_code` is None)
    interrupted: bool = False
    input_hash: str = ""
    #: digest of the synced files it ran with: those its `inputs` match, else the whole tree
    inputs_digest: str = ""
    #: the shell it ran under (older status files: always sh)
    shell: str = DEFAULT_SHELL
    #: the instance the last successful run happened on (a new instance re-runs everything)
    instance_uuid: str = ""
    #: and its boot (`start_count`): a cold boot starts with an empty /workspace (it lives in
    #: memory), so what the command made is gone
    start_count: int | None = None
    #: input hash of the last run that exited 0 (what skipping compares against)
    last_success_hash: str = ""
    #: the same without secret values (compared when a secret's variable is not set)
    last_success_public_hash: str = ""


class Condition(_Model):
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str
    message: str = ""
    last_transition_time: str


class Interruption(_Model):
    """What an apply stopped by Ctrl-C was doing, had done and had still to do."""

    at: str
    #: the action in flight when it came ("" when it came between two actions)
    during: str = ""
    finished: list[str] = Field(default_factory=list)
    not_done: list[str] = Field(default_factory=list)


class SessionStatus(_Model):
    phase: Phase = "Pending"
    spec_hash: str = ""
    observed_generation: str = ""
    spec_file: str = ""
    metro: str = ""
    instance: InstanceRecord | None = None
    sync: SyncRecord = Field(default_factory=SyncRecord)
    commands: list[CommandRecord] = Field(default_factory=list)
    conditions: list[Condition] = Field(default_factory=list)
    timings: dict[str, float] = Field(default_factory=dict)
    created_at: str | None = None
    expires_at: str | None = None
    last_applied_at: str | None = None
    message: str = ""
    #: set with phase `Interrupted`; cleared by the next apply that gets the session Ready
    interruption: Interruption | None = None
    #: how many times a runner left this record in the sandbox's journal (with
    #: `UKC_SESSION_SECRET`): a journal with a higher count is newer than this record
    journal_seq: int = 0

    def expired(self, now: float) -> bool:
        """Its ttl passed (`expires_at` <= `now`) while its instance still exists: the next
        `ukc apply`, or a running `ukc watch`, deletes it."""
        at = parse_time(self.expires_at)
        return (
            at is not None
            and now >= at
            and self.instance is not None
            and self.phase not in ("Deleted", "Expired")
        )


class SourceRecord(_Model):
    """The git revision the sessions were last applied from (`ukc follow`)."""

    #: the repository: a path, or a URL without any credentials it carried
    url: str
    ref: str
    #: the specs' directory or file inside the repository ("" for its root)
    path: str = ""
    revision: str
    applied_at: str | None = None


class RevisionRecord(_Model):
    """One revision `ukc follow` tried, and how it ended."""

    revision: str
    at: str
    #: applying (not finished: being applied, or the follower stopped), applied, failed (it
    #: is tried again), broken (its specs did not load: nothing applied, nothing pruned)
    outcome: Literal["applying", "applied", "failed", "broken"]
    error: str = ""


#: how many tried revisions the status file keeps
REVISION_HISTORY = 20


class StatusDoc(_Model):
    version: int = STATUS_VERSION
    project: str = ""
    updated_at: str | None = None
    sessions: dict[str, SessionStatus] = Field(default_factory=dict)
    #: set by `ukc follow`: the revision applied last, and the last one tried (with why it
    #: failed, "" when it did not): a broken revision shows here while `source` keeps the
    #: last good one
    source: SourceRecord | None = None
    last_applied_revision: str = ""
    last_attempted_revision: str = ""
    last_attempted_at: str | None = None
    last_attempt_error: str = ""
    #: the revisions `ukc follow` tried, oldest first (the last `REVISION_HISTORY`)
    revisions: list[RevisionRecord] = Field(default_factory=list)

    def as_of(self, now: float) -> StatusDoc:
        """The document as `ukc status` shows it at `now` (nothing is written): a session whose
        ttl passed is `Expired`, with what deletes it."""
        shown = self.model_copy(deep=True)
        for rec in shown.sessions.values():
            if rec.expired(now):
                rec.phase = "Expired"
                rec.message = (
                    f"ttl passed at {rec.expires_at}; `ukc apply` (or a running `ukc watch`) "
                    "deletes it; raise `ttl` in the spec to keep it"
                )
        return shown

    def inventory(self) -> dict[str, InstanceRecord]:
        """Sessions whose instance we created and have not deleted: the prune inventory."""
        return {
            name: s.instance
            for name, s in self.sessions.items()
            if s.instance is not None and s.phase not in ("Deleted", "Expired")
        }
