"""The planner: desired sessions + observed instances + the status journal → a Plan.

PURE: no I/O, no clock, no randomness, no environment. Everything it needs arrives as values
(`now` included), so equal inputs give equal plans and every case is a table test. The observer
gathers the inputs; the executor performs the output.

Ordering inside a session is fixed: (sync back before a replacement) → delete → create/start →
wait ready → sync up → commands → sync back. Prunes come last, after every session converged.

An instance under a session's name that `identity.prove` does not prove ours is never
replaced, deleted, adopted or used: the session gets a `Refusal` instead of actions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence

from reconciler.cloud.model import Instance, Volume
from reconciler.reconcile import actions, identity
from reconciler.reconcile.desired import CommandIntent, DesiredSession
from reconciler.spec.durations import format_duration
from reconciler.spec.models import DEFAULT_SHELL
from reconciler.spec.sizes import human_size
from reconciler.status.schema import (
    CommandRecord,
    SessionStatus,
    StatusDoc,
    format_time,
    parse_time,
)
from reconciler.sync.capability import describe

__all__ = [
    "command_input_hash",
    "command_public_hash",
    "memory_warning",
    "parse_time",
    "plan_delete",
    "plan_sessions",
    "recorded_without_instance",
]

#: states in which the instance will serve us once woken or booted, without a start request
_UP_STATES = frozenset({"running", "starting", "standby"})
#: states from which a start request brings it back
_DOWN_STATES = frozenset({"stopped", "stopping", "draining"})


def _definition(session: DesiredSession, command: CommandIntent, env: str) -> list[object]:
    """What a command's result depends on, `env` standing for its environment."""
    files = session.tree.digest if command.inputs is None else command.inputs_digest
    canon: list[object] = [files, session.image, env, command.name, command.run]
    # why only when set: a command without them keeps the hash it had before they existed,
    # so upgrading ukc re-runs nothing
    extra: dict[str, object] = {}
    if command.inputs is not None:
        extra["inputs"] = list(command.inputs)
    if command.shell != DEFAULT_SHELL:
        extra["shell"] = command.shell
    if extra:
        canon.append(extra)
    return canon


def _digest(canon: list[object]) -> str:
    return hashlib.sha256(json.dumps(canon, separators=(",", ":")).encode()).hexdigest()[:32]


def command_input_hash(session: DesiredSession, command: CommandIntent) -> str:
    """What a command's result depends on: its inputs (the synced tree, or the files its
    `inputs` match), the command (text, shell, inputs patterns), its env, the image."""
    return _digest(_definition(session, command, session.env_fingerprint))


def command_public_hash(session: DesiredSession, command: CommandIntent) -> str:
    """The same without secret values (only their names): what can be judged without them."""
    return _digest(_definition(session, command, session.public_fingerprint))


def _expires_at(
    desired: DesiredSession, inst: Instance, record: SessionStatus | None
) -> float | None:
    """When the session's ttl passes: `ttl` after its instance was created (None: no ttl,
    or no creation time known)."""
    if desired.ttl_s is None:
        return None
    created = parse_time(inst.created_at)
    if created is None and record is not None and record.instance is not None:
        created = parse_time(record.instance.created_at)
    return None if created is None else created + desired.ttl_s


