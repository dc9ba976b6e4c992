"""When an instance comes back by itself, and when it is put to sleep.

`RestartBackoff` is UKC's `restart_policy`: an instance that exits is started again after a
growing delay, which resets once it has run healthily for a while. `Activity` counts the
connections the TLS edge and the plugin proxy report, which decides scale-to-zero.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from reconciler.local.state.records import LocalInstance

__all__ = ["Activity", "RestartBackoff", "wants_restart"]

#: the delays between automatic restarts, reset after HEALTHY_RESET_S of running
RESTART_BACKOFF_S = (0.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
HEALTHY_RESET_S = 10.0
# why: pushed this far into the future, an instance just sent to standby is not sent twice
_SCHEDULED_S = 3600.0


def wants_restart(policy: str, *, failed: bool) -> bool:
    """Whether an instance whose app exited (`failed`: non-zero or out of memory) restarts."""
    return policy == "always" or (policy == "on-failure" and failed)


class RestartBackoff:
    """The restart attempts of each instance, and the delay before the next one."""

    def __init__(self) -> None:
        self._attempts: dict[str, int] = {}

    def next_delay(self, uuid: str, healthy_for_s: float) -> float:
        if healthy_for_s >= HEALTHY_RESET_S:
            self._attempts.pop(uuid, None)
        attempt = self._attempts.get(uuid, 0)
        self._attempts[uuid] = attempt + 1
        return RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S) - 1)]

    def reset(self, uuid: str) -> None:
        """A user start: the next exit begins the back-off anew."""
        self._attempts.pop(uuid, None)


class Activity:
    """Open connections and the time of the last one opened or closed, per instance."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._connections: dict[str, int] = {}
        self._last: dict[str, float] = {}

    def report(self, uuid: str, delta: int) -> None:
        """A connection opened (+1) or closed (-1)."""
        self._connections[uuid] = max(self._connections.get(uuid, 0) + delta, 0)
        self._last[uuid] = self._clock()

    def touch(self, uuid: str) -> None:
        """The instance (re)started running: its cooldown starts now."""
        self._last[uuid] = self._clock()

    def forget(self, uuid: str) -> None:
        self._connections.pop(uuid, None)
        self._last.pop(uuid, None)

    def idle_due(self, rec: LocalInstance) -> bool:
        """Whether a running instance with scale-to-zero has been idle for its cooldown.

        True at most once: the instance is then taken as scheduled for standby.
        """
        s2z = rec.scale_to_zero
        if not s2z or not s2z.get("enabled") or rec.state != "running":
            return False
        # why: the idle policy would count open-but-quiet connections as idle, but the edge
        # reports only connects and closes, so under both policies an open one is traffic
        if self._connections.get(rec.uuid, 0) > 0:
            return False
        now = self._clock()
        last = self._last.get(rec.uuid, now)
        if (now - last) * 1000 < int(s2z.get("cooldown_time_ms", 1000)):
            return False
        self._last[rec.uuid] = now + _SCHEDULED_S
        return True
