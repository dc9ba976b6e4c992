"""The reconcile loop of one group (one status file): apply, plan, delete.

Apply is level-triggered: every round re-observes the cloud and the local trees, and the pure
planner decides again from scratch; the executor only performs. A session that failed in this
run is left alone for the remaining rounds (its sandbox is kept for inspection). The loop stops
when a round plans nothing, or raises `ConvergenceError` after `max_rounds`.

Delete observes first (one list per metro), deletes what still exists and is provably ours, and
cleans the local side (private key, sync records) and records `Deleted`, so a delete
interrupted half-way is finished by running it again. An instance under the session's name
that is not provably ours is left alone, with the local side: the session fails instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from dataclasses import dataclass, field

from reconciler import errors
from reconciler._util.fanout import each
from reconciler.cloud.metros import MetroRegistry, metro_label
from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, bootmark, identity, lease, quota, rebuild
from reconciler.reconcile.desired import (
    DesiredSession,
    Group,
    instance_credentials,
    sync_options_for,
    target_for,
)
from reconciler.reconcile.events import Event, RecordingReporter, Reporter
from reconciler.reconcile.execute import Executor, SessionOutcome, Worked
from reconciler.reconcile.interrupts import StopFlag
from reconciler.reconcile.observe import (
    Listing,
    Observation,
    answered_listing,
    observe,
    observe_quotas,
    observe_volumes,
    scan_ahead,
    start_listing,
)
from reconciler.reconcile.plan import plan_delete, plan_sessions, recorded_without_instance
from reconciler.reconcile.suspend import suspend_all
from reconciler.reconcile.wake import wake
from reconciler.spec.models import DEFAULT_LOCAL_IMAGE
from reconciler.status import journal
from reconciler.status.schema import (
    Interruption,
    SessionStatus,
    StatusDoc,
    expiry_time,
    parse_time,
)
from reconciler.sync import engine as sync_engine
from reconciler.sync import feed as sync_feed
from reconciler.sync.options import SyncOptions
from reconciler.transport import links, select
from reconciler.transport.base import Transport
from reconciler.transport.pool import TransportPool

__all__ = ["ApplyResult", "apply_group", "check_prune", "delete_group", "plan_group"]

#: the most session threads one round starts (`--concurrency`'s own maximum): the sessions
#: beyond the concurrency wait for a slot, or for their instance to boot
SESSION_THREADS_MAX = 64


@dataclass
class ApplyResult:
    ok: bool
    plan: actions.Plan
    rounds: int
    outcomes: dict[str, SessionOutcome] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    #: Ctrl-C stopped it (the interrupted sessions are recorded `Interrupted`)
    interrupted: bool = False


def check_prune(
    groups: Sequence[Group], *, prune: bool, allow_empty: bool, only: Collection[str]
) -> None:
    """Refuse a prune that would delete every session by accident (specs that declare none,
    e.g. a wrong path), unless `allow_empty`, and a prune of a partial run (`only`), which
    would take the sessions left out for removed ones."""
    if prune and not allow_empty and all(not g.sessions for g in groups):
        raise errors.UsageError(
            "refusing to prune: the specs declare no session (pass --allow-empty to delete all)"
        )
    if prune and only:
        raise errors.UsageError("--prune cannot be combined with --session")


def plan_group(
    group: Group,
    *,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    prune: bool = False,
    now: Callable[[], float] = time.time,
) -> tuple[actions.Plan, Observation]:
    """What apply would do right now (reads only; takes no lock)."""
    doc = journal.load(group.status_path)
    owner, salt = _identity(group, environ)
    # the warm process's keeper says what changed since the last scan (no walk of the tree)
    with sync_feed.tracking(
        (
            (o.state_dir, o.local_root, o.back_paths())
            for o in (sync_options_for(group, s) for s in group.sessions)
        ),
        watch=False,
    ):
        obs = observe(group, doc, metros, environ, owner=owner, salt=salt)
    with contextlib.closing(TransportPool()) as pool:
        _read_boot_marks(obs, doc, metros, pool, RecordingReporter(), set())
        return _plan_read_only(group, obs, doc, metros, pool, prune=prune, now=now), obs


def _read_boot_marks(
    obs: Observation,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    reporter: Reporter,
    done: set[str],
    concurrency: int = 8,
) -> None:
    """Before planning: whether the sandboxes whose `start_count` moved still run the boot
    their records marked (`bootmark`); read once per session and run."""
    woken = bootmark.worth_checking(obs, doc, done)
    if woken:
        done.update(woken)
        bootmark.check(
            woken,
            obs=obs,
            doc=doc,
            metros=metros,
            pool=pool,
            reporter=reporter,
            concurrency=concurrency,
        )


def _plan_read_only(
    group: Group,
    obs: Observation,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    *,
    prune: bool,
    now: Callable[[], float],
) -> actions.Plan:
    the_plan = _plan(obs.desired, obs, doc, now(), prune=prune, only_files=group.only_files)
    wanted = rebuild.worth_reading(the_plan, obs, doc, set())
    asleep: list[actions.SuspendInstance] = []
    if wanted:
        # a fresh runner's plan: what the sandboxes' journals say ran (the status file is
        # not written; apply does that)
        quiet = RecordingReporter()
        asleep = _asleep(wanted, obs)
        if rebuild.consult(wanted, obs=obs, doc=doc, metros=metros, pool=pool, reporter=quiet):
            # a record from a journal may mark an earlier boot than the platform shows
            _read_boot_marks(obs, doc, metros, pool, quiet, set())
            the_plan = _plan(obs.desired, obs, doc, now(), prune=prune, only_files=group.only_files)
    if asleep:
        # reading a journal woke them; a plan changes nothing, so they go back to sleep
        put_back = suspend_all(
            asleep, metros, pool, RecordingReporter(), concurrency=8, status_path=group.status_path
        )
        awake = tuple(
            f"instance {s.instance_name} was woken to read its journal and could not be "
            "suspended again: it stays up until the next apply"
            for s in asleep
            if s.session not in put_back
        )
        the_plan = dataclasses.replace(the_plan, warnings=the_plan.warnings + awake)
    shortfalls, unread = _quota_shortfalls(the_plan, obs.desired, obs, metros)
    if shortfalls or unread:
        notes = tuple(f"apply would refuse: {why}" for why in shortfalls) + tuple(unread)
        the_plan = dataclasses.replace(the_plan, warnings=the_plan.warnings + notes)
    return the_plan


def _asleep(sessions: Sequence[str], obs: Observation) -> list[actions.SuspendInstance]:
    """The suspends that put `sessions`' instances in standby back to sleep once read."""
    found = []
    for name in sessions:
        ctx = obs.contexts.get(name)
        inst = obs.instances.get(ctx.desired.instance_name) if ctx is not None else None
        if ctx is not None and inst is not None and inst.state == "standby":
            found.append(actions.SuspendInstance(name, inst.name, ctx.desired.metro))
    return found