def _expired_while_gone(
    desired: DesiredSession, inst: Instance | None, record: SessionStatus | None, now: float
) -> actions.SessionPlan | None:
    """A session whose instance is gone (the platform's autokill reclaims an idle one) and
    whose ttl has passed by the record: it is expired, not made anew. The delete names the
    recorded uuid (the one ukc made), so it touches nothing else; its local half records
    `Expired` and drops the key and sync records."""
    if inst is not None or record is None or record.instance is None or desired.ttl_s is None:
        return None
    if record.phase in ("Deleted", "Expired") or not record.instance.uuid:
        return None
    created = parse_time(record.instance.created_at) or parse_time(record.created_at)
    if created is None or now < created + desired.ttl_s:
        return None
    ttl = format_duration(int(desired.ttl_s))
    when = format_time(created + desired.ttl_s)
    delete = actions.DeleteInstance(
        desired.name,
        record.instance.name,
        record.instance.metro or desired.metro,
        f"ttl of {ttl} expired at {when}; its instance is already gone (reclaimed by the "
        "platform's autokill, or deleted)",
        forget=True,
        final_phase="Expired",
        instance_uuid=record.instance.uuid,
    )
    renew = (
        f"its ttl of {ttl} passed at {when} and its instance is gone; apply records it "
        "expired (raise `ttl` in the spec to bring it back)"
    )
    return actions.SessionPlan(desired.name, (delete,), (), expired=renew)


def _refusal(session: str, inst: Instance, proof: identity.Proof) -> actions.Refusal:
    return actions.Refusal(session, inst.name, inst.metro, proof.refusal(inst))


def _create_reason(desired: DesiredSession, record: SessionStatus | None) -> str:
    """Why the session's instance is made (none, or it went away without ukc)."""
    if record is None or record.instance is None or record.phase == "Deleted":
        return "no instance"
    if desired.autokill_ms:
        # why both: the platform deletes what autokill reclaims without a trace ukc can
        # read; either way the session is made anew
        after = actions.autokill_text(desired.autokill_ms)
        return (
            "instance gone: deleted out of band, or reclaimed by the platform "
            f"(autokill: deleted once down for {after})"
        )
    return "instance deleted out of band"


def recorded_without_instance(record: SessionStatus | None) -> bool:
    """Whether the status file says the session has no instance (none made yet, deleted)."""
    return (
        record is None
        or record.instance is None
        or record.instance.state == "deleted"
        or record.phase in ("Deleted", "Expired")
    )


def _plan_unscanned(
    desired: DesiredSession,
    inst: Instance | None,
    record: SessionStatus | None,
    now: float,
    listed: bool = True,
) -> actions.SessionPlan:
    """A session seen before its tree was scanned (the apply's first look, taken while the
    trees are scanned): only a missing instance is made and waited for, so its boot overlaps
    the scan; everything else waits for the observation with the tree. Nothing is made for a
    session that would not get one then (expired, a tree that may not sync, a command that
    cannot run).

    Not `listed` (the look does not wait for the list): missing by the records' word, and the
    create says so (`CreateInstance.unlisted`): a name found taken is left to the next
    round's list."""
    name = desired.name
    later = ("waits for its tree's scan",)
    if not listed and not recorded_without_instance(record):
        return actions.SessionPlan(name, (), later)
    if inst is not None or _expired_while_gone(desired, inst, record, now) is not None:
        return actions.SessionPlan(name, (), later)
    if record is not None and record.phase == "Expired" and record.spec_hash == desired.spec_hash:
        return actions.SessionPlan(name, (), later)
    if desired.tree.halted is not None:
        return actions.SessionPlan(name, (), later, error=f"not syncing: {desired.tree.halted}")
    if desired.secrets_missing and desired.commands:
        return actions.SessionPlan(name, (), later)  # a new instance runs them all: refused
    create = actions.CreateInstance(
        name,
        desired.instance_name,
        desired.metro,
        _create_reason(desired, record),
        unlisted=not listed,
    )
    # a new instance is always pushed to (`_plan_session`)
    wait = actions.WaitReady(name, desired.instance_name, desired.transport, push_follows=True)
    return actions.SessionPlan(name, (create, wait))


