"""The local metro's own routes under `/_local/`: status, fault knobs, behaviour, shutdown."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from aiohttp import web

from reconciler.errors import ApiError
from reconciler.local.api.envelope import json_body, plain_response
from reconciler.local.api.keys import FAULTS, METRO, SHUTDOWN, STATUS_EXTRA
from reconciler.local.behaviour import LOCAL_IMAGES

__all__ = ["add_routes"]


async def _status(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    states: dict[str, int] = {}
    for rec in metro.records.values():
        states[rec.state] = states.get(rec.state, 0) + 1
    data: dict[str, Any] = {
        "pid": os.getpid(),
        # live ones: a deleted instance the metro still retains is only in `states`
        "instances": sum(1 for r in metro.records.values() if r.state != "deleted"),
        "states": states,
        "app_domain": metro.app_domain,
        "faults": request.app[FAULTS].snapshot(),
        "behaviour": metro.behaviour.to_json(),
        "images": dict(LOCAL_IMAGES),
    }
    data.update(request.app[STATUS_EXTRA]())
    return plain_response(request, data)


async def _faults(request: web.Request) -> web.Response:
    body = await json_body(request)
    if not isinstance(body, dict):
        raise ApiError("faults body must be a JSON object", status=400)
    faults = request.app[FAULTS]
    faults.apply(body, current_seq=request.app[METRO].index.last_seq)
    return plain_response(request, faults.snapshot())


async def _behaviour(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    if request.method == "POST":
        body = await json_body(request)
        if not isinstance(body, dict):
            raise ApiError("behaviour body must be a JSON object", status=400)
        metro.behaviour = metro.behaviour.updated(body)
    return plain_response(request, metro.behaviour.to_json())


async def _shutdown(request: web.Request) -> web.Response:
    # why: answer first, then stop — the caller waits for the process to exit
    asyncio.get_running_loop().call_later(0.05, request.app[SHUTDOWN])
    return plain_response(request)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/_local/status", _status)
    router.add_post("/_local/faults", _faults)
    router.add_get("/_local/behaviour", _behaviour)
    router.add_post("/_local/behaviour", _behaviour)
    router.add_post("/_local/shutdown", _shutdown)