def _plan(
    desired: Sequence[DesiredSession],
    obs: Observation,
    doc: StatusDoc,
    at: float,
    *,
    prune: bool,
    only_files: frozenset[str] | None,
) -> actions.Plan:
    return plan_sessions(
        desired,
        obs.instances,
        doc,
        at,
        owner=obs.owner,
        prune=prune,
        claimed=obs.claimed,
        only_files=only_files,
        listed=obs.listed,
    )


def _quota_shortfalls(
    plan: actions.Plan,
    desired: Sequence[DesiredSession],
    obs: Observation,
    metros: MetroRegistry,
) -> tuple[list[str], list[str]]:
    """Why what `plan` creates or wakes does not fit the account's quota (per metro), and a
    warning per metro whose quota could not be read. Reads the quota only of metros the plan
    takes something of."""
    wanted = quota.needs(plan, desired, obs.instances)
    if not wanted:
        return [], []
    found, unread = observe_quotas(metros, wanted)
    shortfalls = [
        why
        for metro, need in sorted(wanted.items())
        if metro in found and (why := quota.shortfall(metro, need, found[metro])) is not None
    ]
    return shortfalls, unread


def _identity(group: Group, environ: Mapping[str, str]) -> tuple[identity.Owner, bytes]:
    """This checkout as an owner, and the salt of its secret fingerprints (both created on
    first use, here rather than in the read-only observer)."""
    project = identity.project_id(group.base_dir, environ)
    owner = identity.load_owner(group.state_dir, project, environ)
    return owner, identity.load_salt(group.state_dir, owner)


