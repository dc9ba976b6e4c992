"""Fault knobs of the local metro: injected 429s, 5xxs, latency, edge drops, list lag and
instances being deleted read as live.

Set at runtime through `POST /_local/faults`. Every `/v1/` request takes its fault from
`take_api_fault()`, every accepted edge connection asks `take_edge_drop()`, a list answer
consults `hides()` / `list_answered()` to emulate an eventually consistent list, and an
instance read passes its items through `show_deleting_live()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from reconciler.errors import ApiError

__all__ = ["ApiFault", "Faults"]


@dataclass(frozen=True)
class ApiFault:
    """What to answer instead of the real response: HTTP status and, for 429, Retry-After."""

    status: int
    retry_after: int | None = None


def _count(value: object, knob: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ApiError(f"fault knob {knob} needs a count >= 0, got {value!r}", status=400)
    return value


class Faults:
    """Current fault settings; every knob counts down as it fires."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.rate_limit_count = 0
        self.retry_after = 1
        self.server_error_count = 0
        self.server_error_status = 503
        self.latency_ms = 0
        self.drop_edge_count = 0
        self.list_lag_count = 0
        # instances created with a sequence number above this are hidden while the lag lasts
        self.list_lag_after_seq: int | None = None
        self.deleting_live_count = 0

    def apply(self, body: dict[str, Any], *, current_seq: int) -> None:
        """Apply a `/_local/faults` body; unknown knobs are refused (a typo must not pass)."""
        known = {
            "rate_limit",
            "server_error",
            "latency_ms",
            "drop_edge",
            "list_lag",
            "deleting_live",
            "reset",
        }
        unknown = sorted(set(body) - known)
        if unknown:
            raise ApiError(f"unknown fault knobs: {', '.join(unknown)}", status=400)
        if body.get("reset"):
            self.reset()
        if "rate_limit" in body:
            rl = body["rate_limit"] or {}
            self.rate_limit_count = _count(rl.get("count", 1), "rate_limit.count")
            self.retry_after = _count(rl.get("retry_after", 1), "rate_limit.retry_after")
        if "server_error" in body:
            se = body["server_error"] or {}
            self.server_error_count = _count(se.get("count", 1), "server_error.count")
            status = se.get("status", 503)
            if not isinstance(status, int) or not 500 <= status <= 599:
                raise ApiError(f"server_error.status {status!r} is not 5xx", status=400)
            self.server_error_status = status
        if "latency_ms" in body:
            self.latency_ms = _count(body["latency_ms"], "latency_ms")
        if "drop_edge" in body:
            self.drop_edge_count = _count((body["drop_edge"] or {}).get("count", 1), "drop_edge")
        if "list_lag" in body:
            self.list_lag_count = _count((body["list_lag"] or {}).get("count", 1), "list_lag")
            self.list_lag_after_seq = current_seq if self.list_lag_count else None

        if "deleting_live" in body:
            self.deleting_live_count = _count(
                (body["deleting_live"] or {}).get("count", 1), "deleting_live.count"
            )

    def snapshot(self) -> dict[str, Any]:
        return {
            "rate_limit": {"count": self.rate_limit_count, "retry_after": self.retry_after},
            "server_error": {
                "count": self.server_error_count,
                "status": self.server_error_status,
            },
            "latency_ms": self.latency_ms,
            "drop_edge": {"count": self.drop_edge_count},
            "list_lag": {"count": self.list_lag_count},
            "deleting_live": {"count": self.deleting_live_count},
        }

    def take_api_fault(self) -> ApiFault | None:
        """The fault the next `/v1/` request suffers, if any (rate limits first)."""
        if self.rate_limit_count > 0:
            self.rate_limit_count -= 1
            return ApiFault(429, self.retry_after)
        if self.server_error_count > 0:
            self.server_error_count -= 1
            return ApiFault(self.server_error_status)
        return None

    def take_edge_drop(self) -> bool:
        """True when the edge must close the connection it just accepted."""
        if self.drop_edge_count > 0:
            self.drop_edge_count -= 1
            return True
        return False

    def hides(self, seq: int) -> bool:
        """Whether a list answer omits the instance created with this sequence number."""
        return (
            self.list_lag_count > 0
            and self.list_lag_after_seq is not None
            and seq > self.list_lag_after_seq
        )

    def list_answered(self) -> None:
        """One list answer went out: the lag shrinks by one."""
        if self.list_lag_count > 0:
            self.list_lag_count -= 1
            if self.list_lag_count == 0:
                self.list_lag_after_seq = None

    def show_deleting_live(self, items: list[dict[str, Any]]) -> None:
        """While the knob lasts (one count per read answer), an instance being deleted reads
        as `stopping`, as a platform that force-stops it first may report it, not `deleted`."""
        if self.deleting_live_count <= 0:
            return
        self.deleting_live_count -= 1
        for item in items:
            if item.get("state") == "deleted":
                item["state"] = "stopping"
                item.pop("retained_until", None)
