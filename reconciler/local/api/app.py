"""The aiohttp application of one local metro, and what every request goes through first.

It speaks UKC's wire protocol (envelope, per-item error codes, bodies on GET and DELETE)
closely enough that the official SDK cannot tell it apart, translating each request into calls
on the `LocalMetro`. Every route needs the bearer token; fault knobs apply to `/v1/` only.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from reconciler.errors import ApiError
from reconciler.local.api import admin, instances, plugins, quotas, volumes
from reconciler.local.api.envelope import envelope_response
from reconciler.local.api.keys import (
    FAULTS,
    METRO,
    SESSIONS,
    SHUTDOWN,
    STARTED,
    STATUS_EXTRA,
    TOKEN,
)
from reconciler.local.faults import Faults
from reconciler.local.state.lifecycle import LocalMetro

__all__ = ["create_app"]

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _authorized(request: web.Request) -> bool:
    auth = request.headers.get("Authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
    return bool(given) and hmac.compare_digest(given.encode(), request.app[TOKEN].encode())


async def _injected_fault(request: web.Request) -> web.Response | None:
    """The answer a fault knob gives instead of the route's, if one fires."""
    faults = request.app[FAULTS]
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    fault = faults.take_api_fault()
    if fault is None:
        return None
    if fault.status == 429:
        return envelope_response(
            request,
            http_status=429,
            message="rate limit exceeded",
            headers={"Retry-After": str(fault.retry_after or 1)},
        )
    return envelope_response(request, http_status=fault.status, message="injected server error")


@web.middleware
async def _middleware(request: web.Request, handler: _Handler) -> web.StreamResponse:
    request[STARTED] = time.perf_counter()
    try:
        if not _authorized(request):
            return envelope_response(
                request, http_status=401, message="missing or invalid bearer token"
            )
        if request.path.startswith("/v1/"):
            injected = await _injected_fault(request)
            if injected is not None:
                return injected
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return envelope_response(
            request,
            http_status=exc.status,
            message=f"{request.method} {request.path}: {exc.reason}",
        )
    except ApiError as exc:
        return envelope_response(request, http_status=exc.status or 400, message=str(exc))


def create_app(
    metro: LocalMetro,
    faults: Faults,
    token: str,
    *,
    shutdown: Callable[[], None],
    status_extra: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    """The aiohttp application of one local metro."""
    app = web.Application(middlewares=[_middleware], client_max_size=plugins.PLUGIN_MAX_BODY)
    app[METRO] = metro
    app[FAULTS] = faults
    app[TOKEN] = token
    app[SHUTDOWN] = shutdown
    app[STATUS_EXTRA] = status_extra or dict
    app[SESSIONS] = {}
    app.on_cleanup.append(plugins.close_sessions)
    plugins.add_routes(app.router)
    instances.add_routes(app.router)
    volumes.add_routes(app.router)
    quotas.add_routes(app.router)
    admin.add_routes(app.router)
    return app