def apply_group(
    group: Group,
    *,
    metros: MetroRegistry,
    reporter: Reporter,
    environ: Mapping[str, str],
    prune: bool = False,
    concurrency: int = 8,
    lock_timeout_s: float = 0.0,
    max_rounds: int = 3,
    #: watch mode: files still changing after the cap end this pass quietly (the watcher has
    #: them pending and runs another pass); one-shot apply reports it as an error
    raise_on_cap: bool = True,
    now: Callable[[], float] = time.time,
    only: set[str] | None = None,
    pool: TransportPool | None = None,
    #: a one-shot apply: once every session converged, suspend the instances of sessions
    #: that ask for it (`suspend`); `watch` never does (it is about to work on them again)
    suspend_idle: bool = False,
) -> ApplyResult:
    """Converge every session of `group` (one status file) and write its status."""
    # One-shot applies get their own pool: connections opened ahead of need (see
    # `TransportPool.prefetch`) or in one round serve the next round too, and all close at
    # the end.
    kept = pool if pool is not None else TransportPool()
    unfinished = _UnfinishedOnInterrupt(group)
    with (
        contextlib.closing(kept) if pool is None else contextlib.nullcontext(),
        # the main thread's SIGINT reaches workers' action boundaries at once
        StopFlag() as stop,
        journal.lock(group.status_path, timeout_s=lock_timeout_s),
        # the converged round re-stats only what changed during the first (not the tree)
        sync_feed.tracking(
            (o.state_dir, o.local_root, o.back_paths())
            for o in (sync_options_for(group, s) for s in group.sessions)
            if only is None or o.session in only
        ),
        # released after the sessions' phases are journaled, before the status file's lock
        contextlib.ExitStack() as leases,
        unfinished,
    ):
        doc = journal.load(group.status_path)
        doc_lock = threading.Lock()
        committer = journal.Committer(group.status_path, doc, doc_lock)
        unfinished.doc, unfinished.doc_lock = doc, doc_lock
        unfinished.committer = committer
        _take_leases(leases, group, doc, metros, environ, reporter, lock_timeout_s, stop.set)
        owner, salt = _identity(group, environ)
        # the first round's list and the kept helpers' hellos travel at once, as soon as the
        # lock (and leases) are held: a watch pass waits for both before its push
        listing: Listing | None = start_listing(group, doc, metros, owner.project, only)
        _greet(leases, group, kept, only)
        failed: dict[str, str] = {}
        outcomes: dict[str, SessionOutcome] = {}
        first_plan: actions.Plan | None = None
        rounds = 0
        obs: Observation | None = None
        ran: set[tuple[str, str]] = set()
        #: what each session's executors did in this apply (its record reports all of it)
        worked: dict[str, Worked] = {}
        #: big files' block digests made while the sandboxes boot, taken by the pushes
        ahead = sync_engine.DigestsAhead()

        def executor_for(seen: Observation, slots: threading.Semaphore | None = None) -> Executor:
            """An executor of one pass (the instances made ahead, or a round) over what it
            saw; what the passes share (the document, the kept connections, what ran and
            what each session did) is this apply's."""
            return Executor(
                group=group,
                doc=doc,
                observation=seen,
                metros=metros,
                reporter=reporter,
                doc_lock=doc_lock,
                ran=ran,
                pool=kept,
                stop=stop,
                committer=committer,
                slots=slots or threading.BoundedSemaphore(max(1, concurrency)),
                worked=worked,
                ahead=ahead,
            )

        #: sessions whose sandbox journal was read in this run (once is enough)
        journals_read: set[str] = set()
        #: sessions whose boot marker was read in this run (once is enough)
        marks_read: set[str] = set()
        #: ... and read again once the record came from the sandbox's journal (another
        #: runner's record names its own marker and count)
        marks_read_after_journal: set[str] = set()
        pending: set[str] = set()
        interrupted: set[str] = set()
        converged: actions.Plan | None = None
        #: instances in standby woken only to read their journal
        journal_woken: list[actions.SuspendInstance] = []
        #: sessions had their first round as soon as their instance made ahead was up
        early_rounds = False
        if _worth_a_glance(group, doc, only):
            early = _create_ahead(
                group,
                doc,
                metros,
                environ,
                reporter,
                executor_for=executor_for,
                stop=stop,
                concurrency=concurrency,
                only=only,
                now=now,
                unfinished=unfinished,
                listing=listing,
                owner=owner,
                salt=salt,
                doc_lock=doc_lock,
            )
            if early is not None:
                listing = None  # the first round lists again: the instances were made since
                obs, first_plan, finished, firsts = early
                early_rounds = bool(firsts)

                def made_ahead(outcome: SessionOutcome) -> None:
                    prev = outcomes.get(outcome.session)
                    if prev is not None:  # its create's, before its first round
                        outcome.ran_commands += prev.ran_commands
                    outcomes[outcome.session] = outcome
                    if outcome.interrupted or stop.is_set():
                        interrupted.add(outcome.session)
                    elif not outcome.ok:
                        failed[outcome.session] = outcome.error

                for outcome in finished:
                    # the journal in a sandbox made by this run is this run's own
                    journals_read.add(outcome.session)
                    made_ahead(outcome)
                if firsts:
                    first_plan = _joined(
                        first_plan, actions.Plan(sessions=tuple(sp for sp, _o in firsts))
                    )
                for _splan, outcome in firsts:
                    made_ahead(outcome)
                if stop.is_set():
                    # made and up, never synced: not left in a phase that says work goes on
                    unfinished.journal(journal.utc_now())
        #: the first round over every session (sessions may have had theirs ahead)
        first_full = True
        while not (stop.is_set() and first_plan is not None):
            # (a Ctrl-C while instances were made ahead: no round starts)
            if listing is None:
                owner, salt = _identity(group, environ)
            obs = observe(
                group,
                doc,
                metros,
                environ,
                owner=owner,
                salt=salt,
                only=only,
                on_tree_changed=_prefetcher(group, doc, metros, kept, owner),
                listing=listing,
            )
            listing = None
            doc.project = obs.project
            desired = [d for d in obs.desired if d.name not in failed]
            _read_boot_marks(obs, doc, metros, kept, reporter, marks_read, concurrency)

            def replan(
                desired: Sequence[DesiredSession] = desired, obs: Observation = obs
            ) -> actions.Plan:
                """The plan of this round's observation, as the records now stand."""
                return _plan(
                    desired,
                    obs,
                    doc,
                    now(),
                    prune=prune and not failed,
                    only_files=group.only_files,
                )

            plan = replan()
            wanted = rebuild.worth_reading(plan, obs, doc, journals_read)
            if wanted:
                journals_read.update(wanted)
                journal_woken += _asleep(wanted, obs)
                if rebuild.consult(
                    wanted,
                    obs=obs,
                    doc=doc,
                    metros=metros,
                    pool=kept,
                    reporter=reporter,
                    concurrency=concurrency,
                ):
                    # a record from a journal may mark an earlier boot than the platform
                    # shows; read again even if this runner's own record was read before
                    _read_boot_marks(
                        obs, doc, metros, kept, reporter, marks_read_after_journal, concurrency
                    )
                    plan = replan()
            if first_full:
                first_full = False
                _check_quota(plan, desired, obs, metros, reporter)
                # with instances made ahead: those creates, then what this round planned
                first_plan = plan if first_plan is None else _joined(first_plan, plan)
            if _wake_for_work(plan, obs, metros, reporter, concurrency):
                # a wake may move `start_count`: the marker says whether memory was kept
                _read_boot_marks(obs, doc, metros, kept, reporter, marks_read, concurrency)
                plan = replan()
            # what the plan already knows apply would fail on (the verdict `ukc plan` gives)
            for session_name, why in plan.errors.items():
                if session_name not in failed:
                    failed[session_name] = why
                    reporter.event(Event(session_name, "failed", why))
            if plan.empty:
                converged = plan
                break
            rounds += 1
            if rounds > max_rounds:
                if not raise_on_cap:
                    rounds = max_rounds
                    pending = {sp.session for sp in plan.sessions if sp.changes}
                    break
                raise errors.ConvergenceError(
                    f"apply still had work after {max_rounds} rounds: "
                    + "; ".join(a.describe() for s in plan.sessions for a in s.changes)[:300],
                    rounds=max_rounds,
                )
            executor = executor_for(obs)
            work = [s for s in plan.sessions if s.changes]
            unfinished.in_flight = executor.in_flight
            finished = _run_sessions(executor, work, concurrency, stop, reporter)
            for outcome in finished:
                prev = outcomes.get(outcome.session)
                if prev is not None:
                    outcome.ran_commands += prev.ran_commands
                outcomes[outcome.session] = outcome
                if outcome.interrupted:
                    interrupted.add(outcome.session)
                if not outcome.ok:
                    failed[outcome.session] = outcome.error
            if stop.is_set():
                break
            if plan.prunes and not failed:
                for prune_action in plan.prunes:
                    pruned = executor.run_session(
                        actions.SessionPlan(prune_action.session, (prune_action,))
                    )
                    outcomes[pruned.session] = pruned
                    if not pruned.ok:
                        failed[pruned.session] = pruned.error
        assert obs is not None and first_plan is not None
        if early_rounds:
            rounds = max(rounds, 1)  # the sessions' first rounds ran ahead of the others'
        suspended: set[str] = set()
        if suspend_idle and converged is not None and not stop.is_set():
            todo = [s for s in converged.suspends if s.session not in failed]
            # woken to read a journal, then nothing to do: back to sleep whatever `suspend` says
            todo += [
                s
                for s in journal_woken
                if s.session not in failed
                and s.session not in outcomes
                and all(t.session != s.session for t in todo)
            ]
            suspended = suspend_all(todo, metros, kept, reporter, concurrency, group.status_path)
        _finalize(group, doc, obs, failed, reporter, ran, pending, interrupted, suspended)
        return ApplyResult(
            ok=not failed,
            plan=first_plan,
            rounds=rounds,
            outcomes=outcomes,
            failed=failed,
            interrupted=stop.is_set(),
        )


