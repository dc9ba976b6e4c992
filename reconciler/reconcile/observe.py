"""The observer: reads the world (cloud instances, local trees, secrets) for the planner.

Reads only: never mutates anything remote, and writes nothing locally but the sync engine's
hash cache. One paginated, tag-filtered list per metro per pass, never one request per
session. Local trees are scanned with the hash cache so unchanged files are never re-hashed.
Everything the pure planner needs comes out of here as plain values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from reconciler import errors
from reconciler._util.threads import KeptThreads
from reconciler.cloud.metros import MetroRegistry, metro_label
from reconciler.cloud.model import Instance, Volume
from reconciler.cloud.quotas import Quota
from reconciler.reconcile import identity
from reconciler.reconcile.desired import (
    DesiredSession,
    Group,
    SessionContext,
    build_session,
    sync_options_for,
    transport_of,
)
from reconciler.spec.loader import LoadedSession
from reconciler.status.schema import StatusDoc
from reconciler.sync import engine as sync_engine
from reconciler.sync.manifest import halt_in_sight
from reconciler.sync.options import SyncOptions

__all__ = [
    "Listing",
    "Observation",
    "answered_listing",
    "observe",
    "observe_quotas",
    "observe_volumes",
    "scan_ahead",
    "start_listing",
]


@dataclass
class Observation:
    project: str
    #: this checkout as an owner (the planner proves ownership against it)
    owner: identity.Owner
    desired: list[DesiredSession]
    contexts: dict[str, SessionContext]
    #: instances carrying the project's tags, by instance name (claims, not proofs)
    instances: dict[str, Instance]
    #: the same, by the session their tags name
    claimed: dict[str, Instance]
    #: sessions whose tree cannot be synced, with the reason
    halted: dict[str, str]
    #: uuids of instances still listed that this checkout's status records as deleted: on
    #: their way out (a delete does not wait for the name), never claimed by a session
    dying: frozenset[str] = frozenset()
    #: False: the list was not waited for (the apply's first look plans from the records'
    #: word): no instance is known, and `dying` holds every uuid the records say was deleted
    listed: bool = True

    def woke(self, session: str, inst: Instance) -> None:
        """`session`'s instance as it runs once woken: what the next plan sees."""
        self.instances[inst.name] = inst
        self.claimed[session] = inst


def observe(
    group: Group,
    doc: StatusDoc,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    *,
    only: set[str] | None = None,
    owner: identity.Owner,
    salt: bytes,
    on_tree_changed: Callable[[str, str, str, Instance, SyncOptions], None] | None = None,
    scan: bool = True,
    glance: bool = False,
    listing: Listing | None = None,
    listed: bool = True,
) -> Observation:
    """List owned instances (one list per metro in use) while the local trees are scanned
    (not without `scan`: a delete reads nothing of them; with `glance`, the trees are only
    looked at for what a scan could halt on, `TreeState.halted`).

    why at once: the list is a round trip to the platform and the scan local work; one after
    the other they were most of the time from an edit to its push (`ukc watch`).

    `on_tree_changed(session, transport, metro, instance, sync options)` is called as soon as
    a session's tree is seen to differ from the last push and the list shows its instance
    running (whichever of the two comes last): the apply loop opens the connection the push
    will need meanwhile (and starts its sync helper). A hint only; nothing observed depends
    on it.

    `listing`: the list of this observation, started by `start_listing` with the same
    arguments (the caller started it as soon as it held the status lock).

    Without `listed` the list is not waited for (it goes on for a later observation): the
    sessions are built as if no instance were listed (`Observation.listed`).
    """
    project = owner.project
    wanted = _wanted(group, only)
    if listing is None:
        listing = start_listing(group, doc, metros, project, only)
    hints = {
        loaded.spec.name: _Hint(group, loaded, owner, doc, listing, on_tree_changed)
        for loaded in wanted
        if on_tree_changed is not None
    }
    listing.tell(list(hints.values()))
    contexts: dict[str, SessionContext] = {}
    halted: dict[str, str] = {}
    try:
        for loaded in wanted:
            name = loaded.spec.name
            hint = hints.get(name)
            ctx, why = build_session(
                group,
                loaded,
                owner,
                environ,
                salt,
                hint.changed if hint is not None else None,
                (
                    functools.partial(listing.named, identity.instance_name(project, name))
                    if listed
                    else _unlisted
                ),
                scan=scan,
            )
            if glance and not scan:
                why = halt_in_sight(ctx.sync_options)
                if why is not None:
                    tree = dataclasses.replace(ctx.desired.tree, halted=why)
                    ctx.desired = dataclasses.replace(ctx.desired, tree=tree)
            contexts[name] = ctx
            if why is not None:
                halted[name] = why
    except KeyboardInterrupt:
        raise  # not held up by a list that may never answer: it ends with the process
    except BaseException:
        listing.wait()
        raise
    if not listed:
        return Observation(
            project=project,
            owner=owner,
            desired=[c.desired for c in contexts.values()],
            contexts=contexts,
            instances={},
            claimed={},
            halted=halted,
            dying=listing.recorded_deleted,
            listed=False,
        )
    instances, claimed, _metro_of, dying = listing.result()
    listing.hinted()
    return Observation(
        project=project,
        owner=owner,
        desired=[c.desired for c in contexts.values()],
        contexts=contexts,
        instances=instances,
        claimed=claimed,
        halted=halted,
        dying=dying,
    )


