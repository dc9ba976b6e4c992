"""The sandbox plugin route: `/v1/instances/{uuid}/plugins/sandbox/...`, relayed to the agent.

The agent answers on a unix socket the runtime made (`plugin_socket`). Like the real metro's
proxy, a request wakes a standby instance, counts as traffic for scale-to-zero, carries at most
2 MiB of body and is cut after 60 s (a 504 page, not an envelope). The answer is passed on
as it comes, never held whole.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
from aiohttp import web

from reconciler.local.api.envelope import envelope_response
from reconciler.local.api.keys import METRO, SESSIONS

__all__ = ["PLUGIN_MAX_BODY", "add_routes", "close_sessions"]

PLUGIN_TIMEOUT_S = 60.0
PLUGIN_MAX_BODY = 2 * 1024 * 1024 + 65536
_WAKE_TIMEOUT_S = 30.0
#: how much of the sandbox's answer the daemon holds at a time
_PIECE = 64 * 1024
_GATEWAY_TIMEOUT = "<html><body><h1>504 Gateway Time-out</h1></body></html>"


def _session(app: web.Application, socket: Path) -> aiohttp.ClientSession:
    sessions = app[SESSIONS]
    session = sessions.get(socket)
    if session is None or session.closed:
        # why: force_close — a restarted sandbox listens on a new socket under the same path,
        # so pooled keep-alive connections would point at a dead listener
        connector = aiohttp.UnixConnector(path=str(socket), force_close=True)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=PLUGIN_TIMEOUT_S),
            auto_decompress=False,
        )
        sessions[socket] = session
    return session


async def close_sessions(app: web.Application) -> None:
    for session in app[SESSIONS].values():
        await session.close()


async def _plugin(request: web.Request) -> web.StreamResponse:
    metro = request.app[METRO]
    uid = request.match_info["uuid"]
    plugin = request.match_info["plugin"]
    rec = metro.records.get(uid)
    if rec is None:
        return envelope_response(request, http_status=404, message=f"no instance with uuid '{uid}'")
    if plugin != "sandbox" or not rec.has_sandbox_plugin:
        return envelope_response(
            request, http_status=404, message=f"instance {rec.name} has no plugin {plugin!r}"
        )
    if rec.state in ("stopped", "stopping", "draining"):
        return envelope_response(
            request, http_status=503, message=f"instance {rec.name} is {rec.state}"
        )
    metro.on_activity(rec.uuid, +1)
    try:
        if rec.state != "running" and not await metro.ensure_running(rec, _WAKE_TIMEOUT_S):
            return envelope_response(
                request, http_status=503, message=f"instance {rec.name} is {rec.state}"
            )
        runtime = metro.runtime
        if runtime is None:
            return envelope_response(request, http_status=503, message="no sandbox runtime")
        socket = runtime.plugin_socket(rec.uuid)
        body = await request.read()
        if len(body) > PLUGIN_MAX_BODY:
            return envelope_response(
                request, http_status=413, message=f"plugin body of {len(body)} bytes is too large"
            )
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("range", "content-type")
        }
        url = "http://sandbox/" + request.match_info["path"]
        out: web.StreamResponse | None = None
        try:
            async with _session(request.app, socket).request(
                request.method, url, params=request.query, data=body, headers=headers
            ) as resp:
                # why streamed, a piece at a time: the answer comes from the sandbox (whoever
                # holds the plugin socket there), and read whole it was held in this daemon's
                # memory, outside the sandbox's limits: gigabytes from a 128 MiB sandbox
                first = await resp.content.read(_PIECE)
                out_headers = {}
                if "Content-Range" in resp.headers:
                    out_headers["Content-Range"] = resp.headers["Content-Range"]
                if resp.content.at_eof():
                    return web.Response(
                        body=first,
                        status=resp.status,
                        headers=out_headers,
                        content_type=resp.content_type if first else None,
                    )
                out = web.StreamResponse(status=resp.status, headers=out_headers)
                out.content_type = resp.content_type
                await out.prepare(request)
                piece = first
                while piece:
                    await out.write(piece)
                    piece = await resp.content.read(_PIECE)
                await out.write_eof()
                return out
        except TimeoutError:
            if out is not None:
                raise  # the answer began: cut it (no 504 page can follow its head)
            return web.Response(status=504, text=_GATEWAY_TIMEOUT, content_type="text/html")
        except (aiohttp.ClientConnectionError, OSError):
            if out is not None:
                raise
            return envelope_response(
                request, http_status=503, message=f"plugin of instance {rec.name} is not answering"
            )
    finally:
        metro.on_activity(rec.uuid, -1)


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_route("*", "/v1/instances/{uuid}/plugins/{plugin}/{path:.*}", _plugin)