def _take_leases(
    held: contextlib.ExitStack,
    group: Group,
    doc: StatusDoc,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    reporter: Reporter,
    timeout_s: float,
    stop: Callable[[], None],
) -> None:
    """With `UKC_PROJECT`, the project's lease on every metro this apply may act on (in one
    order, so two runners never hold one each and wait for the other's)."""
    if not environ.get("UKC_PROJECT", "").strip():
        return
    owner, _salt = _identity(group, environ)
    images: dict[str, str] = {}
    for loaded in group.sessions:
        images.setdefault(metro_label(loaded.spec.metro), loaded.spec.image)
    fallback = environ.get("UKC_SANDBOX_IMAGE", "")
    for record in doc.inventory().values():
        if record.metro:
            local = DEFAULT_LOCAL_IMAGE if record.metro == "local" else ""
            images.setdefault(record.metro, fallback or local)

    def notice(text: str) -> None:
        reporter.event(Event("ukc", "notice", f"lease: {text}"))

    def lost(text: str) -> None:
        reporter.event(Event("ukc", "interrupt", f"stopping: {text}; no new action starts"))
        stop()

    for metro, image in sorted(images.items()):
        if not image:
            continue  # a metro only the inventory names, and no image to make a lease of
        one = lease.Lease(
            metros.get(metro).api,
            project=owner.project,
            owner=owner,
            image=image,
            on_wait=notice,
            on_lost=lost,
        )
        one.acquire(timeout_s)
        held.enter_context(one)


class _UnfinishedOnInterrupt:
    """A Ctrl-C that ends apply outside the workers' wait (observing, planning, a prune, or a
    second Ctrl-C): a session left `Progressing` (a create in flight) is journaled
    `Interrupted`, never left in a phase that says work goes on."""

    def __init__(self, group: Group) -> None:
        self.group = group
        self.doc: StatusDoc | None = None
        self.doc_lock = threading.Lock()
        self.committer: journal.Committer | None = None
        #: the running executor's actions in flight (a second Ctrl-C leaves them behind)
        self.in_flight: Mapping[str, actions.Action] = {}

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        if self.committer is None or kind is None or not issubclass(kind, KeyboardInterrupt):
            return
        # why suppress: after a second Ctrl-C a worker may still write the document
        with contextlib.suppress(Exception):
            self.journal(journal.utc_now())
            self.committer.save()

    def journal(self, now: str) -> None:
        """The actions in flight and the sessions left `Progressing`, journaled as interrupted
        (in the document; the caller saves it)."""
        assert self.doc is not None
        with self.doc_lock:
            for session, action in self.in_flight.items():
                rec = self.doc.sessions.setdefault(session, SessionStatus())
                rec.phase = "Interrupted"
                rec.message = f"quit during {action.describe()}"
                rec.interruption = Interruption(at=now, during=action.describe())
                journal.set_condition(rec, "Ready", "False", "Interrupted", rec.message, now)
            for rec in self.doc.sessions.values():
                if rec.phase == "Progressing":
                    rec.phase = "Interrupted"
                    rec.message = "interrupted"
                    rec.interruption = Interruption(at=now)
                    journal.set_condition(rec, "Ready", "False", "Interrupted", "interrupted", now)


