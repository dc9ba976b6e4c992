"""`GET /v1/users/quotas` as UKC answers it, and `/_local/quotas` to set the account's limits.

The hard values are the ones the metro enforces (item code 19 on a create or start past
them), so a client that checks the quota first meets the same numbers the refusal names.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from aiohttp import web

from reconciler.errors import ApiError
from reconciler.local.api.envelope import envelope_response, json_body, plain_response
from reconciler.local.api.keys import METRO
from reconciler.local.state.lifecycle import LocalMetro
from reconciler.local.state.quotas import quota_item

__all__ = ["add_routes"]

#: what `/_local/quotas` may set: the account's hard limit → (limits object, its field)
_SETTABLE = {
    "instances": ("metro", "max_instances"),
    "live_memory_mb": ("metro", "max_live_memory_mb"),
    "volumes": ("volumes", "max_volumes"),
}


def _hard(metro: LocalMetro) -> dict[str, int]:
    return {
        "instances": metro.limits.max_instances,
        "live_memory_mb": metro.limits.max_live_memory_mb,
        "volumes": metro.volumes.limits.max_volumes,
    }


def _item(metro: LocalMetro) -> dict[str, Any]:
    limits = {
        "min_memory_mb": metro.limits.min_memory_mb,
        "max_memory_mb": metro.limits.max_memory_mb,
        "min_volume_mb": metro.volumes.limits.min_volume_mb,
        "max_volume_mb": metro.volumes.limits.max_volume_mb,
        "min_vcpus": 1,
        "max_vcpus": 1,
    }
    return quota_item(
        metro.records.values(), metro.volumes.records.values(), hard=_hard(metro), limits=limits
    )


async def _quotas(request: web.Request) -> web.Response:
    return envelope_response(request, items=[_item(request.app[METRO])], key="quotas")


async def _local_quotas(request: web.Request) -> web.Response:
    """GET: the account's hard limits; POST `{instances?, live_memory_mb?, volumes?}` sets them
    (whole numbers >= 0; unknown keys are refused)."""
    metro = request.app[METRO]
    if request.method == "POST":
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError("quotas body must be a JSON object", status=400)
        unknown = sorted(set(body) - set(_SETTABLE))
        if unknown:
            raise ApiError(f"unknown quota {', '.join(unknown)}", status=400)
        for key, value in body.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ApiError(f"quota {key} needs a whole number >= 0", status=400)
        for key, value in body.items():
            where, field = _SETTABLE[key]
            if where == "metro":
                metro.limits = replace(metro.limits, **{field: value})
            else:
                metro.volumes.limits = replace(metro.volumes.limits, **{field: value})
    return plain_response(request, _hard(metro))


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/users/quotas", _quotas)
    router.add_get("/_local/quotas", _local_quotas)
    router.add_post("/_local/quotas", _local_quotas)