def _unlisted() -> Instance | None:
    return None


def scan_ahead(
    group: Group,
    only: set[str] | None = None,
    *,
    until: Callable[[], bool] = lambda: False,
    ahead: sync_engine.DigestsAhead | None = None,
    scanned: Callable[[], None] = lambda: None,
) -> None:
    """Scan the sessions' trees for an observation to come, whose own scan then re-stats
    only what changed since (the apply's change feeds); then, until `until()` (the sessions'
    sandboxes answer), digest into `ahead` the big files their first push digests as it
    sends them (the pushes given `ahead` take them).
    Reads only (the index is appended to); a scan that fails is that observation's to
    report: it scans again. `scanned()` is called once every tree was scanned (before the
    digests), whether or not the scans failed."""
    found: list[tuple[SyncOptions, list[tuple[str, int, int]]]] = []
    for loaded in group.sessions:
        if only is None or loaded.spec.name in only:
            opts = sync_options_for(group, loaded)
            with contextlib.suppress(Exception):
                manifest = sync_engine.scan_local(opts)
                if ahead is not None:
                    found.append((opts, _big_files(manifest, until)))
    scanned()
    if ahead is not None:
        with contextlib.suppress(Exception):
            sync_engine.digest_ahead(ahead, found, until)


def _big_files(
    manifest: sync_engine.Manifest, until: Callable[[], bool]
) -> list[tuple[str, int, int]]:
    """The big files of a scanned tree (only their names are kept, not the tree); none when
    the sandboxes answer already (a long scan)."""
    return [] if until() else sync_engine.big_files(manifest)


def start_listing(
    group: Group, doc: StatusDoc, metros: MetroRegistry, project: str, only: set[str] | None
) -> Listing:
    """Start listing the instances an `observe` of the same arguments would list."""
    listing = Listing(group, doc, metros, project, _wanted(group, only))
    listing.start()
    return listing


def answered_listing(
    group: Group, doc: StatusDoc, metros: MetroRegistry, project: str, session: str, read: Instance
) -> Listing:
    """The list an `observe` of `session` alone takes when `read` is what the platform just
    answered for its instance (a wait until it was up): ended, and never sent."""
    wanted = _wanted(group, {session})
    listing = Listing(group, doc, metros, project, wanted)
    listing.answered(metro_label(wanted[0].spec.metro), read)
    return listing


def _wanted(group: Group, only: set[str] | None) -> list[LoadedSession]:
    return [loaded for loaded in group.sessions if only is None or loaded.spec.name in only]


#: what the list found: instances by name, by the session they claim, the metro of each
#: session, and the uuids of instances on their way out
_Found = tuple[dict[str, Instance], dict[str, Instance], dict[str, str], frozenset[str]]
#: ... as it is being filled
_Finding = tuple[dict[str, Instance], dict[str, Instance], dict[str, str], set[str]]


def _ended(found: _Finding) -> _Found:
    instances, claimed, metro_of, dying = found
    return instances, claimed, metro_of, frozenset(dying)