def _worth_a_glance(group: Group, doc: StatusDoc, only: set[str] | None) -> bool:
    """Whether a session may lack its instance, by the records (a first apply, a deleted
    session): then the apply looks before the trees are scanned (`_create_ahead`). why by the
    records: that look is one more list, not worth it where every instance is known."""
    for loaded in group.sessions:
        name = loaded.spec.name
        if only is not None and name not in only:
            continue
        if recorded_without_instance(doc.sessions.get(name)):
            return True
    return False


def _create_ahead(
    group: Group,
    doc: StatusDoc,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    reporter: Reporter,
    *,
    executor_for: Callable[[Observation, threading.Semaphore | None], Executor],
    stop: StopFlag,
    concurrency: int,
    only: set[str] | None,
    now: Callable[[], float],
    unfinished: _UnfinishedOnInterrupt,
    listing: Listing | None,
    owner: identity.Owner,
    salt: bytes,
    doc_lock: threading.Lock,
) -> (
    tuple[
        Observation,
        actions.Plan,
        list[SessionOutcome],
        list[tuple[actions.SessionPlan, SessionOutcome]],
    ]
    | None
):
    """The apply's first look, before the trees are scanned: a session whose instance is
    missing needs it made whatever its tree holds, so it is created and waited for (its boot,
    sshd's start and the key's install) on the session threads while this thread scans the
    trees. None when the look plans nothing; else that observation and plan (only the
    sessions worked on) and their outcomes. The first round observes again, instances and
    trees (re-statting only what changed since this scan), and plans the rest; with the
    same `listing` (the list started for it) when this look made nothing.

    why the look does not wait for the list: the create is the first step of the longest
    path (boot, sshd, key); the records say which sessions have no instance, and a create
    whose name is taken after all changes nothing and is left to the round's list
    (`CreateInstance.unlisted`).

    Each session made and up has its first round at once, on its own thread, once the trees
    are scanned (the last of the pairs returned: those plans and outcomes): it looks at its
    tree again and at its instance as the platform answered its wait, is planned alone (the
    pure planner), and runs only work on that instance (sync, commands). why: in a fan-out
    the first instances are up a second before the last; their sync and commands ran only
    once all were. Anything else its plan holds (a create, a wake, a refusal, a boot to
    check) is left to the round over all sessions, which looks at everything again."""

    def look(listed: bool) -> tuple[Observation, actions.Plan, list[actions.SessionPlan]]:
        seen = observe(
            group,
            doc,
            metros,
            environ,
            owner=owner,
            salt=salt,
            only=only,
            scan=False,
            glance=True,
            listing=listing,
            listed=listed,
        )
        planned = _plan(seen.desired, seen, doc, now(), prune=False, only_files=group.only_files)
        return seen, planned, [s for s in planned.sessions if s.changes]

    obs, plan, work = look(listed=False)
    if not work:
        return None
    desired = [d for d in obs.desired if d.name in {s.session for s in work}]
    shortfalls, unread = _quota_shortfalls(plan, desired, obs, metros)
    if shortfalls:
        # the records' word counts a create for an instance that may exist (a lost status
        # file): a refusal is the list's to make
        obs, plan, work = look(listed=True)
        if not work:
            return None
        desired = [d for d in obs.desired if d.name in {s.session for s in work}]
        shortfalls, unread = _quota_shortfalls(plan, desired, obs, metros)
    _refuse_short(shortfalls, unread, reporter)
    executor = executor_for(obs, None)
    unfinished.in_flight = executor.in_flight
    scanned = threading.Event()
    #: a session's first round began: the pushes digest what they send themselves
    begun = threading.Event()

    firsts: dict[str, tuple[actions.SessionPlan, SessionOutcome]] = {}

    def first_round(made: SessionOutcome) -> None:
        name, read = made.session, made.instance
        if not made.ok or made.deferred or made.interrupted or read is None:
            return
        while not scanned.wait(0.05):
            if stop.is_set():
                return
        if stop.is_set():
            return
        begun.set()
        try:
            with doc_lock:  # why: the list's records, read as the workers write them
                listing = answered_listing(group, doc, metros, owner.project, name, read)
            seen = observe(
                group,
                doc,
                metros,
                environ,
                owner=owner,
                salt=salt,
                only={name},
                listing=listing,
            )
            ctx = seen.contexts.get(name)
            inst = seen.claimed.get(name)
            if ctx is None or inst is None or inst.name != ctx.desired.instance_name:
                return
            with doc_lock:
                if bootmark.worth_checking(seen, doc, set()):
                    return
                planned = plan_sessions(
                    [ctx.desired],
                    {inst.name: inst},
                    doc,
                    now(),
                    owner=seen.owner,
                    claimed={name: inst},
                    only_files=group.only_files,
                )
            (splan,) = planned.sessions
            if planned.errors or not splan.changes or not _early_work(splan):
                return
        except errors.UkcError:
            return  # the round after looks again, and reports it
        ex = executor_for(seen, executor.slots)
        # one view of what is in flight, for Ctrl-C (`_say_interrupt`, `unfinished`)
        ex.in_flight = executor.in_flight
        firsts[name] = (splan, ex.run_session(splan))

    finished = _run_sessions(
        executor,
        work,
        concurrency,
        stop,
        reporter,
        meanwhile=lambda sessions_done: scan_ahead(
            group,
            only,
            until=lambda: begun.is_set() or sessions_done(),
            ahead=executor.ahead,
            scanned=scanned.set,
        ),
        then=first_round,
    )
    # a session whose instance existed after all did nothing here: the round plans it whole
    left = {o.session for o in finished if o.deferred}
    finished = [o for o in finished if o.session not in left]
    work = [s for s in work if s.session not in left]
    if not work:
        return None
    obs.desired = [d for d in desired if d.name not in left]
    return (
        obs,
        dataclasses.replace(plan, sessions=tuple(work)),
        finished,
        [firsts[s.session] for s in work if s.session in firsts],
    )


