"""The executor: performs a session's planned actions, in order, and journals each one.

It decides nothing: the plan says what and in which order; the executor talks to the cloud
(`CloudApi`), to the sandbox (the session's `Transport`, set up by the kind
`transport.select` maps its `exec` to) and to the sync engine, records results in the status
document after every step (so a kill at any point leaves an honest journal), and stops a
session at its first failure. One connection per session is opened at `WaitReady` and reused
by sync, commands and sync-back.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from reconciler import errors
from reconciler._util.retry import RetryPolicy, poll
from reconciler._util.threads import background
from reconciler.cloud import stops
from reconciler.cloud.metros import MetroConnection, MetroRegistry
from reconciler.cloud.model import CreateRequest, Instance, VolumeMount
from reconciler.reconcile import actions, bootmark, identity, rebuild, sessionkeys
from reconciler.reconcile.desired import (
    Group,
    SessionContext,
    credentials_for,
    instance_credentials,
    target_for,
)
from reconciler.reconcile.events import Event, Reporter
from reconciler.reconcile.interrupts import StopFlag
from reconciler.reconcile.observe import Observation
from reconciler.reconcile.redaction import OutputTail, Redactor
from reconciler.spec.sizes import human_size
from reconciler.status import journal, sandboxjournal
from reconciler.status.schema import (
    BackFrom,
    CommandRecord,
    InstanceRecord,
    Interruption,
    SessionStatus,
    StatusDoc,
    SyncRecord,
)
from reconciler.sync import engine as sync_engine
from reconciler.transport import links, select
from reconciler.transport.base import (
    Credentials,
    RemoteShell,
    Transport,
    TransportKind,
)
from reconciler.transport.pool import TransportPool

__all__ = ["Executor", "SessionOutcome", "Worked"]

#: how long a delete waits for the session's volume to come free of the instance being deleted
VOLUME_DETACH_WAIT_S = 30.0
#: the platform's item code for a volume still attached ("cannot be used")
CODE_CANNOT_BE_USED = 24

#: the original workflow's scale-to-zero: idle sessions cost nothing, memory kept (stateful)
SESSION_SCALE_TO_ZERO = {"policy": "on", "stateful": True, "cooldown_time_ms": 5000}


@dataclass
class SessionOutcome:
    session: str
    ok: bool
    error: str = ""
    ran_commands: int = 0
    changed: bool = False
    #: stopped by Ctrl-C (recorded as phase `Interrupted`, not `Failed`)
    interrupted: bool = False
    #: an unlisted create found its name taken: nothing was done, the next round plans it
    deferred: bool = False
    #: the session's instance as the platform last answered for it in this run (a create's,
    #: start's or wake's wait until it was up); None when it was not read
    instance: Instance | None = None


@dataclass
class Worked:
    """What one session's executors did in one apply (its passes run by one executor each:
    instances made ahead, then the rounds): what its record's timings and interruption
    report."""

    #: seconds per phase (`_phase_of`)
    timings: dict[str, float] = field(default_factory=dict)
    #: the actions finished, in order
    done: list[actions.Action] = field(default_factory=list)


@dataclass
class _Run:
    """Mutable per-session state during one execution."""

    inst: Instance | None
    #: the session's transport, chosen once from its `exec` (None for a session without spec)
    kind: TransportKind | None = None
    transport: Transport | None = None
    #: what opens the instance (a create derives new ones from a new key nonce)
    credentials: Credentials | None = None
    #: the connection was kept from an earlier pass: it may have died while idle
    pooled: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    #: the last command run in this execution (what a sync-back's files come from)
    last_command: CommandRecord | None = None
    #: the sandbox's journal was removed before this execution's first change in it
    journal_cleared: bool = False
    #: what an action did is journaled in the document but not yet on disk: written before
    #: the session's next action, or by the save that closes its run
    unsaved: bool = False
    #: the sync-back's helper, being started while the last command ran: parked once done
    pull_ahead: Future[None] | None = None


class Executor:
    def __init__(
        self,
        *,
        group: Group,
        doc: StatusDoc,
        observation: Observation,
        metros: MetroRegistry,
        reporter: Reporter,
        doc_lock: threading.Lock,
        ready_timeout_s: float = 60.0,
        boot_timeout_s: float = 60.0,
        name_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        ran: set[tuple[str, str]] | None = None,
        pool: TransportPool | None = None,
        stop: StopFlag | None = None,
        committer: journal.Committer | None = None,
        slots: threading.Semaphore | None = None,
        worked: dict[str, Worked] | None = None,
        ahead: sync_engine.DigestsAhead | None = None,
    ) -> None:
        self.group = group
        self.doc = doc
        self.obs = observation
        self.metros = metros
        self.reporter = reporter
        self.doc_lock = doc_lock
        #: the status file's writes (shared by every worker: saves in flight together are
        #: written once)
        self.committer = committer or journal.Committer(group.status_path, doc, doc_lock)
        #: the `--concurrency` sessions worked on at once: a session holds one while it runs,
        #: and gives it up while it only waits on the platform (its instance booting, its
        #: sshd not answering yet), so that wait does not keep the next session from starting
        self.slots = slots
        self.ready_timeout_s = ready_timeout_s
        self.boot_timeout_s = boot_timeout_s
        #: how long a create waits for a name an instance being deleted still holds
        self.name_timeout_s = name_timeout_s
        self.clock = clock
        self.sleep = sleep
        #: uuids deleted in this apply: an instance still answering under such a uuid is on
        #: its way out, never one to adopt
        self.deleted: set[str] = set()
        #: (session, command) pairs that ran in this apply; the rest are reported as skipped
        self.ran = ran if ran is not None else set()
        #: connections kept across rounds and passes (one per session)
        self.pool = pool
        #: set on Ctrl-C: no new action starts; a command in flight is stopped, any other
        #: action finishes and is journaled
        self.stop = stop
        #: the action each session is performing now (what Ctrl-C interrupts)
        self.in_flight: dict[str, actions.Action] = {}
        #: what each session's executors did in this apply (shared with the others)
        self.worked = worked if worked is not None else {}
        #: big files' block digests made while this apply's sandboxes booted, for its pushes
        self.ahead = ahead

    # -- journal ---------------------------------------------------------------------------

    def _record(self, session: str) -> SessionStatus:
        with self.doc_lock:
            return self.doc.sessions.setdefault(session, SessionStatus())

    def save(self) -> None:
        """Make this session's journaled changes durable (not under `doc_lock`)."""
        self.committer.save()

    def _say(self, session: str, kind: str, text: str, stream: str = "") -> None:
        self.reporter.event(Event(session, kind, text, stream))

    # -- sessions --------------------------------------------------------------------------

    def run_session(self, splan: actions.SessionPlan) -> SessionOutcome:
        if self.slots is None:
            return self._run_session(splan)
        with self.slots:
            return self._run_session(splan)

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """The session's slot given up while it waits on the platform (and taken again)."""
        if self.slots is None:
            yield
            return
        self.slots.release()
        try:
            yield
        finally:
            self.slots.acquire()

    def _run_session(self, splan: actions.SessionPlan) -> SessionOutcome:
        name = splan.session
        ctx = self.obs.contexts.get(name)
        # the planner acts only on an instance it proved ours (else the session is refused)
        worked = self.worked.setdefault(name, Worked())
        observed = self.obs.claimed.get(name)
        run = _Run(inst=observed, timings=worked.timings)
        if ctx is not None:
            run.kind = select.kind_for(ctx.desired.transport)
            run.credentials = ctx.credentials
        outcome = SessionOutcome(name, ok=True, changed=bool(splan.changes))
        redact = Redactor(ctx.secret_values if ctx is not None else ())
        done = worked.done
        # a command that failed: the actions after it are skipped except a sync-back marked
        # `always`, then the failure is raised
        failure: errors.CommandFailedError | None = None
        try:
            for index, action in enumerate(splan.actions):
                if self.stop is not None and self.stop.is_set():
                    self._interrupted(name, outcome, None, done, splan.actions[index:])
                    break
                if failure is not None and not (
                    isinstance(action, actions.SyncBack) and action.always
                ):
                    continue
                if run.unsaved:
                    # what the last action did is on disk before the next one acts
                    self.save()
                    run.unsaved = False
                if not _waited_before(action, done):
                    self._say(name, "action", action.describe())
                started = self.clock()
                with self.doc_lock:
                    self.in_flight[name] = action
                try:
                    self._dispatch(action, ctx, run, redact, outcome)
                except _NameTakenError:
                    outcome.deferred = True
                    outcome.changed = False
                    break
                except errors.StoppedByUserError:
                    self._interrupted(name, outcome, action, done, splan.actions[index + 1 :])
                    break
                except errors.CommandFailedError as err:
                    if failure is not None:
                        raise
                    failure = err
                except errors.UkcError as err:
                    if failure is None:
                        raise
                    # the command's failure stays the session's error; the sync-back's joins it
                    raise errors.CommandFailedError(
                        f"{failure}; bringing its outputs back failed too: {err}",
                        exit_code=failure.command_exit_code,
                    ) from err
                finally:
                    with self.doc_lock:
                        self.in_flight.pop(name, None)
                    phase = _phase_of(action)
                    run.timings[phase] = run.timings.get(phase, 0.0) + self.clock() - started
                done.append(action)
            if failure is not None and not outcome.interrupted:
                raise failure
        except errors.UkcError as err:
            outcome.ok = False
            outcome.error = redact(str(err))
            self._fail(name, outcome.error, err)
        finally:
            if run.inst is not observed:
                outcome.instance = run.inst
            with self.doc_lock:
                rec = self.doc.sessions.get(name)
                if rec is not None and run.timings:
                    rec.timings = {k: round(v, 3) for k, v in run.timings.items()}
            if splan.changes and not outcome.interrupted:
                self._leave_journal(name, run)
            if run.transport is not None:
                if self.pool is not None and run.inst is not None and outcome.ok:
                    self.pool.keep(name, run.inst.uuid, run.transport, self._link(name, run, ctx))
                else:
                    with contextlib.suppress(Exception):
                        run.transport.close()
                    if self.pool is not None:
                        self.pool.drop(name)
            self.save()
        return outcome

    def _interrupted(
        self,
        name: str,
        outcome: SessionOutcome,
        during: actions.Action | None,
        done: list[actions.Action],
        not_done: tuple[actions.Action, ...],
    ) -> None:
        """Journal what Ctrl-C stopped: the action in flight, what finished, what did not."""
        what = during.describe() if during is not None else "between two actions"
        outcome.ok = False
        outcome.interrupted = True
        outcome.error = f"interrupted during {what}" if during is not None else "interrupted"
        rec = self._record(name)
        now = journal.utc_now()
        with self.doc_lock:
            rec.phase = "Interrupted"
            rec.message = outcome.error
            rec.interruption = Interruption(
                at=now,
                during=during.describe() if during is not None else "",
                finished=[a.describe() for a in done if not isinstance(a, actions.WaitReady)],
                not_done=[a.describe() for a in not_done if not isinstance(a, actions.WaitReady)],
            )
            journal.set_condition(rec, "Ready", "False", "Interrupted", outcome.error, now)
        self._say(name, "failed", outcome.error)

    def _fail(self, name: str, message: str, err: errors.UkcError) -> None:
        rec = self._record(name)
        now = journal.utc_now()
        with self.doc_lock:
            rec.phase = "Failed"
            rec.message = message
            reason = type(err).__name__.removesuffix("Error") or "Error"
            journal.set_condition(rec, "Ready", "False", reason, message, now)
        self._say(name, "failed", message)

    def _dispatch(
        self,
        action: actions.Action,
        ctx: SessionContext | None,
        run: _Run,
        redact: Redactor,
        outcome: SessionOutcome,
    ) -> None:
        if isinstance(action, actions.DeleteInstance):
            self._delete(action, ctx, run)
            return
        if ctx is None:
            raise errors.UsageError(f"session {action.session!r} has no spec in this run")
        conn = self.metros.get(ctx.desired.metro)
        if isinstance(action, actions.CreateInstance):
            self._create(action, ctx, conn, run)
        elif isinstance(action, actions.StartInstance):
            before = run.inst
            conn.api.start_instance(action.instance_name)
            run.inst = self._await_up(conn, action.instance_name, action.session, before=before)
            self._note_instance(action.session, run.inst)
        elif isinstance(action, actions.SetAutokill):
            self._set_autokill(action, conn)
        elif isinstance(action, actions.WaitReady):
            if action.wake and run.transport is None:
                self._wake(action, conn, run)
            self._wait_ready(ctx, conn, run, push_follows=action.push_follows)
        elif isinstance(action, actions.SyncUp):
            self._clear_journal(run)
            self._sync_up(ctx, run)
        elif isinstance(action, actions.RunCommand):
            outcome.ran_commands += 1
            self._clear_journal(run)
            self._run_command(action, ctx, run, redact)
        elif isinstance(action, actions.SyncBack):
            self._sync_back(ctx, run, redact)

    def _set_autokill(self, action: actions.SetAutokill, conn: MetroConnection) -> None:
        try:
            conn.api.set_autokill(
                action.instance_name, uuid=action.instance_uuid, time_ms=action.time_ms
            )
        except errors.ApiError as err:
            # why not a failure: the platform may take updates of stopped instances only;
            # the session's work does not depend on it, and the next apply tries again
            self._say(action.session, "info", f"warning: autokill not changed: {err}")

    def _link(self, session: str, run: _Run, ctx: SessionContext | None) -> links.LinkKey | None:
        """What makes `run`'s connection the same one for a later command (`links`); None
        outside a command forked by the warm process."""
        creds = run.credentials or (ctx.credentials if ctx is not None else None)
        if links.lender() is None or creds is None or run.inst is None or run.transport is None:
            return None
        return links.key_for(
            session=session,
            status_path=self.group.status_path,
            uuid=run.inst.uuid,
            start_count=run.inst.start_count,
            pin=run.transport.pin,
            key_path=creds.path,
            fqdn=run.inst.fqdn,
            kind=run.transport.kind,
        )

    def _wake(self, action: actions.WaitReady, conn: MetroConnection, run: _Run) -> None:
        """A start request for an instance in standby (a suspended one may not wake on
        traffic), then until it runs."""
        before = run.inst
        if self.pool is not None:
            # a connection kept from before the suspend is to a sandbox that slept since
            self.pool.drop(action.session)
        links.drop_session(self.group.status_path, action.session)
        conn.api.start_instance(action.instance_name)
        run.inst = self._await_up(
            conn, action.instance_name, action.session, before=before, running=True
        )

    # -- the sandbox's journal (with UKC_SESSION_SECRET: see `reconcile.rebuild`) -----------

    def _clear_journal(self, run: _Run) -> None:
        if self.obs.owner.key_root is None or run.journal_cleared or run.transport is None:
            return
        rebuild.clear_journal(run.transport)
        run.journal_cleared = True

    def _leave_journal(self, name: str, run: _Run) -> None:
        key_root = self.obs.owner.key_root
        if key_root is None or run.transport is None or run.inst is None:
            return
        with self.doc_lock:
            rec = self.doc.sessions.get(name)
            if rec is None or rec.instance is None or rec.instance.uuid != run.inst.uuid:
                return
            rec.journal_seq += 1
            record = rec.model_copy(deep=True)
        binding = sandboxjournal.Binding(self.obs.owner.project, name, run.inst.uuid)
        try:
            rebuild.leave_journal(run.transport, key_root, binding, record)
        except (errors.UkcError, ValueError) as err:
            # why not a failure: without a journal the next runner redoes the work, no more
            self._say(name, "info", f"journal not left in the sandbox: {err}")

    # -- instance lifecycle ----------------------------------------------------------------

    def _create(
        self,
        action: actions.CreateInstance,
        ctx: SessionContext,
        conn: MetroConnection,
        run: _Run,
    ) -> None:
        session = action.session
        assert run.kind is not None
        owner = self.obs.owner
        # with the project's secret, a new instance gets a key of its own, derived from a new
        # nonce its tag carries: every runner with the secret derives it again
        nonce = sessionkeys.new_nonce() if owner.key_root is not None else None
        key_tags = (sessionkeys.key_tag(nonce),) if nonce is not None else ()
        creds = credentials_for(self.group, session, owner.key_root, nonce)
        had_key = creds.path.exists()
        fields = run.kind.create_fields(creds)
        with self.doc_lock:
            kept = self.doc.sessions.get(session)
            before = kept.model_copy(deep=True) if kept is not None else None
        rec = self._record(session)
        with self.doc_lock:
            # Journal the intent before the side effect: a lost answer is then adopted, not
            # duplicated (the name is deterministic).
            rec.phase = "Progressing"
            rec.metro = conn.label
            rec.spec_hash = ctx.desired.spec_hash
            rec.spec_file = str(ctx.loaded.file)
            rec.instance = InstanceRecord(
                name=action.instance_name, uuid="", metro=conn.label, state="creating"
            )
            rec.sync = SyncRecord()
            # why kept: an instance made anew says why in the status (e.g. the platform's
            # autokill reclaimed the last one)
            journal.set_condition(
                rec, "InstanceCreated", "True", "Created", action.reason, journal.utc_now()
            )
        self.save()
        request = CreateRequest(
            name=action.instance_name,
            image=ctx.desired.image,
            env=fields.env,
            tags=(
                *ctx.desired.tags,
                identity.transport_tag(ctx.desired.transport),
                *key_tags,
                *(() if ctx.desired.ttl_s is None else (identity.ttl_tag(ctx.desired.ttl_s),)),
            ),
            # why: UKC's own default (128 MiB) holds little: /workspace lives in memory
            memory_mb=ctx.desired.memory_mb,
            services=fields.services,
            plugins=fields.plugins,
            # the platform scales to zero only an instance with a service group
            scale_to_zero=SESSION_SCALE_TO_ZERO if fields.services else None,
            autostart=True,
            volumes=(
                ()
                if ctx.desired.volume_mb is None
                else (VolumeMount("/workspace", ctx.desired.volume_mb, tuple(ctx.desired.tags)),)
            ),
            # the platform reclaims the instance even when no ukc runs again
            autokill_ms=ctx.desired.autokill_ms,
        )
        try:
            self._create_when_free(conn, request, session, rec.instance, unlisted=action.unlisted)
        except _NameTakenError:
            # nothing was made: the record goes back to what it said (saved as the session
            # ends), and the next round's list says what the instance is
            with self.doc_lock:
                if before is None:
                    self.doc.sessions.pop(session, None)
                else:
                    self.doc.sessions[session] = before
            if not had_key:
                # a key made for an instance that was never made opens nothing: a checkout
                # that is refused the name keeps no key to try against it
                creds.forget()
            self._say(session, "info", f"instance {action.instance_name} exists: left to the list")
            raise
        run.inst = self._await_up(conn, action.instance_name, session, before=None)
        # an adopted instance (a lost create answer of an earlier run) carries its own nonce
        run.credentials = instance_credentials(self.group, session, owner, run.inst)
        self._note_instance(session, run.inst)

    def _create_when_free(
        self,
        conn: MetroConnection,
        request: CreateRequest,
        session: str,
        intent: InstanceRecord | None,
        *,
        unlisted: bool = False,
    ) -> None:
        """Create; while the name is still held by an instance on its way out (deletes are
        asynchronous: a replaced or retained one), wait for it and try again. `unlisted`: a
        name held by any other instance raises `_NameTakenError` (never adopted, never refused
        here: the create was planned before the list answered, and the list judges it)."""
        name = request.name
        held_by = [""]

        def attempt(remaining: float) -> bool | None:
            try:
                conn.api.create_instance(request)
                return True
            except errors.AlreadyExistsError:
                found = conn.api.get_instance(name)
                if found is None or found.uuid in self.deleted or found.uuid in self.obs.dying:
                    # The name is held by an instance being deleted (or retained as
                    # `deleted`), by this run or an earlier one (`ukc delete` does not wait
                    # for the name): never adopt it; its name comes free shortly.
                    held_by[0] = found.uuid if found is not None else "a deleted instance"
                    if remaining <= 0:
                        raise errors.AlreadyExistsError(
                            f"instance {name} of session {session!r}: the name is still taken "
                            f"by {held_by[0]} after {self.name_timeout_s:.0f}s of waiting for "
                            "its delete to finish"
                        ) from None
                    return None
                if unlisted:
                    raise _NameTakenError(name) from None
                # A create whose answer was lost made it, or someone else holds the name:
                # adopt only what the ownership rule proves ours (the intent journaled
                # before has no uuid, so only the owner tag can prove it).
                proof = identity.prove(found, self.obs.owner, session, intent)
                if not proof.ours:
                    raise errors.OwnershipError(proof.refusal(found)) from None
                self._say(session, "info", f"adopted existing instance {found.name}")
                return True

        # why capped at 1 s: after a delete that did not wait, the name comes free within a
        # second or two; a longer wait is mostly time after it came free
        policy = RetryPolicy(
            max_attempts=None, base_s=0.1, cap_s=1.0, jitter=0.5, deadline_s=self.name_timeout_s
        )
        poll(attempt, policy=policy, monotonic=self.clock, sleep=self.sleep)

    def _await_up(
        self,
        conn: MetroConnection,
        name: str,
        session: str,
        *,
        before: Instance | None,
        running: bool = False,
    ) -> Instance:
        """Until the instance runs (or, unless `running`, sits in standby: traffic wakes it).

        A stop the platform reports for this boot (a missing image, out of memory, a crash)
        ends the wait at once with its decoded reason; `before` is the instance as it was
        before a start request (its old stop is not this boot's)."""
        last = ["unknown"]

        def up(inst: Instance) -> bool:
            return inst.state == "running" or (inst.state == "standby" and not running)

        def probe(remaining: float) -> Instance | None:
            inst = conn.api.get_instance(name)
            if inst is None:
                raise errors.NotFoundError(f"instance {name} vanished while starting")
            if up(inst):
                return inst
            last[0] = inst.state
            if inst.state == "stopped" and _stopped_since(inst, before):
                info = stops.decode(inst.stop_reason, inst.stop_code, inst.exit_code)
                if info.failed or inst.start_count:
                    raise errors.BootFailedError(
                        f"instance {name} of session {session!r} stopped while booting: "
                        f"{info.text}; started {inst.start_count or 0} time(s)"
                    )
            if remaining <= 0:
                return None
            # the platform's own wait holds the request until the state is reached; its
            # answer is a full read of the instance, so a running one is not read again
            with contextlib.suppress(errors.SandboxNotReadyError):
                waited = conn.api.wait_instance(name, "running", min(remaining, 2.0))
                if up(waited):
                    return waited
            return None

        policy = RetryPolicy.every(0.0, deadline_s=self.boot_timeout_s)
        with self._waiting():
            found = poll(probe, policy=policy, monotonic=self.clock)
        if found is None:
            raise errors.SandboxNotReadyError(
                f"instance {name} of session {session!r} is still {last[0]} after "
                f"{self.boot_timeout_s:.0f}s"
            )
        return found

    def _note_instance(self, session: str, inst: Instance) -> None:
        rec = self._record(session)
        with self.doc_lock:
            pin = identity.boot_pin(rec.instance, inst)
            if pin is None and identity.recorded_pin(rec.instance, inst) is not None:
                self._say(
                    session,
                    "info",
                    f"warning: instance {inst.name} booted again (start count "
                    f"{rec.instance.start_count if rec.instance else '?'} -> {inst.start_count}): "
                    "its host key is learned anew",
                )
            rec.instance = InstanceRecord(
                name=inst.name,
                uuid=inst.uuid,
                fqdn=inst.fqdn,
                metro=inst.metro or rec.metro,
                state=inst.state,
                created_at=inst.created_at,
                start_count=inst.start_count,
                pin=pin,
            )
            rec.created_at = inst.created_at
        # not a write of its own: the session's next save holds it (its command's, or the
        # one that closes its run). why: nothing irreversible depends on it before then (a
        # run killed in between finds the instance by name: the create's intent is on disk),
        # and in a fan-out each write is of every session's record

    def _delete(
        self, action: actions.DeleteInstance, ctx: SessionContext | None, run: _Run
    ) -> None:
        if not action.instance_uuid:
            raise errors.OwnershipError(
                f"not deleting instance {action.instance_name} on metro {action.metro}: "
                "no uuid was proven ours"
            )
        conn = self.metros.get(action.metro)
        if run.transport is not None:
            run.transport.close()
            run.transport = None
        # a command kept a connection to it: gone before the instance is
        links.drop_session(self.group.status_path, action.session)
        # why a final delete (`ukc delete`, prune, ttl) does not wait for the name to come
        # free: nothing of this run needs it again, and a later create waits for it there,
        # never adopting the instance on its way out (`_create_when_free`); a replace waits,
        # its create follows at once
        conn.api.delete_instance(
            action.instance_name, uuid=action.instance_uuid, wait=not action.forget
        )
        with self.doc_lock:
            self.deleted.add(action.instance_uuid)
        for uuid, name in action.volumes:
            self._delete_volume(conn, uuid, name)
        run.inst = None
        self.forget_local(action)

    def _delete_volume(self, conn: MetroConnection, uuid: str, name: str) -> None:
        """Delete a volume the planner proved ours; one still attached to the instance whose
        (asynchronous) delete is ending is tried again for a while."""
        deadline = time.monotonic() + VOLUME_DETACH_WAIT_S
        while True:
            try:
                conn.api.delete_volume(name, uuid=uuid)
                return
            except errors.NotFoundError:
                return
            except errors.ApiError as err:
                if err.code != CODE_CANNOT_BE_USED or time.monotonic() >= deadline:
                    raise
            time.sleep(0.5)

    def forget_local(self, action: actions.DeleteInstance) -> None:
        """The local half of a delete: journal it (in the document: the caller saves it), and
        with `forget` drop the session's credentials and sync records."""
        rec = self._record(action.session)
        with self.doc_lock:
            if rec.instance is not None:
                rec.instance.state = "deleted"
            rec.sync = SyncRecord()
            if action.forget:
                rec.phase = action.final_phase  # type: ignore[assignment]
                rec.commands = []
                rec.message = action.reason
                journal.set_condition(
                    rec, "Ready", "False", action.final_phase, action.reason, journal.utc_now()
                )
        if action.forget:
            credentials_for(self.group, action.session).forget()
            ctx = self.obs.contexts.get(action.session)
            if ctx is not None:
                sync_engine.forget(ctx.sync_options)
            else:
                _forget_sync_dir(self.group.state_dir / "sync" / action.session)
        # not saved here: the caller writes the document once its session is done

    # -- work in the sandbox ---------------------------------------------------------------

    def _wait_ready(
        self, ctx: SessionContext, conn: MetroConnection, run: _Run, *, push_follows: bool = False
    ) -> None:
        if run.transport is not None:
            return
        inst = run.inst
        if self.pool is not None and inst is not None:
            run.transport = self.pool.take(ctx.desired.name, inst.uuid)
            if run.transport is not None:
                run.pooled = True
                self._mark_boot(ctx.desired.name, run)
                return
        if inst is None:
            raise errors.NotFoundError(f"session {ctx.desired.name!r} has no instance to reach")
        kind = select.kind_for(identity.instance_transport(inst, ctx.desired.transport))
        rec = self._record(ctx.desired.name)
        if (
            rec.instance is None
            or rec.instance.uuid != inst.uuid
            or rec.instance.start_count != inst.start_count
        ):
            # A run killed between the create and its journal entry left only the intent (no
            # uuid); the observed instance, which the planner proved ours, is the one we work
            # on, so record it. A new boot is recorded too (its host key is learned anew).
            self._note_instance(ctx.desired.name, inst)
        with self._waiting():
            transport = kind.connect(
                target_for(inst, conn),
                run.credentials or ctx.credentials,
                pin=identity.boot_pin(rec.instance, inst),
                deadline_s=self.ready_timeout_s,
            )
        run.transport = transport
        with self.doc_lock:
            if rec.instance is not None:
                rec.instance.pin = transport.pin
        if not push_follows:
            self._mark_boot(ctx.desired.name, run)
            return
        # the helper's interpreter starts in the sandbox and the next round observes and plans
        # the push (it finds the helper running); the helper's shell leaves the boot marker
        # first, so a new boot's mark costs no channel of its own
        session = ctx.desired.name
        token = self._mark_due(session, run)
        before = bootmark.mark_command(token) if token else ""
        started = sync_engine.start_ahead(
            transport, ctx.sync_options, instance_uuid=inst.uuid, before=before
        )
        if token is None:
            return
        if not started:
            self._mark_boot(session, run, token)
            return
        # why recorded unconfirmed: the shell runs the marker's write before the helper, and
        # a token recorded that the sandbox lacks reads as a cold boot (the safe side)
        self._record_mark(session, token)

    def _mark_due(self, session: str, run: _Run) -> str | None:
        """A new token when this connection is the first of a boot not marked yet, else None."""
        inst, known = run.inst, self._record(session).instance
        if (
            run.transport is None
            or inst is None
            or known is None
            or known.boot_mark
            or known.uuid != inst.uuid
            or known.start_count != inst.start_count
        ):
            return None
        return bootmark.new_token()

    def _mark_boot(self, session: str, run: _Run, token: str | None = None) -> None:
        """Leave the boot marker on the first connection of a boot (`reconcile/bootmark.py`),
        on a channel of its own. Best effort: without one, a later `start_count` change reads
        as a cold boot."""
        token = token or self._mark_due(session, run)
        if token is None or run.transport is None:
            return
        try:
            bootmark.leave_mark(run.transport, token)
        except errors.UkcError as err:
            self._say(session, "info", f"boot marker not left: {err}")
            return
        self._record_mark(session, token)

    def _record_mark(self, session: str, token: str) -> None:
        known = self._record(session).instance
        with self.doc_lock:
            if known is not None:
                known.boot_mark = token

    def _sync_up(self, ctx: SessionContext, run: _Run) -> None:
        assert run.transport is not None and run.inst is not None
        inst = run.inst

        def push(shell: RemoteShell) -> sync_engine.PushResult:
            return sync_engine.push(
                shell,
                ctx.sync_options,
                instance_uuid=inst.uuid,
                local=ctx.manifest,
                ahead=self.ahead,
            )

        try:
            result = push(run.transport)
        except (errors.TransportError, errors.RemoteError):
            if not run.pooled:
                raise
            # A kept connection can die while idle (edge restart, network): reconnect once.
            # A push is safe to repeat: an interrupted one made the sandbox forget its record.
            with contextlib.suppress(Exception):
                run.transport.close()
            run.transport, run.pooled = None, False
            conn = self.metros.get(ctx.desired.metro)
            current = conn.api.get_instance(inst.name)
            if current is None or current.uuid != inst.uuid:
                # Deleted or replaced behind our back: do not wait a readiness deadline for
                # a sandbox that is gone; the next pass re-observes and recreates it.
                raise errors.NotFoundError(
                    f"instance {inst.name} disappeared during the sync"
                ) from None
            self._wait_ready(ctx, conn, run)
            assert run.transport is not None
            result = push(run.transport)
        # the scanned tree was for this push only (a later round scans again): not kept
        # alive through the commands and the sync-back (100,000 entries are ~60 MB)
        ctx.manifest = None
        rec = self._record(ctx.desired.name)
        with self.doc_lock:
            # Outputs still owed from this same instance stay owed across a new push.
            owed = rec.sync.back_pending and rec.sync.instance_uuid == run.inst.uuid
            rec.sync = SyncRecord(
                digest=result.digest,
                instance_uuid=run.inst.uuid,
                start_count=run.inst.start_count,
                files=ctx.desired.tree.files,
                bytes=ctx.desired.tree.bytes,
                last_synced_at=journal.utc_now(),
                last_files_sent=result.files_sent,
                last_bytes_sent=result.bytes_sent,
                last_deleted=result.deleted,
                remote_scanned=result.remote_scanned,
                back_pending=owed,
                back_from=rec.sync.back_from,
            )
            journal.set_condition(
                rec,
                "Synced",
                "True",
                "Synced",
                f"{result.files_sent} file(s) sent, {result.deleted} deleted",
                journal.utc_now(),
            )
        self._say(
            ctx.desired.name,
            "info",
            f"synced: {result.files_sent} file(s) sent ({human_size(result.bytes_sent)}), "
            f"{result.deleted} deleted" + (", remote scanned" if result.remote_scanned else ""),
        )
        # not a write of its own: the session's next save holds it (a command's record, on
        # disk before anything after the command; or the one that closes the run); a run
        # killed before then pushes again, which is safe to repeat

    def _run_command(
        self,
        action: actions.RunCommand,
        ctx: SessionContext,
        run: _Run,
        redact: Redactor,
    ) -> None:
        session = action.session
        assert run.inst is not None

        # one redacting stream per output stream: a secret split over several writes is
        # still masked whole; the stored tails are cut from what was shown
        streams = {kind: (redact.stream(), OutputTail()) for kind in ("stdout", "stderr")}
        # why a lock per stream: a reader thread that outlived the command must not show its
        # last piece after (or interleaved with) what closing the stream shows
        locks = {kind: threading.Lock() for kind in streams}

        def show(kind: str, text: str) -> None:
            if text:
                streams[kind][1].add(text)
                self._say(session, "output", text, kind)

        def sink(kind: str) -> Callable[[bytes], None]:
            stream = streams[kind][0]

            def feed(data: bytes) -> None:
                with locks[kind]:
                    show(kind, stream.feed(data))

            return feed

        started = journal.utc_now()
        # the sync-back's helper starts (on a channel of its own) while the command runs and
        # its record is saved; it reads nothing of the sandbox before the pull asks
        run.pull_ahead = (
            background(
                functools.partial(
                    sync_engine.start_pull_ahead,
                    run.transport,
                    ctx.sync_options,
                    instance_uuid=run.inst.uuid,
                ),
                "ukc-pull-ahead",
            )
            if action.pull_follows and run.transport is not None
            else None
        )
        try:
            assert run.transport is not None
            result = run.transport.run(
                action.run,
                env=ctx.env,
                cwd="/workspace",
                timeout_s=action.timeout_s,
                on_stdout=sink("stdout"),
                on_stderr=sink("stderr"),
                stop=self.stop.is_set if self.stop is not None else None,
                shell=action.shell,
            )
        finally:
            for kind, (stream, _tail) in streams.items():
                with locks[kind]:
                    show(kind, stream.close())
        ok = result.exit_code == 0 and not result.timed_out
        rec = self._record(session)
        with self.doc_lock:
            previous = next((c for c in rec.commands if c.name == action.name), None)
            record = CommandRecord(
                name=action.name,
                run=action.run,
                exit_code=result.exit_code,
                timed_out=result.timed_out,
                interrupted=result.interrupted,
                stdout=streams["stdout"][1].text(),
                stderr=streams["stderr"][1].text(),
                started_at=started,
                finished_at=journal.utc_now(),
                duration_s=round(result.duration_s, 3),
                skipped=False,
                input_hash=action.input_hash,
                inputs_digest=action.inputs_digest,
                shell=action.shell,
                instance_uuid=run.inst.uuid if ok else (previous.instance_uuid if previous else ""),
                start_count=run.inst.start_count
                if ok
                else (previous.start_count if previous else None),
                last_success_hash=action.input_hash
                if ok
                else (previous.last_success_hash if previous else ""),
                last_success_public_hash=action.public_hash
                if ok
                else (previous.last_success_public_hash if previous else ""),
            )
            rec.commands = [c for c in rec.commands if c.name != action.name] + [record]
            # Journaled with the command: if the sync-back never completes, the next plan owes it.
            rec.sync.back_pending = bool(ctx.desired.back)
            self.ran.add((session, action.name))
        run.last_command = record
        # on disk before the session's next action (a sync-back, the next command), or with
        # the save that closes the run: one write, not two, after a session's last command
        run.unsaved = True
        if result.interrupted:
            raise errors.StoppedByUserError(
                f"command {action.name!r} of session {session!r} was stopped (Ctrl-C)"
            )
        if not ok:
            what = (
                f"timed out after {action.timeout_s:.0f}s"
                if result.timed_out
                else f"exited {result.exit_code}"
            )
            raise errors.CommandFailedError(
                f"command {action.name!r} of session {session!r} {what}",
                exit_code=result.exit_code,
            )
        self._say(session, "info", f"command {action.name!r} exited 0 in {result.duration_s:.2f}s")

    def _sync_back(self, ctx: SessionContext, run: _Run, redact: Redactor) -> None:
        assert run.transport is not None
        # the instance uuid (with the sandbox's boot id) says which sandbox a pulled file came
        # from: only deletions in that same sandbox are mirrored (`sync.back_delete`)
        uuid = run.inst.uuid if run.inst is not None else ""
        # a pull never reads the scanned tree: freed before the pull's record and writes take
        # their share (a push later in this round scans again, told by the keeper or a feed)
        ctx.manifest = None
        if run.pull_ahead is not None:
            run.pull_ahead.result()  # parked before the pull looks (it never raises)
            run.pull_ahead = None
        result = sync_engine.pull(run.transport, ctx.sync_options, instance_uuid=uuid)
        rec = self._record(ctx.desired.name)
        stopped = result.stopped or (
            f"stopped: the sandbox broke its stream ({result.aborted})" if result.aborted else ""
        )
        stopped = redact(stopped)
        # file names come from the sandbox, which knows the secrets: masked like its output
        rejected = [redact(r) for r in result.rejected]
        if result.refused > len(rejected):
            rejected.append(f"... and {result.refused - len(rejected)} more refused")
        listed = 100  # status lists stay small whatever the sandbox sends
        conflicts = [redact(c) for c in result.conflicts[:listed]]
        if len(result.conflicts) > listed:
            conflicts.append(f"... and {len(result.conflicts) - listed} more conflicts")
        deleted = [redact(d) for d in result.deleted]
        kept = [redact(k) for k in result.kept]
        skipped = [redact(w) for w in result.deletes_skipped]
        with self.doc_lock:
            rec.sync.pulled_files = result.files_written
            rec.sync.conflicts = conflicts
            rec.sync.rejected = rejected
            rec.sync.pulled_deleted = len(deleted)
            rec.sync.deletes_kept = kept
            rec.sync.deletes_skipped = skipped
            rec.sync.back_stopped = stopped
            last = run.last_command
            if last is not None:
                rec.sync.back_from = BackFrom(
                    command=last.name,
                    exit_code=last.exit_code,
                    timed_out=last.timed_out,
                    finished_at=last.finished_at,
                )
            # stopped early: the outputs are still owed (the next pull resumes: files already
            # home are not sent again)
            rec.sync.back_pending = bool(stopped)
        name = ctx.desired.name
        for conflict in conflicts:
            self._say(name, "info", f"conflict kept beside local file: {conflict}")
        for line in rejected:
            self._say(name, "info", f"refused from sandbox: {line}")
        listed = 20  # a bulk removal is summed up, not listed line by line
        for path in deleted[:listed]:
            self._say(name, "info", f"removed here, deleted in the sandbox: {path}")
        if len(deleted) > listed:
            self._say(name, "info", f"... and {len(deleted) - listed} more removed")
        for item in kept:
            self._say(name, "info", f"kept: {item}")
        for why in skipped:
            self._say(name, "info", f"deletions not mirrored: {why}")
        removed = f", removed {len(result.deleted)}" if ctx.sync_options.back_delete else ""
        self._say(
            name,
            "info",
            f"brought back {result.files_written} file(s) ({human_size(result.bytes_written)})"
            f"{removed}",
        )
        run.unsaved = True  # written as the command's record is
        if stopped:
            raise errors.SyncLimitError(
                f"sync-back of session {name!r} {stopped}; "
                f"{result.files_written} file(s) brought back were kept, no deletions mirrored"
            )


