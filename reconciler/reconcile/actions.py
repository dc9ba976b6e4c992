"""Actions: what the planner decides and the executor performs, as frozen values.

Each action names its session and says *why* it exists (`reason`), so `ukc plan` can print a
plan that explains itself and tests can compare plans with literals. The executor performs
them in the order the plan gives and never invents or reorders any.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from reconciler.spec.durations import format_duration
from reconciler.spec.models import DEFAULT_SHELL
from reconciler.spec.sizes import human_size

__all__ = [
    "Action",
    "CreateInstance",
    "DeleteInstance",
    "Plan",
    "Refusal",
    "RunCommand",
    "SessionPlan",
    "SetAutokill",
    "StartInstance",
    "SuspendInstance",
    "SyncBack",
    "SyncUp",
    "WaitReady",
]


@dataclass(frozen=True)
class CreateInstance:
    session: str
    instance_name: str
    metro: str
    reason: str
    #: planned from the records' word before the list answered (the apply's first look): a
    #: name already taken is the list's to judge (the next round), never adopted here
    unlisted: bool = False

    def describe(self) -> str:
        return f"create instance {self.instance_name} on metro {self.metro} ({self.reason})"


@dataclass(frozen=True)
class DeleteInstance:
    session: str
    instance_name: str
    metro: str
    reason: str
    #: the session is going away for good (delete/prune/ttl): drop its key and sync records
    forget: bool = True
    #: phase recorded afterwards
    final_phase: str = "Deleted"
    #: the uuid ownership was proven for: the delete names exactly this instance
    instance_uuid: str = ""
    #: (uuid, name) of the session's volumes proven ours, deleted after the instance (one
    #: created with it normally goes with it; this also takes what the platform kept)
    volumes: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        also = f" and {len(self.volumes)} volume(s) of the session" if self.volumes else ""
        return f"delete instance {self.instance_name}{also} on metro {self.metro} ({self.reason})"


@dataclass(frozen=True)
class StartInstance:
    session: str
    instance_name: str
    reason: str

    def describe(self) -> str:
        return f"start instance {self.instance_name} ({self.reason})"


@dataclass(frozen=True)
class WaitReady:
    session: str
    instance_name: str
    #: the transport it waits for (the session's `exec`)
    transport: str
    #: the instance is in standby (suspended, or scaled to zero): a start request wakes it
    #: first (a suspended one may not wake on traffic)
    wake: bool = False
    #: a push follows once the tree is scanned (an instance made ahead of the scan): the
    #: sync helper may start as soon as the sandbox answers
    push_follows: bool = False

    def describe(self) -> str:
        woken = ", waking it from standby" if self.wake else ""
        return f"wait until {self.instance_name} accepts {self.transport}{woken}"


def autokill_text(time_ms: int | None) -> str:
    """An autokill time as people read it ("1d", "off")."""
    return format_duration(time_ms // 1000) if time_ms else "off"


@dataclass(frozen=True)
class SetAutokill:
    """The platform's autokill of an existing instance follows the spec (`PATCH`)."""

    session: str
    instance_name: str
    instance_uuid: str
    #: 0: off
    time_ms: int
    reason: str

    def describe(self) -> str:
        to = autokill_text(self.time_ms)
        return f"set autokill of instance {self.instance_name} to {to} ({self.reason})"


@dataclass(frozen=True)
class SuspendInstance:
    """After a one-shot apply converged: the session's instance is suspended (`suspend`)."""

    session: str
    instance_name: str
    metro: str

    def describe(self) -> str:
        return (
            f"suspend instance {self.instance_name} once converged (memory kept; idle it "
            "costs nothing, the next apply with work wakes it)"
        )


@dataclass(frozen=True)
class SyncUp:
    session: str
    files: int
    bytes: int
    deletes: int
    full: bool
    reason: str
    #: some of the files to send, and some of the files to delete in the sandbox
    sample: tuple[str, ...] = ()
    deleted_sample: tuple[str, ...] = ()

    def describe(self) -> str:
        what = f"send {self.files} file(s) ({human_size(self.bytes)}), delete {self.deletes}"
        if self.full:
            size = human_size(self.bytes)
            what = f"full sync: up to {self.files} file(s) ({size}), remote scanned"
        shown = ""
        listed = self.sample + self.deleted_sample
        if listed:
            total = self.files + self.deletes
            more = total - len(listed) if not self.full else 0
            shown = ": " + ", ".join(listed) + (f" and {more} more" if more > 0 else "")
        return f"{what} ({self.reason}){shown}"