def _early_work(splan: actions.SessionPlan) -> bool:
    """Work on an instance that is up, and nothing else."""
    return all(
        isinstance(a, (actions.SyncUp, actions.RunCommand, actions.SyncBack, actions.SetAutokill))
        or (isinstance(a, actions.WaitReady) and not a.wake)
        for a in splan.actions
    )


def _joined(ahead: actions.Plan, plan: actions.Plan) -> actions.Plan:
    """What apply did: the creates made ahead, then the first round's plan (its wait for the
    same instance said once)."""
    early = {s.session: s for s in ahead.sessions}
    sessions = []
    for splan in plan.sessions:
        before = early.pop(splan.session, None)
        if before is not None:
            rest = tuple(a for a in splan.actions if not isinstance(a, actions.WaitReady))
            splan = dataclasses.replace(splan, actions=before.actions + rest)
        sessions.append(splan)
    return dataclasses.replace(plan, sessions=(*early.values(), *sessions))


def _check_quota(
    plan: actions.Plan,
    desired: Sequence[DesiredSession],
    obs: Observation,
    metros: MetroRegistry,
    reporter: Reporter,
) -> None:
    """Before anything is created or woken: a fan-out the quota cannot hold fails whole,
    rather than half-made with the rest refused one by one."""
    _refuse_short(*_quota_shortfalls(plan, desired, obs, metros), reporter)


def _refuse_short(shortfalls: list[str], unread: list[str], reporter: Reporter) -> None:
    """Say which quotas were not read, and refuse the apply when a shortfall was found."""
    for text in unread:
        reporter.event(Event("ukc", "notice", f"warning: {text}"))
    if shortfalls:
        raise errors.QuotaError(
            "refusing to apply: "
            + "; ".join(shortfalls)
            + ". Nothing was created: delete sessions (`ukc delete`), lower "
            "`memory_mb`, apply fewer at a time (`--session`), or raise the quota"
        )


def _run_sessions(
    executor: Executor,
    work: Sequence[actions.SessionPlan],
    concurrency: int,
    stop: StopFlag,
    reporter: Reporter,
    meanwhile: Callable[[Callable[[], bool]], None] | None = None,
    then: Callable[[SessionOutcome], None] | None = None,
) -> list[SessionOutcome]:
    """Run the sessions' plans on up to `concurrency` worker threads; their outcomes in order.
    `meanwhile(done)` runs on this thread while they work (`done()`: all of them ended).

    Ctrl-C reaches only the main thread, waiting here: it says at once what it stops, sets
    `stop` (a command in flight is stopped: signal, grace period, kill; no new action starts)
    and waits for the workers to journal it. A second Ctrl-C propagates at once: the workers
    are daemon threads, so nothing waits for them on the way out.
    """
    if (
        len(work) == 1
        and meanwhile is None
        and threading.current_thread() is not threading.main_thread()
    ):
        # no Ctrl-C arrives on this thread (a watch pass): nothing to wait for a worker with,
        # and a thread start is a scheduling delay before an edit's push on a loaded machine
        return [executor.run_session(work[0])]
    futures: list[Future[SessionOutcome]] = [Future() for _ in work]
    queue = list(zip(work, futures, strict=True))
    queue.reverse()
    take = threading.Lock()

    def worker() -> None:
        while True:
            with take:
                if not queue:
                    return
                splan, future = queue.pop()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                outcome = executor.run_session(splan)
                if then is not None:
                    then(outcome)
                future.set_result(outcome)
            except BaseException as err:  # handed to the waiting main thread
                future.set_exception(err)

    # why more threads than the concurrency: a session waiting for its instance to boot gives
    # its slot (`Executor.slots`) to the next; the slots, not the threads, bound the work
    threads = max(1, concurrency) if executor.slots is None else SESSION_THREADS_MAX
    for _ in range(min(threads, len(work))):
        threading.Thread(target=worker, name="ukc-session", daemon=True).start()
    try:
        if meanwhile is not None:
            meanwhile(lambda: all(f.done() for f in futures))
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        stop.set()
        _say_interrupt(executor, reporter)
    try:
        return [f.result() for f in futures]
    except KeyboardInterrupt:
        reporter.event(Event("ukc", "interrupt", "interrupt: quitting now (second Ctrl-C)"))
        raise  # journaled on the way out (`_UnfinishedOnInterrupt`)