class _NameTakenError(Exception):
    """An unlisted create found its name held by an instance not on its way out."""


def _stopped_since(inst: Instance, before: Instance | None) -> bool:
    """Whether `inst`'s stop happened after `before` was observed (None: a new instance, so
    any stop is this boot's)."""
    if before is None or before.uuid != inst.uuid:
        return True
    return (inst.stopped_at, inst.start_count, inst.stop_reason) != (
        before.stopped_at,
        before.start_count,
        before.stop_reason,
    )


def _phase_of(action: actions.Action) -> str:
    if isinstance(action, actions.CreateInstance | actions.StartInstance | actions.SetAutokill):
        return "create_s"
    if isinstance(action, actions.WaitReady):
        return "ready_s"
    if isinstance(action, actions.SyncUp):
        return "sync_s"
    if isinstance(action, actions.RunCommand):
        return "commands_s"
    if isinstance(action, actions.SyncBack):
        return "syncback_s"
    return "delete_s"


def _forget_sync_dir(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _waited_before(action: actions.Action, done: list[actions.Action]) -> bool:
    """Whether `action` is a wait for an instance this apply already waited for (made ahead
    of the scan, then a round): said once, as the apply's plan reports it."""
    return isinstance(action, actions.WaitReady) and any(
        isinstance(a, actions.WaitReady) and a.instance_name == action.instance_name for a in done
    )
