"""`Watchdog`: ends a push or pull whose helper stalls, or that outlives its deadline.

Every blocking call on the helper's channel (starting it, reading its answers, writing its
input) is stamped with `since`; when such a call fails, `expired` says whether the watchdog
ended it, and the session reports a `SyncStalledError` naming the seconds.

why a thread rather than transport timeouts: each transport blocks in its own way (a paramiko
channel waiting for window or data, a pipe in the kernel, a fake in a test), and a sandbox can
stall any of them. Killing the process (closing its channel) unblocks all of them, and closing
the whole connection unblocks even a transport stuck in a socket write; one thread per helper
session also enforces the overall deadline. The blocking calls pay one clock read each.
"""

from __future__ import annotations

import contextlib
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
        self._thread = threading.Thread(target=self._run, name="ukc-sync-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

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

    def _run(self) -> None:
        while True:
            now = self._clock()
            since = self.since
            if now >= self._deadline:
                self.expired = (
                    f"{self._name} did not finish within {self._total:g} s (sync.timeout); "
                    f"stopped, {self._after}"
                )
            elif since and now - since >= self._idle:
                self.expired = (
                    f"{self._name}: the sync helper in the sandbox did not "
                    f"{self.waiting_for} for {self._idle:g} s (sync.idle_timeout); "
                    f"stopped, {self._after}"
                )
            else:
                # why no notification from the hot path: `since` is a plain attribute; waking
                # at most `idle` after our last look still catches a call begun meanwhile
                wake = min(self._deadline, (since or now) + self._idle)
                if self._stop.wait(max(0.01, wake - now)):
                    return
                continue
            blocked = self.since
            self._kill()
            if self._stop.wait(_GRACE_S):
                return
            if blocked and self.since == blocked:
                self._escalate()  # the transport itself is stuck: close the connection
            return