def _plan_session(
    desired: DesiredSession,
    inst: Instance | None,
    record: SessionStatus | None,
    now: float,
    owner: identity.Owner,
    listed: bool = True,
) -> actions.SessionPlan:
    name = desired.name
    acts: list[actions.Action] = []
    noops: list[str] = []
    if not desired.tree.scanned or not listed:
        return _plan_unscanned(desired, inst, record, now, listed)

    if inst is not None:
        proof = identity.prove(inst, owner, name, record.instance if record else None)
        if not proof.ours:
            refusal = _refusal(name, inst, proof)
            return actions.SessionPlan(name, (), (refusal.reason,), refusal)

    # An expired session stays deleted until its spec changes (TTL is a promise about money).
    if (
        inst is None
        and record is not None
        and record.phase == "Expired"
        and record.spec_hash == desired.spec_hash
    ):
        why = f"session {name!r} expired (ttl); change the spec or run `ukc delete`"
        renew = "deleted when its ttl passed; change the spec (e.g. raise `ttl`) to bring it back"
        return actions.SessionPlan(name, (), (why,), expired=renew)

    gone = _expired_while_gone(desired, inst, record, now)
    if gone is not None:
        return gone

    new_instance = False
    expires = _expires_at(desired, inst, record) if inst is not None else None
    if inst is not None and expires is not None and now >= expires:
        ttl = format_duration(int(desired.ttl_s or 0))
        acts.append(
            actions.DeleteInstance(
                name,
                inst.name,
                inst.metro or desired.metro,
                f"ttl of {ttl} expired at {format_time(expires)}",
                forget=True,
                final_phase="Expired",
                instance_uuid=inst.uuid,
            )
        )
        renew = (
            f"its ttl of {ttl} passed at {format_time(expires)}; apply deletes it (raise `ttl` "
            "in the spec to keep it)"
        )
        return actions.SessionPlan(name, tuple(acts), (), expired=renew)

    if desired.tree.halted is not None:
        # Commands must never run against a tree we could not sync; the session fails instead
        # (after the ttl: an expired session is deleted whatever its tree)
        why = f"not syncing: {desired.tree.halted}"
        return actions.SessionPlan(name, (), (why,), error=why)

    if inst is not None and not desired.credentials_present:
        # Our credentials are gone (e.g. `.ukc/` was deleted): the instance only accepts the
        # ones it was made with, so the only way back to a reachable sandbox is a new one.
        lost = desired.credentials_noun
        acts.append(
            actions.DeleteInstance(
                name,
                inst.name,
                inst.metro or desired.metro,
                f"its {lost} is lost; replacing",
                forget=False,
                instance_uuid=inst.uuid,
            )
        )
        inst = None
        new_instance = True
        reason_create = f"replacing: the session's {lost} was lost"
    elif inst is not None and (replace_why := _baked_change(desired, inst)) is not None:
        # Image, memory or transport (the public ports) changed: those are fixed at creation.
        if desired.back and inst.state in _UP_STATES and _has_run(record, inst):
            acts.append(
                actions.WaitReady(name, inst.name, desired.transport, wake=inst.state == "standby")
            )
            acts.append(
                actions.SyncBack(
                    name,
                    desired.back,
                    "outputs come home before the replacement",
                    mirror_deletes=desired.back_delete,
                )
            )
        acts.append(
            actions.DeleteInstance(
                name,
                inst.name,
                inst.metro or desired.metro,
                replace_why,
                forget=False,
                instance_uuid=inst.uuid,
            )
        )
        inst = None
        new_instance = True
        reason_create = f"replacing: {replace_why}"
    else:
        reason_create = _create_reason(desired, record)

    if inst is None:
        acts.append(
            actions.CreateInstance(name, desired.instance_name, desired.metro, reason_create)
        )
        new_instance = True
    elif inst.state in _DOWN_STATES:
        acts.append(actions.StartInstance(name, inst.name, f"instance is {inst.state}"))
    elif inst.state in _UP_STATES:
        noops.append(f"instance {inst.name} is {inst.state}")
    else:
        # Unknown or transitional state we cannot act on (template, checkpoint, deleted, ...).
        noops.append(f"instance {inst.name} is in state {inst.state!r}; waiting for it")
    if inst is not None and not new_instance:
        wanted = desired.autokill_ms or 0
        if inst.autokill_ms is not None and inst.autokill_ms != wanted:
            # why only when the read says: a platform that does not echo autokill would have
            # it set again on every apply
            acts.append(
                actions.SetAutokill(
                    name,
                    inst.name,
                    inst.uuid,
                    wanted,
                    f"it is {actions.autokill_text(inst.autokill_ms)}, the spec says "
                    f"{actions.autokill_text(wanted)}",
                )
            )

    # --- sync up -------------------------------------------------------------------------
    tree = desired.tree
    sync = record.sync if record is not None else None
    uuid = inst.uuid if inst is not None else ""
    same_boot = (
        not new_instance
        and inst is not None
        and sync is not None
        and sync.instance_uuid == inst.uuid
        and sync.start_count == inst.start_count
        and inst.state not in _DOWN_STATES
    )
    need_shell = False
    sync_action: actions.SyncUp | None = None
    if not same_boot:
        why = "new instance"
        if not new_instance and sync is not None and sync.instance_uuid == uuid:
            why = "instance restarted since the last sync"
        sync_action = actions.SyncUp(
            name, tree.files, tree.bytes, 0, True, why, tree.uploads[:5] if tree.uploads else ()
        )
    elif sync is not None and sync.digest != tree.digest:
        sync_action = actions.SyncUp(
            name,
            len(tree.uploads),
            tree.upload_bytes,
            len(tree.deletes),
            False,
            "local files changed",
            tree.uploads[:5],
            tree.deletes[:5],
        )
    else:
        noops.append(f"files in sync ({tree.files} file(s))")
    # which way sync reaches in: a fact recorded at an earlier contact with this instance
    found = tree.tools[1] if tree.tools and uuid and tree.tools[0] == uuid else None
    sync_path = describe(None if new_instance else found)

    # --- commands ------------------------------------------------------------------------
    runs: list[actions.RunCommand] = []
    rerun_rest = False
    previous = {c.name: c for c in record.commands} if record is not None else {}
    # without a secret's value only the rest of a command's inputs can be compared
    blind = bool(desired.secrets_missing)
    for index, cmd in enumerate(desired.commands):
        input_hash = command_input_hash(desired, cmd)
        public_hash = command_public_hash(desired, cmd)
        last = previous.get(cmd.name)
        reason = ""
        if new_instance:
            reason = "new instance"
        elif rerun_rest:
            reason = "an earlier command re-ran"
        elif last is None:
            reason = "never ran"
        elif (failed := _last_run_failed(last)) is not None:
            reason = failed
        elif last.instance_uuid != uuid:
            reason = "never ran on this instance"
        elif desired.volume_mb is None and (cold := _cold_boot(last, inst)) is not None:
            # why only without a volume: a volume at /workspace keeps the outputs across
            # a cold boot (the instance was made with it: the volume is in its hash)
            reason = cold
        elif blind and last.last_success_public_hash != public_hash:
            reason = _changed(last, cmd) if last.last_success_public_hash else "may have changed"
        elif not blind and last.last_success_hash != input_hash:
            reason = _changed(last, cmd)
            if last.last_success_hash == "" and last.exit_code is None:
                reason = "never succeeded"
        if reason:
            # why every later command too: a command may read what an earlier one wrote in
            # /workspace, and those outputs are no one's declared inputs; skipping a later
            # command after an earlier one changed its outputs would keep a stale result
            rerun_rest = True
            runs.append(
                actions.RunCommand(
                    name,
                    index,
                    cmd.name,
                    cmd.run,
                    cmd.timeout_s,
                    input_hash,
                    reason,
                    public_hash,
                    shell=cmd.shell,
                    inputs_digest=_ran_with(desired, cmd),
                )
            )
        else:
            noops.append(f"command {cmd.name!r} unchanged since its last success")
    if runs and blind:
        # apply would fail at the first command: say so now, at the spec's line
        first = runs[0]
        why = (
            f"{'; '.join(desired.secrets_missing)}; command {first.name!r} must run "
            f"({first.reason}) and needs it"
        )
        return actions.SessionPlan(name, (), tuple(noops), error=why, sync_path=sync_path)

    # A sync-back interrupted after its commands succeeded (kill, lost connection) is owed:
    # the commands are skipped next time, so nothing else would bring their outputs home.
    back_owed = (
        bool(desired.back)
        and not new_instance
        and sync is not None
        and sync.back_pending
        and sync.instance_uuid == uuid
    )
    if sync_action is not None:
        need_shell = True
    if runs or back_owed:
        need_shell = True
    if need_shell:
        asleep = not new_instance and inst is not None and inst.state == "standby"
        acts.append(actions.WaitReady(name, desired.instance_name, desired.transport, wake=asleep))
    if sync_action is not None:
        acts.append(sync_action)
    if runs and desired.back:
        # the sync-back's helper starts while the last command runs
        runs[-1] = dataclasses.replace(runs[-1], pull_follows=True)
    acts.extend(runs)
    if (runs or back_owed) and desired.back:
        files, size = desired.back_known
        why = "commands ran" if runs else "the last sync-back did not finish"
        acts.append(
            actions.SyncBack(
                name,
                desired.back,
                why,
                files,
                size,
                mirror_deletes=desired.back_delete,
                always=bool(runs),
            )
        )
    return actions.SessionPlan(name, tuple(acts), tuple(noops), sync_path=sync_path)