class Listing:
    """The instances of every metro the group uses, listed on a thread of its own."""

    def __init__(
        self,
        group: Group,
        doc: StatusDoc,
        metros: MetroRegistry,
        project: str,
        wanted: list[LoadedSession],
    ) -> None:
        self._group = group
        self._metros = metros
        self._project = project
        self._used = {metro_label(loaded.spec.metro) for loaded in wanted}
        self._recorded = {r.metro: name for name, r in doc.inventory().items() if r.metro}
        # why: a platform may still list an instance being deleted in another state than
        # `deleted` (it is force-stopped first); our own record of the delete says what it is
        self._deleted = {
            rec.instance.uuid
            for rec in doc.sessions.values()
            if rec.instance is not None and rec.instance.uuid and rec.instance.state == "deleted"
        }
        self._done = threading.Event()
        #: set once every hint heard the list ended (a hint given after `observe` returned
        #: would race the executor: it connects itself, then the hint's connection replaces
        #: the one it used)
        self._hinted = threading.Event()
        self._found: _Found | None = None
        self._error: BaseException | None = None
        self._hints: list[_Hint] = []
        self._hints_lock = threading.Lock()

    def start(self) -> None:
        _LIST_THREADS.run(self._run)

    @property
    def recorded_deleted(self) -> frozenset[str]:
        """The uuids the status file records as deleted (never adopted, listed or not)."""
        return frozenset(self._deleted)

    def tell(self, hints: list[_Hint]) -> None:
        """Tell `hints` when the list ends (one told after it ended learns it when its scan
        sees a change: `_Hint.changed`)."""
        with self._hints_lock:
            self._hints = hints

    def _run(self) -> None:
        try:
            self._found = self._list()
        except BaseException as err:  # handed to the observing thread
            self._error = err
        finally:
            self._done.set()
        try:
            with self._hints_lock:
                hints = self._hints
            for hint in hints:
                hint.listed()
        finally:
            self._hinted.set()

    def _list(self) -> _Found:
        found: _Finding = ({}, {}, {}, set())
        for metro in sorted(self._used | set(self._recorded)):
            try:
                conn = self._metros.get(metro)
            except errors.UsageError as err:
                if metro in self._used:
                    raise
                # why: a status file comes with the checkout; it names a metro, it does not
                # choose where the token goes
                raise errors.UsageError(
                    f"{self._group.status_path}: session {self._recorded[metro]!r} was "
                    f"recorded on a metro ukc will not use: {err}"
                ) from None
            self._sort(conn.api.list_instances([f"ukc.project={self._project}"]), metro, found)
        return _ended(found)

    def _sort(
        self,
        listed: Iterable[Instance],
        metro: str,
        found: _Finding,
    ) -> None:
        instances, claimed, metro_of, dying = found
        for inst in listed:
            session = identity.session_from_tags(inst.tags, self._project)
            if session is None:
                continue  # not even claimed by a session of this project
            if inst.uuid in self._deleted:
                dying.add(inst.uuid)
                continue
            instances[inst.name] = inst
            claimed[session] = inst
            metro_of[session] = metro

    def answered(self, metro: str, read: Instance) -> None:
        """End this list, unsent, with what a read of one instance on `metro` just found (the
        look of one session whose instance was just waited for until up: no list request)."""
        found: _Finding = ({}, {}, {}, set())
        self._sort([read], metro, found)
        self._found = _ended(found)
        self._done.set()
        self._hinted.set()

    def wait(self) -> None:
        self._done.wait()

    def hinted(self) -> None:
        """Wait until the hints the list's end gives were given."""
        self._hinted.wait()

    def result(self) -> _Found:
        """What the list found (waits for it); the list's error if it failed."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._found is not None
        return self._found

    def finished(self) -> bool:
        return self._done.is_set() and self._error is None

    def named(self, instance_name: str) -> Instance | None:
        return self.result()[0].get(instance_name)


#: the lists' threads: a watch lists on every pass, and a thread started per list was a
#: scheduling delay on every edit's way to its sandbox on a loaded machine
_LIST_THREADS = KeptThreads("ukc-list")


class _Hint:
    """One session's "tree changed" hint: given to the apply loop once the scan saw a change
    and the list showed the session's instance running and ours, whichever came last."""

    def __init__(
        self,
        group: Group,
        loaded: LoadedSession,
        owner: identity.Owner,
        doc: StatusDoc,
        listing: Listing,
        on_tree_changed: Callable[[str, str, str, Instance, SyncOptions], None] | None,
    ) -> None:
        self._loaded = loaded
        self._owner = owner
        self._record = doc.sessions.get(loaded.spec.name)
        self._listing = listing
        self._call = on_tree_changed
        self._opts = sync_options_for(group, loaded)
        self._lock = threading.Lock()
        self._seen = False
        self._given = False

    def changed(self) -> None:
        """The scan saw the tree differ (called on the scanning thread)."""
        with self._lock:
            self._seen = True
        if self._listing.finished():
            self._give()

    def listed(self) -> None:
        """The list ended (called on the listing's thread)."""
        with self._lock:
            seen = self._seen
        if seen and self._listing.finished():
            self._give()

    def _give(self) -> None:
        with self._lock:
            if self._given or self._call is None:
                return
            self._given = True
        name = self._loaded.spec.name
        _instances, claimed, metro_of, _dying = self._listing.result()
        mine = claimed.get(name)
        if (
            mine is not None
            and mine.state == "running"
            and identity.prove(
                mine, self._owner, name, self._record.instance if self._record else None
            ).ours
        ):
            self._call(name, transport_of(self._loaded), metro_of[name], mine, self._opts)


def observe_volumes(
    metros: MetroRegistry, project: str, labels: Iterable[str]
) -> dict[str, list[Volume]]:
    """The volumes carrying the project's tags on each metro in `labels`, by the session
    their tags claim (claims, not proofs)."""
    found: dict[str, list[Volume]] = {}
    for metro in sorted(set(labels)):
        for vol in metros.get(metro).api.list_volumes([f"ukc.project={project}"]):
            session = identity.session_from_tags(vol.tags, project)
            if session is not None:
                found.setdefault(session, []).append(vol)
    return found


def observe_quotas(
    metros: MetroRegistry, labels: Iterable[str]
) -> tuple[dict[str, Quota], list[str]]:
    """The account's quota on each metro in `labels`, and a warning for each metro whose
    quota could not be read (a missing or unreadable answer never stops an apply)."""
    found: dict[str, Quota] = {}
    warnings: list[str] = []
    for metro in sorted(set(labels)):
        try:
            found[metro] = metros.get(metro).api.get_quotas()
        except errors.UkcError as err:
            warnings.append(f"the quota of metro {metro} was not checked: {err}")
    return found, warnings
