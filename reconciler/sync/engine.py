"""The sync engine's facade: scan and plan locally, push, pull, forget a session's records.

A push or pull runs over a `RemoteShell` into the session's sandbox (the byte streams of its
transport), with the session's `SyncOptions` and the instance uuid that scopes the records.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass

from reconciler.sync import push as python_push
from reconciler.sync import tarpush
from reconciler.sync.capability import is_missing_interpreter, record_tools, recorded_tools
from reconciler.sync.diff import TransferPlan, changes_of, diff_manifests
from reconciler.sync.ignore import IgnoreRules, load_rules
from reconciler.sync.manifest import (
    Manifest,
    last_push_record,
    push_meta,
    scan_local,
    since_push,
)
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import PullResult, pull, pull_record, pulled_paths
from reconciler.sync.pullrecord import pull_meta
from reconciler.sync.push import DigestsAhead, PushResult, big_files
from reconciler.sync.remote import HelperSession, helper_command
from reconciler.transport.base import RemoteShell

__all__ = [
    "DigestsAhead",
    "Manifest",
    "PullPlan",
    "PullResult",
    "PushResult",
    "SyncOptions",
    "TransferPlan",
    "big_files",
    "digest_ahead",
    "forget",
    "greet",
    "plan_pull",
    "plan_push",
    "pull",
    "pulled_paths",
    "push",
    "scan_local",
    "start_ahead",
    "start_pull_ahead",
    "ungreet",
]


def greet(shell: RemoteShell, opts: SyncOptions, instance_uuid: str) -> bool:
    """Start the next push's first round trip now, if the last push over `shell` left its
    helper running (`push.greet`); True: call `ungreet(shell)` when the pushes are done."""
    if recorded_tools(opts, instance_uuid) == "shell":
        return False
    return python_push.greet(shell, opts, instance_uuid)


def ungreet(shell: RemoteShell) -> None:
    python_push.ungreet(shell)


def push(
    shell: RemoteShell,
    opts: SyncOptions,
    *,
    instance_uuid: str,
    local: Manifest | None = None,
    rules: IgnoreRules | None = None,
    ahead: DigestsAhead | None = None,
) -> PushResult:
    """Sync the local tree to the sandbox over the path its image allows (`capability`):
    the python helper, or shell+tar once the instance is known to have no usable python3
    (learned from the helper's own failure to start, then recorded). `ahead`: big files'
    block digests made while the sandbox booted (`digest_ahead`), for the python path."""
    if recorded_tools(opts, instance_uuid) == "shell":
        return tarpush.push(shell, opts, instance_uuid=instance_uuid, local=local, rules=rules)
    try:
        result = python_push.push(
            shell, opts, instance_uuid=instance_uuid, local=local, rules=rules, ahead=ahead
        )
    except Exception as exc:
        if not is_missing_interpreter(exc, opts):
            raise
        record_tools(opts, instance_uuid, "shell")
        return tarpush.push(shell, opts, instance_uuid=instance_uuid, local=local, rules=rules)
    record_tools(opts, instance_uuid, "python")
    return result


def start_ahead(
    shell: RemoteShell, opts: SyncOptions, *, instance_uuid: str, before: str = ""
) -> bool:
    """Start the python helper of a push still to come over `shell` (a connection opened
    ahead of need), unless the instance is known to have no python3 (the tar path then
    needs nothing started). `before`: shell text its shell runs first, whatever comes of it
    (`remote.helper_command`); True once that shell was started."""
    if recorded_tools(opts, instance_uuid) == "shell":
        return False
    # a kept connection's lender starts the next one ahead too (`RemoteShell.spare`, where a
    # shell has it): the helper's bootstrap waits for its program, so it may be started early
    spare = getattr(getattr(shell, "shell", shell), "spare", None)
    if spare is not None:
        spare(helper_command(opts))
    return HelperSession.start_ahead(shell, opts, before=before)


def digest_ahead(
    ahead: DigestsAhead,
    trees: list[tuple[SyncOptions, list[tuple[str, int, int]]]],
    stop: Callable[[], bool],
) -> None:
    """Digest into `ahead` now what the next pushes of these trees digest as they send these
    files (a first push's big files, `big_files`), while the sandboxes boot: the pushes given
    `ahead` take them (`DigestsAhead.make`)."""
    ahead.make(((opts.local_root, files) for opts, files in trees), stop)


def start_pull_ahead(shell: RemoteShell, opts: SyncOptions, *, instance_uuid: str) -> None:
    """Start the read-only python helper of a pull still to come over `shell` (while the
    command before it runs), unless the instance is known to have no python3."""
    if recorded_tools(opts, instance_uuid) != "shell":
        HelperSession.start_pull_ahead(shell, opts)


def plan_push(local: Manifest, opts: SyncOptions) -> TransferPlan:
    """What a push would do, judged against our last push record only (no remote I/O).

    Without a record everything is an upload. The real push may find less to do (a trusted
    remote record) or more (a rebooted sandbox forces a scan).
    """
    rules = load_rules(opts)
    meta = push_meta(opts)
    if meta is None:
        return diff_manifests(local, Manifest({}), rules, reason="no push record: full upload")
    reason = "against the last push record"
    key = (meta["digest"], meta["mtimes"])
    if key == local.key:
        return TransferPlan(reason=reason)
    basis = since_push(opts, local, meta)
    if basis is not None:
        return changes_of(local, basis, rules, reason=reason)[1]
    last = last_push_record(opts)
    if last is None:
        return diff_manifests(local, Manifest({}), rules, reason="no push record: full upload")
    return diff_manifests(local, last[0], rules, reason=reason)


@dataclass(frozen=True)
class PullPlan:
    """What sync-back covers: the declared paths and what our last pull wrote."""

    back: tuple[str, ...]
    known_files: int
    known_bytes: int
    #: `sync.back_delete`: files a pull brought back and the sandbox deleted are removed here
    mirrors_deletes: bool = False


def plan_pull(opts: SyncOptions) -> PullPlan:
    """The declared sync-back paths and the size of what the last pull brought back (from
    the record's metadata line when it has one: its entries are not read)."""
    meta = pull_meta(opts.state_dir)
    if meta is not None:
        files, size = meta["files"], meta["bytes"]
    else:
        entries = pull_record(opts).entries
        files, size = len(entries), sum(e.size for e in entries.values())
    return PullPlan(
        back=opts.back_paths(),
        known_files=files,
        known_bytes=size,
        mirrors_deletes=opts.back_delete and bool(opts.back_paths()),
    )


def forget(opts: SyncOptions) -> None:
    """Drop every local record of this session (the session was deleted)."""
    shutil.rmtree(opts.state_dir, ignore_errors=True)