def _baked_change(desired: DesiredSession, inst: Instance) -> str | None:
    """Why the instance must be replaced to match what is fixed at creation, or None."""
    if identity.tag_value(inst.tags, "ukc.spec") != desired.instance_hash:
        return "image or memory changed"
    made_for = identity.tag_value(inst.tags, identity.TRANSPORT_TAG)
    if made_for is not None and made_for != desired.transport:
        # why: the public ports follow the transport and are fixed too
        return f"exec changed from {made_for} to {desired.transport} (its public ports)"
    return None


#: memory kept free beside the tree in a /workspace held in memory: the kernel, the sync
#: helper, the shell and what the commands themselves use or write
MEMORY_MARGIN_MB = 256
#: ... and a quarter of the tree more, for what the commands write next to it (builds)
MEMORY_MARGIN_SHARE = 0.25


def memory_warning(desired: DesiredSession) -> str | None:
    """Why the synced tree will not fit a `/workspace` held in the instance's memory, or None
    (it fits, or the session has a volume)."""
    if desired.volume_mb is not None or desired.tree.halted is not None:
        return None
    need = desired.tree.bytes * (1 + MEMORY_MARGIN_SHARE) + MEMORY_MARGIN_MB * (1 << 20)
    if need <= desired.memory_mb * (1 << 20):
        return None
    return (
        f"session {desired.name}: its synced tree ({human_size(desired.tree.bytes)}) plus a "
        f"margin for the commands needs about {human_size(int(need))}, more than memory_mb "
        f"{desired.memory_mb}; without a volume /workspace lives in the instance's memory "
        "(the sync or a command may run out of it): raise memory_mb, or give /workspace a "
        "volume (`workspace: {volume: 8GiB}`)"
    )


