"""The local metro's account quota: what it uses, its hard limits, and `GET /v1/users/quotas`.

The hard values are the limits the metro enforces (item code 19): `MetroLimits` for instances
and live memory, `VolumeLimits` for volumes. What is used is counted from the records: an
instance counts until it is deleted, and its memory is live while it is not `stopped`,
`standby` or `deleted` (UKC's docs: a stopped or scaled-to-zero instance consumes no live
quota).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from reconciler.local.state.records import CODE_QUOTA, ItemError, LocalInstance, LocalVolume

__all__ = ["ACCOUNT_UUID", "LIVE_STATES", "check_live_memory", "live_memory_mb", "quota_item"]

#: the one account of a local metro
ACCOUNT_UUID = "00000000-0000-4000-8000-00000000cafe"
#: the states in which an instance's memory counts against the live quota
LIVE_STATES = frozenset({"starting", "running", "draining", "stopping"})


def live_memory_mb(records: Iterable[LocalInstance], *, but: str | None = None) -> int:
    """The memory of the live instances (all but the one `but` names)."""
    return sum(r.memory_mb for r in records if r.state in LIVE_STATES and r.uuid != but)


def check_live_memory(records: Iterable[LocalInstance], rec_memory_mb: int, hard: int) -> None:
    """Refuse a boot (item code 19) that would take the live memory past `hard`."""
    used = live_memory_mb(records)
    if used + rec_memory_mb > hard:
        raise ItemError(
            f"live memory quota exceeded: {used} MiB in use + {rec_memory_mb} MiB of this "
            f"instance > {hard} MiB",
            code=CODE_QUOTA,
        )


def quota_item(
    records: Iterable[LocalInstance],
    volumes: Iterable[LocalVolume],
    *,
    hard: dict[str, int],
    limits: dict[str, int],
) -> dict[str, Any]:
    """The one item of `data.quotas`: `used`, `hard` and `limits` as UKC answers them."""
    every = list(records)
    live = [r for r in every if r.state != "deleted"]
    vols = list(volumes)
    running = [r for r in live if r.state in LIVE_STATES]
    used = {
        "instances": len(every),
        "live_instances": len(running),
        "live_vcpus": sum(r.vcpus for r in running),
        "live_memory_mb": sum(r.memory_mb for r in running),
        "service_groups": sum(1 for r in live if r.service_group_uuid is not None),
        "services": sum(len(r.services) for r in live),
        "volumes": len(vols),
        "total_volume_mb": sum(v.size_mb for v in vols),
    }
    return {
        "status": "success",
        "uuid": ACCOUNT_UUID,
        "used": used,
        "hard": dict(hard),
        "limits": dict(limits),
    }
