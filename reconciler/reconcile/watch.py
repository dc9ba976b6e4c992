"""`ukc watch`: keep sessions converged while files and specs change.

Events are only wake-ups (level-triggered): a file event marks its session dirty in the
`Coalescer`; when the session is due, one pass of the ordinary apply loop re-observes, re-plans
and converges it. Nothing in an event is trusted or replayed.

Timing: a session that was idle fires at once on its first event (leading edge, so one saved
file reaches the sandbox in milliseconds), unless that event says a file is still being
written (created or modified, its close not seen yet, and still empty when the event is read):
then it fires at the close, or after `OPEN_GRACE_S` (20 ms) for a file held open. why: the
first event of `open(O_TRUNC)` + write comes before the bytes; a pass that caught the empty
file waited a quiet window for the next.
Further events wait for a quiet window (150 ms) and at most `max_wait_s` (so a constant stream
of writes still syncs). One pass runs at a time
(the pass handles every due session together, concurrently inside), so a session never has
two passes in flight, and changes that arrive during a pass make exactly one follow-up pass.

Our own writes never wake us: `.ukc/` (status, records) and the declared `sync.back` paths
(where sync-back writes) are outputs, not inputs, and are ignored by construction; so are
paths the session's exclude rules drop. A periodic resync (default 30 s) catches drift (an
instance deleted, stopped, restarted or asleep). A session with a `ttl` gets a timer: at its
`expires_at` (from the status file, rewritten by every pass) a pass of that session runs, and
the planner, given the wall clock, deletes it.

The trees are watched through inotify directly (`sync.inotify.Trees`); only where there is
none, through the `watchdog` package, and only this module imports it.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from reconciler import errors
from reconciler._util.retry import RetryPolicy, poll
from reconciler.cloud.metros import MetroRegistry
from reconciler.reconcile.desired import Group, group_sessions, sync_options_for
from reconciler.reconcile.events import Event, Reporter
from reconciler.reconcile.loop import apply_group, delete_group
from reconciler.spec.loader import load_specs
from reconciler.status import journal
from reconciler.status.schema import StatusDoc, parse_time
from reconciler.sync import feed, inotify
from reconciler.sync.feed import ChangeFeed
from reconciler.sync.ignore import IgnoreRules, load_rules
from reconciler.transport.pool import TransportPool

__all__ = ["Coalescer", "WatchOptions", "Watcher", "expiries"]

#: quiet window after the leading edge: editors write temp + rename, tools write bursts
QUIET_S = 0.15
#: a constant stream of writes still syncs at least this often
MAX_WAIT_S = 2.0
#: the leading edge waits at most this long for a file being written to be closed: its first
#: event (the truncation of `open(O_TRUNC)`, a create) comes before its bytes
OPEN_GRACE_S = 0.02


class Coalescer:
    """Turns a stream of (key, time) notes into due keys. Pure: time is passed in."""

    def __init__(
        self,
        quiet_s: float = QUIET_S,
        max_wait_s: float = MAX_WAIT_S,
        open_grace_s: float = OPEN_GRACE_S,
    ) -> None:
        self.quiet_s = quiet_s
        self.max_wait_s = max_wait_s
        self.open_grace_s = open_grace_s
        self._first: dict[str, float] = {}
        self._last: dict[str, float] = {}
        self._immediate: set[str] = set()
        self._fired: dict[str, float] = {}
        #: key -> paths whose last event says they are still being written (not closed yet)
        self._writing: dict[str, set[str]] = {}

    def note(self, key: str, now: float, path: str = "", *, writing: bool = False) -> None:
        """`writing`: the event says `path` is being written (created or modified, not yet
        closed); a later note of the same path without it says the write ended."""
        if path:
            if writing:
                self._writing.setdefault(key, set()).add(path)
            elif key in self._writing:
                self._writing[key].discard(path)
        if key not in self._first:
            self._first[key] = now
            fired = self._fired.get(key)
            if fired is None or now - fired >= self.quiet_s:
                # Idle until now: fire on the leading edge.
                self._immediate.add(key)
        self._last[key] = now

    def pending(self) -> set[str]:
        return set(self._first)

    def due(self, now: float) -> set[str]:
        """Keys to act on now; they are forgotten until noted again."""
        ready = {
            k
            for k in self._first
            if (k in self._immediate and self._settled(k, now))
            or now - self._last[k] >= self.quiet_s
            or now - self._first[k] >= self.max_wait_s
        }
        for k in ready:
            self._first.pop(k, None)
            self._last.pop(k, None)
            self._immediate.discard(k)
            self._writing.pop(k, None)
            self._fired[k] = now
        return ready

    def flush(self, now: float) -> set[str]:
        """Every pending key, due now (a pass covering every session is starting); they are
        forgotten as `due` forgets them. why not `due` at a later time: it would record them
        fired then, and an edit before that time would wait a quiet window, not fire at once."""
        ready = set(self._first)
        self._first.clear()
        self._last.clear()
        self._immediate.clear()
        self._writing.clear()
        for k in ready:
            self._fired[k] = now
        return ready

    def _settled(self, key: str, now: float) -> bool:
        """The leading edge may fire: no file of `key` is still being written, or the grace
        for its close has passed (a file held open is sent as it is, then again later)."""
        return not self._writing.get(key) or now - self._first[key] >= self.open_grace_s

    def next_deadline(self) -> float | None:
        """When the next key becomes due (None when nothing is pending)."""
        if not self._first:
            return None
        return min(
            (
                self._first[k] + (0.0 if not self._writing.get(k) else self.open_grace_s)
                if k in self._immediate
                else min(self._last[k] + self.quiet_s, self._first[k] + self.max_wait_s)
            )
            for k in self._first
        )


def expiries(docs: Iterable[StatusDoc], names: Collection[str]) -> dict[str, float]:
    """When each of the `names` whose instance still exists reaches its ttl (wall clock)."""
    found: dict[str, float] = {}
    for doc in docs:
        for name, rec in doc.sessions.items():
            at = parse_time(rec.expires_at)
            if (
                name in names
                and at is not None
                and rec.instance is not None
                and rec.phase not in ("Deleted", "Expired")
            ):
                found[name] = at
    return found


@dataclass
class WatchOptions:
    paths: Sequence[Path]
    prune: bool = False
    down: bool = False
    resync_s: float = 30.0
    concurrency: int = 8
    quiet_s: float = QUIET_S
    max_wait_s: float = MAX_WAIT_S


@dataclass
class _SessionPaths:
    name: str
    root: Path
    back: tuple[str, ...]
    matcher: Callable[[str, bool], bool]
    #: where the paths this session's events name go: its scans re-stat only those
    changes: ChangeFeed | None = None
    state_dir: Path | None = None


@dataclass
class _State:
    groups: list[Group] = field(default_factory=list)
    sessions: dict[str, _SessionPaths] = field(default_factory=dict)
    spec_files: set[Path] = field(default_factory=set)
    spec_dirs: set[Path] = field(default_factory=set)


class Watcher:
    """The watch loop. `run()` blocks until `stop()` (or a signal) and returns an exit code."""

    def __init__(
        self,
        options: WatchOptions,
        *,
        metros: MetroRegistry,
        reporter: Reporter,
        environ: Mapping[str, str],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.options = options
        self.metros = metros
        self.reporter = reporter
        self.environ = environ
        self.clock = clock
        #: the wall clock: ttl expiry times are wall times (and the planner is given it)
        self.wall = wall
        #: session → when its ttl passes (wall clock), as the last pass left the status file
        self._expiry: dict[str, float] = {}
        #: (session, expiry) pairs whose timer fired: once each, so a platform clock behind
        #: ours cannot make a loop of passes (the periodic resync deletes it then)
        self._expiry_fired: set[tuple[str, float]] = set()
        self.coalescer = Coalescer(options.quiet_s, options.max_wait_s)
        self.pool = TransportPool()
        self.passes = 0
        #: changed paths, each with whether its event says it is still being written
        self._events: queue.Queue[tuple[Path, bool] | None] = queue.Queue()
        self._stop = threading.Event()
        self._busy = threading.Event()
        #: the passes to run, in order, and the thread that runs them (None: ends it)
        self._passes: queue.Queue[tuple[set[str] | None, bool] | None] = queue.Queue()
        self._passer: threading.Thread | None = None
        self._spec_dirty = False
        #: the last spec reload failed: the next good one says so (clears the header)
        self._reload_failed = False
        self._state = _State()
        self._observer: Any = None
        #: the trees watched through inotify directly (`watchdog` only where there is none)
        self._native = True
        self._trees: inotify.Trees | None = None
        self._overflowed = threading.Event()
        self._scheduled: set[Path] = set()
        self._last_ok = True

    # -- setup ---------------------------------------------------------------------------

    def _load(self) -> None:
        specset = load_specs(list(self.options.paths), self.environ)
        groups = group_sessions(specset.sessions)
        state = _State(groups=groups)
        group_of = {g.base_dir: g for g in groups}
        for loaded in specset.sessions:
            opts = sync_options_for(group_of[loaded.base_dir], loaded)
            try:
                rules = load_rules(opts)
            except errors.SyncHaltedError:
                # an unreadable .ukcignore: the pass reports it; watch with the spec's rules
                rules = IgnoreRules(opts.exclude, opts.back_paths())
            changes = feed.attach(opts.state_dir)
            changes.note_all()  # (re)loaded specs: the rules may differ, look at everything
            state.sessions[loaded.spec.name] = _SessionPaths(
                loaded.spec.name,
                loaded.directory,
                opts.back_paths(),
                rules.excluded,
                changes,
                opts.state_dir,
            )
            state.spec_files.add(loaded.file.resolve())
        for p in self.options.paths:
            rp = p.resolve()
            state.spec_dirs.add(rp if rp.is_dir() else rp.parent)
            if rp.is_file():
                state.spec_files.add(rp)
        self._state = state

    def _schedule(self) -> None:
        if self._native and self._trees is None:
            events = self._events
            self._trees = inotify.Trees.open(
                lambda path, writing: events.put((Path(path), writing)), self._lost
            )
        if self._trees is None:
            self._schedule_watchdog()
            return
        for directory, recursive in self._wanted().items():
            if directory not in self._scheduled:
                # a refused watch (the limit) is the same as watchdog's: that tree syncs at
                # the periodic resync
                self._trees.add(str(directory), recursive)
                self._scheduled.add(directory)

    def _schedule_watchdog(self) -> None:
        """Where there is no inotify: the `watchdog` package's observer."""
        from watchdog.events import (
            DirCreatedEvent,
            DirDeletedEvent,
            DirModifiedEvent,
            DirMovedEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers import Observer

        # why not opens and closes without a write: they change nothing, and asked for, the
        # kernel queues one for every read in the tree (a build's, a pass's own hashing and
        # sending), each waking the event thread while a pass runs
        wanted_events: list[type[FileSystemEvent]] = [
            FileCreatedEvent,
            DirCreatedEvent,
            FileDeletedEvent,
            DirDeletedEvent,
            FileMovedEvent,
            DirMovedEvent,
            FileModifiedEvent,
            DirModifiedEvent,
            FileClosedEvent,
        ]

        events = self._events

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                if event.is_directory and event.event_type == "modified":
                    # A directory's mtime moves whenever an entry inside it changes; the entry's
                    # own event already says what changed (and sync-back temp files would
                    # otherwise wake us through their parent).
                    return
                # a file created or modified is being written until its "closed" event (a
                # write opened with O_TRUNC is empty at its first event)
                writing = not event.is_directory and event.event_type in ("created", "modified")
                for raw in (event.src_path, getattr(event, "dest_path", "")):
                    if raw:
                        path = raw.decode() if isinstance(raw, bytes) else raw
                        events.put((Path(path), writing))

        if self._observer is None:
            obs = Observer()
            obs.start()
            self._observer = obs
        obs = self._observer
        handler = Handler()
        for directory, recursive in self._wanted().items():
            if directory in self._scheduled:
                continue
            with contextlib.suppress(OSError):
                obs.schedule(
                    handler, str(directory), recursive=recursive, event_filter=wanted_events
                )
                self._scheduled.add(directory)

    def _wanted(self) -> dict[Path, bool]:
        """The directories to watch, each with whether its subdirectories are watched too."""
        wanted: dict[Path, bool] = {d: False for d in self._state.spec_dirs}
        for s in self._state.sessions.values():
            if s.root.is_dir():
                wanted[s.root.resolve()] = True
        return wanted

    def _lost(self) -> None:
        """Events were lost (the kernel's queue overflowed): anything may have changed."""
        self._overflowed.set()
        self._events.put(None)

    def _recover_lost_events(self) -> None:
        """After `_lost`: every tree walks, and the specs are read again (a spec edit may be
        among what was lost), in the pass the reload starts."""
        self._overflowed.clear()
        self._spec_dirty = True
        for s in self._state.sessions.values():
            if s.changes is not None:
                s.changes.note_all()

    # -- classification ------------------------------------------------------------------

    def classify(self, path: Path) -> set[str]:
        """Sessions a changed path wakes (and notes spec changes). Pure apart from the state."""
        resolved = Path(os.path.abspath(path))
        woken: set[str] = set()
        if resolved in self._state.spec_files or (
            resolved.suffix in (".yaml", ".yml") and resolved.parent in self._state.spec_dirs
        ):
            self._spec_dirty = True
        for s in self._state.sessions.values():
            root = Path(os.path.abspath(s.root))
            try:
                rel = resolved.relative_to(root).as_posix()
            except ValueError:
                continue
            if rel == ".":
                woken.add(s.name)
                if s.changes is not None:
                    s.changes.note_all()
                continue
            if rel == ".ukc" or rel.startswith(".ukc/"):
                continue
            if any(rel == b or rel.startswith(b + "/") for b in s.back):
                continue  # sync-back writes here: outputs never trigger a pass
            is_dir = resolved.is_dir()
            if s.matcher(rel, is_dir):
                continue
            woken.add(s.name)
            if s.changes is not None:
                s.changes.note(rel)
        return woken

    def _note(self, path: Path, writing: bool) -> None:
        if writing:
            # still being written only if it is still empty (the truncation or create came,
            # its bytes not yet): one that already holds them is sent at once, not at its close
            try:
                writing = os.lstat(path).st_size == 0
            except OSError:
                writing = False
        for name in self.classify(path):
            self.coalescer.note(name, self.clock(), str(path), writing=writing)

    # -- passes --------------------------------------------------------------------------

    def _pass(self, sessions: set[str] | None, prune: bool) -> None:
        ok = True
        try:
            for group in self._state.groups:
                names = {s.spec.name for s in group.sessions}
                only = names if sessions is None else names & sessions
                if not only and not prune:
                    continue
                result = apply_group(
                    group,
                    metros=self.metros,
                    reporter=self.reporter,
                    environ=self.environ,
                    prune=prune and sessions is None,
                    concurrency=self.options.concurrency,
                    lock_timeout_s=60.0,
                    only=only if sessions is not None else None,
                    pool=self.pool,
                    raise_on_cap=False,
                    now=self.wall,
                )
                ok = ok and result.ok
        except errors.UkcError as err:
            ok = False
            self.reporter.event(Event("watch", "failed", str(err)))
        finally:
            self._read_expiries()
            self.passes += 1
            self._last_ok = ok
            which = "all" if sessions is None else ",".join(sorted(sessions))
            self.reporter.event(
                Event(
                    "watch",
                    "info",
                    f"pass {self.passes} done ({which}): {'ok' if ok else 'failed'}",
                )
            )
            self._busy.clear()
            self._events.put(None)  # wake the loop: pending changes may be due

    def _read_expiries(self) -> None:
        try:
            docs = [journal.load(g.status_path) for g in self._state.groups]
        except errors.UkcError:
            return  # an unreadable status file: the next pass reports it
        self._expiry = expiries(docs, set(self._state.sessions))

    def _expiry_wait(self, wall_now: float) -> float | None:
        """Seconds until the next ttl timer fires (None: no timer)."""
        waits = [
            at - wall_now for n, at in self._expiry.items() if (n, at) not in self._expiry_fired
        ]
        return max(0.0, min(waits)) if waits else None

    def _expired_now(self, wall_now: float) -> set[str]:
        due = {
            (n, at)
            for n, at in self._expiry.items()
            if wall_now >= at and (n, at) not in self._expiry_fired
        }
        self._expiry_fired |= due
        return {n for n, _ in due}

    def _start_pass(self, sessions: set[str] | None, prune: bool = False) -> None:
        self._busy.set()
        if self._passer is None:
            # one thread runs every pass: waking it is cheaper than starting a thread, a
            # scheduling delay on every edit's way to its sandbox on a loaded machine
            self._passer = threading.Thread(target=self._run_passes, name="ukc-pass", daemon=True)
            self._passer.start()
        self._passes.put((sessions, prune))

    def _run_passes(self) -> None:
        while True:
            job = self._passes.get()
            if job is None:
                return
            self._pass(*job)

    def _reload_specs(self) -> bool:
        self._spec_dirty = False
        before = set(self._state.sessions)
        try:
            self._load()
        except errors.UkcError as err:
            self._reload_failed = True
            self.reporter.event(Event("watch", "failed", f"spec not reloaded: {err}"))
            return False
        if self._reload_failed:
            # why: the header keeps the last event of its row; a fixed spec must replace the
            # "FAILED ... spec not reloaded" there, not only scroll past it
            self._reload_failed = False
            self.reporter.event(Event("watch", "done", "specs valid again: reloaded"))
        self._schedule()
        after = set(self._state.sessions)
        for name in sorted(after - before):
            self.reporter.event(Event(name, "info", "new session in the specs"))
        for name in sorted(before - after):
            what = "deleting (--prune)" if self.options.prune else "kept (no --prune)"
            self.reporter.event(Event(name, "info", f"session removed from the specs: {what}"))
        return True

    # -- main loop -----------------------------------------------------------------------

    def stop(self) -> None:
        self._stop.set()
        self._events.put(None)

    def run(self) -> int:
        self._load()
        self._schedule()
        self.reporter.event(Event("watch", "info", "converging before watching"))
        self._start_pass(None, prune=self.options.prune)
        next_resync = self.clock() + self.options.resync_s
        try:
            while not self._stop.is_set():
                now = self.clock()
                deadline = self.coalescer.next_deadline()
                wait = next_resync - now
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - now))
                # (during a pass the timer waits: the pass's end wakes this loop)
                expiry = None if self._busy.is_set() else self._expiry_wait(self.wall())
                if expiry is not None:
                    wait = min(wait, expiry)
                try:
                    item = self._events.get(timeout=max(0.0, wait))
                except queue.Empty:
                    item = None
                if item is not None:
                    self._note(*item)
                    # Drain what else arrived, so a burst is noted before anything fires.
                    while True:
                        try:
                            more = self._events.get_nowait()
                        except queue.Empty:
                            break
                        if more is not None:
                            self._note(*more)
                if self._overflowed.is_set():
                    self._recover_lost_events()
                if self._busy.is_set() or self._stop.is_set():
                    continue
                now = self.clock()
                if self._spec_dirty:
                    if self._reload_specs():
                        self._start_pass(None, prune=self.options.prune)
                        next_resync = now + self.options.resync_s
                    continue
                if now >= next_resync:
                    self.coalescer.flush(now)  # the resync covers them
                    for s in self._state.sessions.values():
                        if s.changes is not None:
                            s.changes.note_all()  # the resync walks: events may have been lost
                    self._start_pass(None, prune=self.options.prune)
                    next_resync = now + self.options.resync_s
                    continue
                expired = self._expired_now(self.wall())
                for name in sorted(expired):
                    self.reporter.event(Event(name, "info", "ttl passed: deleting the session"))
                due = self.coalescer.due(now) | expired
                if due:
                    self._start_pass(due)
        finally:
            # Let the running pass finish: it writes the status file and keeps sessions sane.
            poll(lambda _: None if self._busy.is_set() else True, policy=RetryPolicy.every(0.02))
            self._passes.put(None)
            if self._trees is not None:
                self._trees.stop()
            if self._observer is not None:
                obs = self._observer
                with contextlib.suppress(Exception):
                    obs.stop()
                    obs.join(2)
            self.pool.close()
            for s in self._state.sessions.values():
                if s.state_dir is not None:
                    feed.detach(s.state_dir)
            if self.options.down:
                self._down()
        return 0 if self._last_ok else 1

    def _down(self) -> None:
        for group in self._state.groups:
            try:
                delete_group(
                    group,
                    metros=self.metros,
                    reporter=self.reporter,
                    environ=self.environ,
                    lock_timeout_s=60.0,
                )
            except errors.UkcError as err:
                self.reporter.event(Event("watch", "failed", f"--down: {err}"))

    def install_signal_handlers(self) -> None:
        """First Ctrl-C/SIGTERM: stop after the running pass. Second: exit at once."""
        hits = {"n": 0}

        def handler(signum: int, frame: FrameType | None) -> None:
            hits["n"] += 1
            if hits["n"] > 1:
                os._exit(130)
            said = "stopping"
            if self._busy.is_set():
                said += ": finishing the running pass (Ctrl-C again quits)"
            self.reporter.event(Event("watch", "info", said))
            self.stop()

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