def _warnings(desired: DesiredSession, inst: Instance | None) -> list[str]:
    memory = memory_warning(desired)
    return _other_warnings(desired, inst) + ([memory] if memory else [])


def _other_warnings(desired: DesiredSession, inst: Instance | None) -> list[str]:
    name = desired.name
    if desired.warnings:
        return list(desired.warnings)
    if inst is not None and identity.tag_value(inst.tags, identity.TRANSPORT_TAG) is None:
        # An older ukc gave every instance port 443; replacing it silently would cost the
        # session its /workspace and a re-run of every command, so the user decides.
        return [
            f"session {name}: instance {inst.name} was created by an older ukc and still "
            "publishes port 443, the image's unauthenticated exec API; `ukc delete` then "
            f"`ukc apply` recreates it with only the ports exec: {desired.transport} needs"
        ]
    return []


def _last_run_failed(last: CommandRecord) -> str | None:
    """Why the command's last run did not succeed, or None."""
    if last.interrupted:
        return "last run was interrupted"
    if last.timed_out:
        return "last run timed out"
    if last.exit_code not in (0, None):
        return "last run failed"
    return None


def _ran_with(desired: DesiredSession, cmd: CommandIntent) -> str:
    """The digest of the files a command runs with (the whole tree without `inputs`)."""
    return desired.tree.digest if cmd.inputs is None else cmd.inputs_digest