@dataclass(frozen=True)
class RunCommand:
    session: str
    index: int
    name: str
    run: str
    timeout_s: float
    input_hash: str
    reason: str
    #: the input hash without secret values (judges the command when a secret is unset)
    public_hash: str = ""
    #: the shell it runs under
    shell: str = DEFAULT_SHELL
    #: digest of the files it runs with (its `inputs`, else the whole synced tree)
    inputs_digest: str = ""
    #: a sync-back follows it (the session's last command): the pull's helper may start
    #: while it runs
    pull_follows: bool = False

    def describe(self) -> str:
        return f"run command {self.name!r} ({self.reason})"


@dataclass(frozen=True)
class SyncBack:
    session: str
    paths: tuple[str, ...]
    reason: str
    #: what the last sync-back brought (the exact list is only known once the sandbox answers)
    last_files: int = 0
    last_bytes: int = 0
    #: `sync.back_delete`: files it brought back that the sandbox deleted are removed here
    mirror_deletes: bool = False
    #: performed even when a command before it failed or timed out (the outputs of a failed
    #: run matter most); the commands after the failed one are still skipped
    always: bool = False

    def describe(self) -> str:
        last = ""
        if self.last_files:
            last = f"; last time {self.last_files} file(s), {human_size(self.last_bytes)}"
        mirror = "; mirrors deletions of files it brought back" if self.mirror_deletes else ""
        return f"bring back {', '.join(self.paths)} ({self.reason}{last}{mirror})"


Action = (
    CreateInstance
    | DeleteInstance
    | StartInstance
    | SetAutokill
    | WaitReady
    | SyncUp
    | RunCommand
    | SyncBack
)


@dataclass(frozen=True)
class Refusal:
    """An instance in a session's way that ukc cannot prove it owns: the session fails."""

    session: str
    instance_name: str
    metro: str
    reason: str

    def describe(self) -> str:
        return self.reason


@dataclass(frozen=True)
class SessionPlan:
    """The ordered actions for one session plus human no-op reasons for what is already right."""

    session: str
    actions: tuple[Action, ...] = ()
    noops: tuple[str, ...] = ()
    #: set when nothing may be done for the session (then `actions` is empty)
    refusal: Refusal | None = None
    #: why apply would fail this session, known before trying (a missing directory, an
    #: unset secret a command needs); then `actions` is empty
    error: str = ""
    #: set when the session's ttl has passed (it is deleted, or apply deletes it): what
    #: happens and how to renew it
    expired: str = ""
    #: how sync reaches into the sandbox ("python helper", "shell+tar", "not known until
    #: first contact"), from what an earlier contact recorded; "" when not judged
    sync_path: str = ""

    @property
    def changes(self) -> tuple[Action, ...]:
        """Actions that change something (waiting for readiness alone is not a change)."""
        return tuple(a for a in self.actions if not isinstance(a, WaitReady))


@dataclass(frozen=True)
class Plan:
    sessions: tuple[SessionPlan, ...] = ()
    prunes: tuple[DeleteInstance, ...] = ()
    warnings: tuple[str, ...] = field(default=())
    #: prunes refused because ownership could not be proven
    prune_refusals: tuple[Refusal, ...] = ()
    #: sessions we own (in the status inventory, instance observed) that no spec declares,
    #: as (session, instance name), when not pruning: `--prune` would delete them
    orphans: tuple[tuple[str, str], ...] = ()
    #: the instances a one-shot apply suspends once every session converged (`suspend`);
    #: not changes: a plan of nothing else is empty
    suspends: tuple[SuspendInstance, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.prunes and all(not s.changes for s in self.sessions)

    @property
    def errors(self) -> dict[str, str]:
        """Every session apply would fail, with why: refusals and known errors."""
        found = {r.session: r.reason for r in self.refusals}
        found.update({s.session: s.error for s in self.sessions if s.error})
        return found

    @property
    def refusals(self) -> tuple[Refusal, ...]:
        """Every refusal, of sessions and of prunes."""
        own = tuple(s.refusal for s in self.sessions if s.refusal is not None)
        return own + self.prune_refusals