def _say_interrupt(executor: Executor, reporter: Reporter) -> None:
    with executor.doc_lock:
        in_flight = dict(executor.in_flight)
    if not in_flight:
        reporter.event(Event("ukc", "interrupt", "interrupt: stopping (Ctrl-C again to quit now)"))
    for session, action in sorted(in_flight.items()):
        if isinstance(action, actions.RunCommand):
            what = f"stopping command {action.name!r} in session {session}"
        else:
            what = f"finishing {action.describe()} in session {session}, then stopping"
        text = f"interrupt: {what}… (Ctrl-C again to quit now)"
        reporter.event(Event(session, "interrupt", text))


def _wake_for_work(
    plan: actions.Plan,
    obs: Observation,
    metros: MetroRegistry,
    reporter: Reporter,
    concurrency: int,
) -> bool:
    """Wake the instances in standby the plan has work for (a start, then until they run),
    before it is made again: then the planner sees the instance as it woke (a stateful wake
    that moved `start_count` is told from a cold boot by its boot marker, not mid-action).
    `obs` is updated with what woke; True when one did."""
    todo = [
        (splan.session, act.instance_name)
        for splan in plan.sessions
        for act in splan.actions
        if isinstance(act, actions.WaitReady) and act.wake
    ]

    def one(item: tuple[str, str]) -> tuple[str, Instance] | None:
        session, name = item
        inst = obs.instances.get(name)
        ctx = obs.contexts.get(session)
        if inst is None or ctx is None:
            return None
        try:
            woken = wake(metros.get(ctx.desired.metro).api, inst)
        except errors.UkcError as err:
            # the executor tries again when it gets there (and fails the session then)
            reporter.event(Event(session, "info", f"instance {name} not woken yet: {err}"))
            return None
        reporter.event(Event(session, "info", f"woke instance {name} from standby"))
        return session, woken

    woke = [w for w in each(todo, one, concurrency=concurrency, name="ukc-wake") if w]
    for session, inst in woke:
        obs.woke(session, inst)
    return bool(woke)


def _greet(
    exits: contextlib.ExitStack, group: Group, pool: TransportPool, only: set[str] | None
) -> None:
    """Say hello now to the sync helpers the last pushes left running on kept connections
    (a watch's next pass): the answers travel while this pass observes and plans. Answers no
    push read are read when `exits` closes (before the status lock is released)."""
    for loaded in group.sessions:
        if only is not None and loaded.spec.name not in only:
            continue
        held = pool.peek(loaded.spec.name)
        if held is None:
            continue
        uuid, shell = held
        with contextlib.suppress(errors.UkcError, OSError):
            if sync_engine.greet(shell, sync_options_for(group, loaded), uuid):
                exits.callback(sync_engine.ungreet, shell)


def _prefetcher(
    group: Group,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    owner: identity.Owner,
) -> Callable[[str, str, str, Instance, SyncOptions], None]:
    """The observer's hint → a connection opened in the background for the push to come, its
    sync helper started over it."""

    def prefetch(
        session: str, transport: str, metro: str, inst: Instance, opts: SyncOptions
    ) -> None:
        if pool.peek(session) is not None:
            return  # a connection is kept (a watch's next pass): the same answer, sooner
        rec = doc.sessions.get(session)
        known = rec.instance if rec is not None else None
        # why only a known pin: a first connection records it, and that is the executor's job
        # (it journals the instance it adopts at the same time)
        pin = identity.boot_pin(known, inst)
        if not pin:
            return
        kind = select.kind_for(identity.instance_transport(inst, transport))
        target = target_for(inst, metros.get(metro))
        credentials = instance_credentials(group, session, owner, inst)

        link = links.key_for(
            session=session,
            status_path=group.status_path,
            uuid=inst.uuid,
            start_count=inst.start_count,
            pin=pin,
            key_path=credentials.path,
            fqdn=inst.fqdn,
            kind=kind.name,
        )

        def opener() -> Transport:
            # the connection an earlier command kept (the warm process's), else a new one
            conn = links.borrow(link) or kind.reopen(target, credentials, pin=pin)
            # the push's helper starts in the sandbox while this side scans and plans
            sync_engine.start_ahead(conn, opts, instance_uuid=inst.uuid)
            return conn

        pool.prefetch(session, inst.uuid, opener, link if links.lender() else None)

    return prefetch


