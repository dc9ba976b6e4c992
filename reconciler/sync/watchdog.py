"""`Watchdog`: ends a push or pull whose helper stalls, or that outlives its deadline.

Every blocking call on the helper's channel (starting it, reading its answers, writing its
input) is stamped with `since`; when such a call fails, `expired` says whether the watchdog
ended it, and the session reports a `SyncStalledError` naming the seconds.

why a thread rather than transport timeouts: each transport blocks in its own way (a paramiko
channel waiting for window or data, a pipe in the kernel, a fake in a test), and a sandbox can
stall any of them. Killing the process (closing its channel) unblocks all of them, and closing
the whole connection unblocks even a transport stuck in a socket write; the watchdog also
enforces the session's overall deadline. The blocking calls pay one clock read each.

One thread looks after every watchdog of the process (`_Monitor`), started once: a watch pushes
every edit through a new session, and a thread started per push was a scheduling delay on the
way to the sandbox on a loaded machine (the starter waits for the new thread to run). The
kill, the grace and the escalation run on a thread of their own, started only when a session
is stopped, so a kill that blocks never holds up the other watchdogs.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator

from reconciler.errors import SyncStalledError

__all__ = ["Watchdog"]

#: after killing the helper, how long a blocked call may take to notice before the whole
#: connection is closed under it
_GRACE_S = 5.0


class Watchdog:
    """Kills a helper session blocked for `idle_s` on one call, or running past `total_s`.

    `name` says what runs ("sync-back of session 'web'"), `after` what the stop leaves
    behind; both end up in `expired`, the one-line reason, set before `kill` is called.
    """

    def __init__(
        self,
        *,
        name: str,
        after: str,
        idle_s: float,
        total_s: float,
        kill: Callable[[], None],
        escalate: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._after = after
        self._idle = float(idle_s)
        self._total = float(total_s)
        self._deadline = clock() + self._total
        self._kill = kill
        self._escalate = escalate
        self._clock = clock
        #: clock reading when the blocking call in progress began; 0.0 when none is
        self.since = 0.0
        #: what the call in progress waits for: "answer" or "read its input"
        self.waiting_for = "answer"
        #: why the session was stopped, once it was
        self.expired: str | None = None
        self._stop = threading.Event()
        _MONITOR.add(self)

    def stop(self) -> None:
        self._stop.set()
        _MONITOR.remove(self)

    @contextlib.contextmanager
    def call(self, waiting_for: str = "answer") -> Iterator[None]:
        """One blocking call on the helper's channel, stamped while it runs; when it fails
        because the watchdog ended it, a `SyncStalledError` saying why."""
        self.waiting_for = waiting_for
        self.since = time.monotonic()
        try:
            yield
        except Exception:
            if self.expired is not None:
                raise SyncStalledError(self.expired) from None
            raise
        finally:
            self.since = 0.0

    def _look(self) -> float | None:
        """The monitor's look: None once the session must be stopped (`expired` says why),
        else when to look again (this watchdog's clock)."""
        now = self._clock()
        since = self.since
        if now >= self._deadline:
            self.expired = (
                f"{self._name} did not finish within {self._total:g} s (sync.timeout); "
                f"stopped, {self._after}"
            )
            return None
        if since and now - since >= self._idle:
            self.expired = (
                f"{self._name}: the sync helper in the sandbox did not "
                f"{self.waiting_for} for {self._idle:g} s (sync.idle_timeout); "
                f"stopped, {self._after}"
            )
            return None
        # why no notification from the hot path: `since` is a plain attribute; looking at
        # most `idle` after our last look still catches a call begun meanwhile
        return min(self._deadline, (since or now) + self._idle)

    def _first_look(self) -> float:
        return min(self._deadline, self._clock() + self._idle)

    def _expire(self) -> None:
        """Stop the session (on a thread of its own): kill the helper, then close the
        connection if the blocked call does not notice within the grace."""
        blocked = self.since
        self._kill()
        if self._stop.wait(_GRACE_S):
            return
        if blocked and self.since == blocked:
            self._escalate()  # the transport itself is stuck: close the connection


class _Monitor:
    """The one thread that looks at every running watchdog when one of them is due."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._dogs: set[Watchdog] = set()
        self._thread: threading.Thread | None = None
        #: when the monitor looks next (None: it waits for a watchdog)
        self._next: float | None = None

    def forget(self) -> None:
        """After a fork: the child has none of its parent's threads (nor their sessions)."""
        self._cond = threading.Condition()
        self._dogs = set()
        self._thread = None
        self._next = None

    def add(self, dog: Watchdog) -> None:
        with self._cond:
            self._dogs.add(dog)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="ukc-sync-watchdog", daemon=True
                )
                self._thread.start()
            elif self._next is None or dog._first_look() < self._next:
                # (a monitor due sooner anyway is not woken: one look covers every watchdog)
                self._cond.notify()

    def remove(self, dog: Watchdog) -> None:
        with self._cond:
            self._dogs.discard(dog)

    def _run(self) -> None:
        with self._cond:
            while True:
                now = time.monotonic()
                due: float | None = None
                for dog in list(self._dogs):
                    at = dog._look()
                    if at is None:
                        self._dogs.discard(dog)
                        threading.Thread(
                            target=dog._expire, name="ukc-sync-watchdog-stop", daemon=True
                        ).start()
                        continue
                    wait = at - dog._clock()
                    due = now + wait if due is None else min(due, now + wait)
                if due is None and self._next is not None:
                    # no watchdog: keep the last cadence, so the next one to come usually
                    # needs no wake-up (it is looked at within its idle time anyway)
                    due = self._next if self._next > now else None
                self._next = due
                self._cond.wait(None if due is None else max(0.01, due - now))


_MONITOR = _Monitor()
os.register_at_fork(after_in_child=_MONITOR.forget)  # the warm process's commands