def _changed(last: CommandRecord, cmd: CommandIntent) -> str:
    if last.run != cmd.run:
        return "command changed"
    if last.shell != cmd.shell:
        return f"shell changed from {last.shell} to {cmd.shell}"
    if cmd.inputs is None:
        return "inputs changed (files, env or image)"
    if cmd.inputs_changed:
        shown = ", ".join(cmd.inputs_changed[:5])
        more = len(cmd.inputs_changed) - 5
        return f"inputs changed: {shown}" + (f" and {more} more" if more > 0 else "")
    if last.inputs_digest and last.inputs_digest != cmd.inputs_digest:
        return "inputs changed"
    return "env, image or inputs patterns changed"


def _cold_boot(last: CommandRecord, inst: Instance | None) -> str | None:
    """Why the command's outputs in /workspace are gone although it ran on this instance:
    /workspace lives in the instance's memory, and a cold boot starts from the image."""
    if inst is None:
        return None
    if inst.state in _DOWN_STATES:
        return f"instance is {inst.state}: its boot starts with an empty /workspace"
    if (
        last.start_count is not None
        and inst.start_count is not None
        and last.start_count != inst.start_count
    ):
        return "instance booted again since this ran: /workspace starts empty"
    return None


def _has_run(record: SessionStatus | None, inst: Instance) -> bool:
    return record is not None and any(
        c.instance_uuid == inst.uuid and not c.skipped for c in record.commands
    )


def _declared_elsewhere(record: SessionStatus | None, only_files: frozenset[str] | None) -> bool:
    if only_files is None or record is None or not record.spec_file:
        return False
    return record.spec_file.rpartition("/")[2] not in only_files


def plan_sessions(
    desired: Sequence[DesiredSession],
    observed: Mapping[str, Instance],
    status: StatusDoc,
    now: float,
    *,
    owner: identity.Owner,
    prune: bool = False,
    claimed: Mapping[str, Instance] | None = None,
    only_files: frozenset[str] | None = None,
    listed: bool = True,
) -> actions.Plan:
    """Plan every desired session; with `prune`, also delete our instances no spec declares.

    `observed` maps instance name → instance for every instance carrying the project's tags.
    `claimed` maps session name → instance for those (the session their tags name). A prune
    needs the session in the status inventory under that instance name (or, with the
    project's secret, the instance tagged with this spec directory's group) *and* a proof of
    ownership; an inventoried one without proof is refused, not deleted. With `only_files`
    (the names of the spec files given, not their whole directory), a session another spec
    file declared when it was last applied is not reported as an orphan.

    Not `listed`: `observed` is not known yet (the apply's first look, planned from the
    records' word while the list is in flight): only missing instances are made
    (`_plan_unscanned`), nothing else is planned.
    """
    sessions = tuple(
        _plan_session(
            d, observed.get(d.instance_name), status.sessions.get(d.name), now, owner, listed
        )
        for d in desired
    )
    prunes: list[actions.DeleteInstance] = []
    refused: list[actions.Refusal] = []
    orphans: list[tuple[str, str]] = []
    if claimed is not None:
        wanted = {d.name for d in desired}
        inventory = status.inventory()
        for session_name, inst in sorted(claimed.items()):
            if session_name in wanted:
                continue
            record = inventory.get(session_name)
            listed = record is not None and record.name == inst.name
            # With the project's secret, the group tag of this spec directory stands in for
            # the inventory a fresh runner lacks; the proof below still decides.
            grouped = owner.group is not None and (
                identity.tag_value(inst.tags, identity.GROUP_TAG) == owner.group
            )
            if not (listed or grouped):
                continue  # not in our inventory: another checkout's session, not ours to judge
            if not prune:
                if not _declared_elsewhere(status.sessions.get(session_name), only_files):
                    orphans.append((session_name, inst.name))
                continue
            proof = identity.prove(inst, owner, session_name, record if listed else None)
            if not proof.ours:
                refused.append(_refusal(session_name, inst, proof))
                continue
            prunes.append(
                actions.DeleteInstance(
                    session_name,
                    inst.name,
                    inst.metro,
                    "no spec declares this session (prune)",
                    instance_uuid=inst.uuid,
                )
            )
    warnings: list[str] = []
    for d, splan in zip(desired, sessions, strict=True):
        replaced = any(isinstance(a, actions.DeleteInstance) for a in splan.actions)
        warnings += _warnings(d, None if replaced else observed.get(d.instance_name))
    return actions.Plan(
        sessions,
        tuple(prunes),
        tuple(warnings),
        prune_refusals=tuple(refused),
        orphans=tuple(orphans),
        suspends=_suspends(desired, sessions, observed),
    )