def _finalize(
    group: Group,
    doc: StatusDoc,
    obs: Observation,
    failed: Mapping[str, str],
    reporter: Reporter,
    ran: set[tuple[str, str]],
    pending: AbstractSet[str] = frozenset(),
    interrupted: AbstractSet[str] = frozenset(),
    suspended: AbstractSet[str] = frozenset(),
) -> None:
    """Record the converged state of every desired session (and when this apply ran)."""
    before = doc.model_dump(mode="json", exclude={"updated_at"})
    now = journal.utc_now()
    for desired in obs.desired:
        name = desired.name
        rec = doc.sessions.setdefault(name, SessionStatus())
        rec.spec_hash = desired.spec_hash
        rec.observed_generation = desired.spec_hash
        rec.spec_file = str(obs.contexts[name].loaded.file)
        rec.metro = desired.metro
        rec.last_applied_at = now
        inst = obs.instances.get(desired.instance_name)
        if inst is not None and rec.instance is not None and rec.instance.uuid == inst.uuid:
            rec.instance.state = "standby" if name in suspended else inst.state
            rec.instance.fqdn = inst.fqdn
        created = parse_time(rec.created_at)
        if desired.ttl_s is not None and created is not None:
            rec.expires_at = expiry_time(created, desired.ttl_s)
        elif rec.phase != "Expired":
            rec.expires_at = None  # the spec dropped its ttl
        wanted = {c.name for c in desired.commands}
        for cmd in rec.commands:
            cmd.skipped = (name, cmd.name) not in ran
        order = {c.name: i for i, c in enumerate(desired.commands)}
        rec.commands = sorted(
            (c for c in rec.commands if c.name in wanted), key=lambda c: order[c.name]
        )
        if name in interrupted:
            continue  # the executor journaled what was stopped (phase Interrupted)
        if name in failed:
            if rec.phase != "Failed":
                rec.phase = "Failed"
                rec.message = failed[name]
                journal.set_condition(rec, "Ready", "False", "Failed", failed[name], now)
            continue
        if rec.phase in ("Expired", "Deleted") and inst is None:
            continue
        if name in pending:
            rec.phase = "Progressing"  # still changing; the next pass carries on
            continue
        rec.phase = "Ready"
        rec.message = ""
        rec.interruption = None
        journal.set_condition(rec, "InstanceReady", "True", "Running", "", now)
        journal.set_condition(rec, "Synced", "True", "Synced", "", now)
        journal.set_condition(rec, "CommandsSucceeded", "True", "Succeeded", "", now)
        journal.set_condition(rec, "Ready", "True", "Converged", "", now)
        reporter.event(Event(name, "done", "ready"))
    after = doc.model_dump(mode="json", exclude={"updated_at"})
    if after != before or not group.status_path.exists():
        doc.sessions = dict(sorted(doc.sessions.items()))
        journal.save(group.status_path, doc)


def delete_group(
    group: Group,
    *,
    metros: MetroRegistry,
    reporter: Reporter,
    environ: Mapping[str, str],
    lock_timeout_s: float = 0.0,
) -> bool:
    """Delete every session of `group`; True when all are gone."""
    with (
        journal.lock(group.status_path, timeout_s=lock_timeout_s),
        contextlib.ExitStack() as leases,
    ):
        doc = journal.load(group.status_path)
        # why nothing on a lost lease: deletes are one request each, by proven uuid
        _take_leases(leases, group, doc, metros, environ, reporter, lock_timeout_s, lambda: None)
        owner, salt = _identity(group, environ)
        # the volumes are listed here while the list's thread lists the instances: two round
        # trips at once, and the connection this thread opens for them is the one its deletes
        # then use (a thread of their own was a third connection to the metro)
        listing = start_listing(group, doc, metros, owner.project, None)
        try:
            volumes = observe_volumes(
                metros, owner.project, (metro_label(s.spec.metro) for s in group.sessions)
            )
        except KeyboardInterrupt:
            raise  # as `observe`: not held up by a list that may never answer
        except BaseException:
            listing.wait()
            raise
        # why no scan: a delete needs the sessions' names, not their trees (a big tree took
        # most of a `ukc delete`)
        obs = observe(
            group, doc, metros, environ, owner=owner, salt=salt, scan=False, listing=listing
        )
        triples = [(d.name, d.instance_name, d.metro) for d in obs.desired]
        the_plan = plan_delete(triples, obs.instances, doc, obs.owner, volumes)
        executor = Executor(
            group=group,
            doc=doc,
            observation=obs,
            metros=metros,
            reporter=reporter,
            doc_lock=threading.Lock(),
        )
        ok = True
        #: the document changed since the executor last wrote it (a session's run writes it
        #: whole: the file is written once per delete, not once per step)
        unsaved = False
        for splan in the_plan.sessions:
            if splan.refusal is not None:
                ok = False
                record = doc.sessions.setdefault(splan.session, SessionStatus())
                record.phase = "Failed"
                record.message = splan.refusal.reason
                reporter.event(Event(splan.session, "failed", splan.refusal.reason))
                unsaved = True
                continue
            if splan.actions:
                ok = executor.run_session(splan).ok and ok
                unsaved = False
                if ok:
                    reporter.event(Event(splan.session, "done", "deleted"))
                continue
            # Already gone in the cloud: finish the local half of the delete.
            desired = next(d for d in obs.desired if d.name == splan.session)
            gone = actions.DeleteInstance(
                splan.session, desired.instance_name, desired.metro, "already gone"
            )
            executor.forget_local(gone)
            unsaved = True
            reporter.event(Event(splan.session, "done", "already deleted"))
        if unsaved:
            journal.save(group.status_path, doc)
        return ok
