"""The `/v1/volumes` routes: list, read, create and delete, as UKC answers them.

Items sit in `data.volumes`; a reference that names no volume is an error item with code 8,
a delete of a volume still attached to an instance one with code 24 (it cannot be used).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from reconciler.local.api.envelope import (
    answer_refs,
    bool_query,
    envelope_response,
    error_item,
    json_body,
    list_body,
    named_refs,
)
from reconciler.local.api.keys import METRO
from reconciler.local.state.lifecycle import LocalMetro
from reconciler.local.state.records import ItemError, LocalVolume

__all__ = ["add_routes"]

_KEY = "volumes"


def _item(metro: LocalMetro, vol: LocalVolume, details: bool) -> dict[str, Any]:
    owner = metro.records.get(vol.attached_to or "")
    mounted = owner is not None and owner.state in ("starting", "running", "draining")
    return metro.volumes.wire(vol, mounted, details)


async def _list(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    details = bool_query(request, "details", True)
    refs = await named_refs(request)
    if refs:
        items = answer_refs(refs, lambda ref: _item(metro, metro.volumes.lookup(ref), details))
        return envelope_response(request, items=items, key=_KEY)
    tags_raw = request.query.get("tags", "")
    vols = metro.volumes.select(tags_raw.split(",") if tags_raw else [])
    return envelope_response(request, items=[_item(metro, v, details) for v in vols], key=_KEY)


async def _get(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    ref = {"uuid": request.match_info["uuid"]}
    try:
        vol = metro.volumes.lookup(ref)
    except ItemError as exc:
        return envelope_response(request, items=[error_item(ref, exc)], key=_KEY)
    details = bool_query(request, "details", True)
    return envelope_response(request, items=[_item(metro, vol, details)], key=_KEY)


async def _create(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    body = await json_body(request)
    try:
        vol = metro.volumes.create(body)
    except ItemError as exc:
        if exc.status is not None:
            raise
        ref = {"name": body.get("name")} if isinstance(body, dict) else {}
        return envelope_response(request, items=[error_item(ref, exc)], key=_KEY, message=str(exc))
    item = {**vol.identity(), "status": "success", "state": "available", "size_mb": vol.size_mb}
    return envelope_response(request, items=[item], key=_KEY)


async def _delete(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    if "uuid" in request.match_info:
        refs: list[Any] = [{"uuid": request.match_info["uuid"]}]
    else:
        refs = await list_body(request)
    items: list[dict[str, Any]] = []
    for ref in refs:
        try:
            vol = metro.volumes.lookup(ref)
            metro.volumes.check_deletable(vol)
        except ItemError as exc:
            if exc.status is not None:
                raise
            items.append(error_item(ref, exc))
            continue
        await metro.delete_volume(vol)
        items.append({**vol.identity(), "status": "success"})
    return envelope_response(request, items=items, key=_KEY)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/v1/volumes", _list)
    router.add_post("/v1/volumes", _create)
    router.add_delete("/v1/volumes", _delete)
    router.add_get("/v1/volumes/{uuid}", _get)
    router.add_delete("/v1/volumes/{uuid}", _delete)