#: the states a suspend request puts to standby
_SUSPENDABLE = frozenset({"running", "starting"})


def _suspends(
    desired: Sequence[DesiredSession],
    sessions: Sequence[actions.SessionPlan],
    observed: Mapping[str, Instance],
) -> tuple[actions.SuspendInstance, ...]:
    """The instances left running once the plan is done, of sessions that ask for `suspend`:
    those the plan works on (it boots or wakes them) and those up now."""
    out = []
    for d, splan in zip(desired, sessions, strict=True):
        if not d.suspend or splan.error or splan.refusal is not None or splan.expired:
            continue
        inst = observed.get(d.instance_name)
        if splan.changes or (inst is not None and inst.state in _SUSPENDABLE):
            out.append(actions.SuspendInstance(d.name, d.instance_name, d.metro))
    return tuple(out)


def plan_delete(
    names: Sequence[tuple[str, str, str]],
    observed: Mapping[str, Instance],
    status: StatusDoc,
    owner: identity.Owner,
    volumes: Mapping[str, Sequence[Volume]] | None = None,
) -> actions.Plan:
    """Delete the sessions given as (session, instance name, metro) triples that still exist
    and are provably ours; the others are refused. `volumes`: the volumes claiming each
    session; those provably ours go with its instance, the others are left alone."""
    sessions = []
    for session, inst_name, metro in names:
        inst = observed.get(inst_name)
        if inst is None:
            sessions.append(actions.SessionPlan(session, (), (f"instance {inst_name} is gone",)))
            continue
        record = status.sessions.get(session)
        proof = identity.prove(inst, owner, session, record.instance if record else None)
        if not proof.ours:
            refusal = _refusal(session, inst, proof)
            sessions.append(actions.SessionPlan(session, (), (refusal.reason,), refusal))
            continue
        claimed = (volumes or {}).get(session, ())
        mine = tuple(
            (v.uuid, v.name) for v in claimed if identity.volume_is_ours(v, owner, session)
        )
        notes = tuple(
            f"volume {v.name} claims session {session} but is not provably ours: left alone"
            for v in claimed
            if (v.uuid, v.name) not in mine
        )
        delete = actions.DeleteInstance(
            session,
            inst_name,
            inst.metro or metro,
            "ukc delete",
            instance_uuid=inst.uuid,
            volumes=mine,
        )
        sessions.append(actions.SessionPlan(session, (delete,), notes))
    return actions.Plan(tuple(sessions))
