"""The local metro's HTTP face: UKC platform API, sandbox plugin proxy and admin routes.

`create_app()` builds the aiohttp application that `local.daemon` serves on 127.0.0.1. It
speaks UKC's wire protocol (envelope, per-item error codes, bodies on GET/DELETE; ukc-api.md
§3–§7, §13) closely enough that the official SDK cannot tell it apart, translating each request
into calls on `local.state.Metro`. Plugin requests are relayed to the agent's unix socket
(`runtime.plugin_socket(uuid)`). Fault knobs (`local.faults`) are applied to `/v1/` only.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from reconciler.errors import ApiError
from reconciler.local.faults import Faults
from reconciler.local.state.lifecycle import (
    CODE_NOT_FOUND,
    CODE_TIMED_OUT,
    STATES,
    InstanceRecord,
    ItemError,
    Metro,
)

__all__ = ["create_app", "envelope_response"]

_METRO: web.AppKey[Metro] = web.AppKey("metro", Metro)
_FAULTS: web.AppKey[Faults] = web.AppKey("faults", Faults)
_TOKEN: web.AppKey[str] = web.AppKey("token", str)
_SHUTDOWN: web.AppKey[Callable[[], None]] = web.AppKey("shutdown")
_STATUS_EXTRA: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status_extra")
_T0: web.RequestKey[float] = web.RequestKey("t0", float)
_SESSIONS: web.AppKey[dict[Path, aiohttp.ClientSession]] = web.AppKey("sessions", dict)

# why: the real metro proxy cuts plugin requests after 60 s (ukc-api.md §11.1)
_PLUGIN_TIMEOUT_S = 60.0
_PLUGIN_MAX_BODY = 2 * 1024 * 1024 + 65536
_WAKE_TIMEOUT_S = 30.0


def _op_time_us(request: web.Request) -> int:
    t0 = request.get(_T0)
    return int((time.perf_counter() - t0) * 1e6) if t0 is not None else 0


def envelope_response(
    request: web.Request,
    *,
    items: list[dict[str, Any]] | None = None,
    key: str = "instances",
    http_status: int = 200,
    message: str | None = None,
    status: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Render the UKC envelope; `status` derives from the items unless given."""
    body: dict[str, Any] = {}
    if status is None:
        if items is None:
            status = "success" if http_status < 400 else "error"
        else:
            failed = sum(1 for i in items if i.get("status") == "error")
            status = (
                "success"
                if failed == 0
                else ("error" if failed == len(items) else "partial_success")
            )
    body["status"] = status
    if message is not None:
        body["message"] = message
    if items is not None:
        body["data"] = {key: items}
    if http_status >= 400:
        body["errors"] = [{"status": http_status}]
    body["op_time_us"] = _op_time_us(request)
    return web.Response(
        body=json.dumps(body).encode(),
        status=http_status,
        content_type="application/json",
        headers=headers,
    )


def _error_item(ref: object, exc: ApiError) -> dict[str, Any]:
    item: dict[str, Any] = {"status": "error", "message": str(exc)}
    if isinstance(ref, dict):
        for k in ("uuid", "name"):
            if k in ref and isinstance(ref[k], str):
                item[k] = ref[k]
    if exc.code is not None:
        item["error"] = exc.code
    return item


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(f"request body is not valid JSON: {exc}", status=400) from None


async def _list_body(request: web.Request) -> list[Any]:
    body = await _json_body(request)
    if body is None:
        return []
    if isinstance(body, dict):
        return [body]
    if not isinstance(body, list):
        raise ApiError("request body must be a JSON array of references", status=400)
    return body


def _timeout(value: object, default: float | None) -> float | None:
    """UKC wait semantics: -1 = forever (None), 0 = now, n = seconds."""
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ApiError(f"timeout_s {value!r} is not a number", status=400)
    return None if value < 0 else float(value)


# ------------------------------------------------------------------ middleware


@web.middleware
async def _middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    request[_T0] = time.perf_counter()
    app = request.app
    try:
        auth = request.headers.get("Authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not given or not hmac.compare_digest(given.encode(), app[_TOKEN].encode()):
            return envelope_response(
                request, http_status=401, message="missing or invalid bearer token"
            )
        if request.path.startswith("/v1/"):
            faults = app[_FAULTS]
            if faults.latency_ms:
                await asyncio.sleep(faults.latency_ms / 1000)
            fault = faults.take_api_fault()
            if fault is not None:
                if fault.status == 429:
                    return envelope_response(
                        request,
                        http_status=429,
                        message="rate limit exceeded",
                        headers={"Retry-After": str(fault.retry_after or 1)},
                    )
                return envelope_response(
                    request, http_status=fault.status, message="injected server error"
                )
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


# ------------------------------------------------------------------ instances


def _read_item(rec: InstanceRecord, details: bool, now: float) -> dict[str, Any]:
    item = rec.to_wire(now) if details else rec.identity()
    item["status"] = "success"
    return item


def _bool_query(request: web.Request, key: str, default: bool) -> bool:
    raw = request.query.get(key)
    if raw is None:
        return default
    return raw.lower() not in ("false", "0", "no")


async def _list_instances(request: web.Request) -> web.Response:
    metro = request.app[_METRO]
    faults = request.app[_FAULTS]
    now = time.time()
    details = _bool_query(request, "details", True)
    uuids = request.query.getall("uuid", [])
    names = request.query.getall("name", [])
    body = await _json_body(request)
    refs: list[object] = [{"uuid": u} for u in uuids]
    refs.extend({"name": n} for n in names)
    if isinstance(body, list):
        refs.extend(body)
    if refs:
        items: list[dict[str, Any]] = []
        for ref in refs:
            try:
                items.append(_read_item(metro.lookup(ref), details, now))
            except ItemError as exc:
                if exc.status == 400:
                    raise
                items.append(_error_item(ref, exc))
        return envelope_response(request, items=items)
    tags_raw = request.query.get("tags", "")
    recs = metro.select(tags_raw.split(",") if tags_raw else [])
    if faults.list_lag_count:
        recs = [r for r in recs if not faults.hides(r.seq)]
        faults.list_answered()
    if request.query.get("order", "asc") == "desc":
        recs.reverse()
    start = request.query.get("from")
    if start:
        pos = next((i for i, r in enumerate(recs) if r.uuid == start), None)
        if pos is None:
            # an ISO creation time also works as a cursor (ukc-api.md §7.2)
            try:
                from datetime import datetime

                ts = datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp()
            except ValueError:
                recs = []
            else:
                recs = [r for r in recs if r.created_at >= ts]
        else:
            recs = recs[pos:]
    count_raw = request.query.get("count")
    if count_raw:
        try:
            count = int(count_raw)
        except ValueError:
            raise ApiError(f"count {count_raw!r} is not an integer", status=400) from None
        if count > 0:
            recs = recs[:count]
    out = [r.to_wire(now) for r in recs] if details else [r.identity() for r in recs]
    return envelope_response(request, items=out)


async def _get_instance(request: web.Request) -> web.Response:
    metro = request.app[_METRO]
    ref = {"uuid": request.match_info["uuid"]}
    try:
        rec = metro.lookup(ref)
    except ItemError as exc:
        return envelope_response(request, items=[_error_item(ref, exc)])
    details = _bool_query(request, "details", True)
    return envelope_response(request, items=[_read_item(rec, details, time.time())])


async def _create_instance(request: web.Request) -> web.Response:
    metro = request.app[_METRO]
    body = await _json_body(request)
    try:
        rec = metro.create(body)
    except ItemError as exc:
        if exc.status is not None:
            raise
        ref = {"name": body.get("name")} if isinstance(body, dict) else {}
        return envelope_response(request, items=[_error_item(ref, exc)], message=str(exc))
    assert isinstance(body, dict)
    await metro.publish_ports(rec)
    timeout = _timeout(body.get("timeout_s"), 0.0)
    if body.get("timeout_s") is None and body.get("wait_timeout_ms") is not None:
        timeout = _timeout(-(-int(body["wait_timeout_ms"]) // 1000), 0.0)
    if timeout != 0.0 and rec.state == "starting":
        await metro.wait_for(
            lambda: rec.state != "starting" or rec.uuid not in metro.records, timeout
        )
    item: dict[str, Any] = {
        "status": "success",
        "uuid": rec.uuid,
        "name": rec.name,
        "state": rec.state,
        "private_ip": rec.private_ip,
        "private_fqdn": f"{rec.name}.internal",
    }
    if rec.service_group_uuid:
        item["service_group"] = rec.to_wire(time.time())["service_group"]
    if timeout != 0.0 and rec.state == "starting":
        item.update(status="error", error=CODE_TIMED_OUT, message="timed out")
        return envelope_response(request, items=[item], message="Operation timed out")
    if timeout != 0.0 and rec.state != "running":
        item["status"] = "error"
        item["state"] = rec.state if rec.uuid in metro.records else "deleted"
        return envelope_response(request, items=[item])
    return envelope_response(request, items=[item])


async def _batch(
    request: web.Request,
    refs: list[Any],
    op: Callable[[InstanceRecord, dict[str, Any]], Awaitable[dict[str, Any]]],
) -> web.Response:
    metro = request.app[_METRO]

    async def one(ref: Any) -> dict[str, Any]:
        try:
            rec = metro.lookup(ref)
            extra = await op(rec, ref if isinstance(ref, dict) else {})
        except ItemError as exc:
            if exc.status is not None:
                raise
            return _error_item(ref, exc)
        item: dict[str, Any] = {"status": "success", "uuid": rec.uuid, "name": rec.name}
        item.update(extra)
        return item

    items = list(await asyncio.gather(*(one(r) for r in refs)))
    message = None
    if any(i.get("error") == CODE_TIMED_OUT for i in items):
        message = "Operation timed out"
    return envelope_response(request, items=items, message=message)


def _by_uuid_refs(request: web.Request, body: object) -> list[Any]:
    ref: dict[str, Any] = dict(body) if isinstance(body, dict) else {}
    ref["uuid"] = request.match_info["uuid"]
    ref.pop("name", None)
    return [ref]


async def _refs(request: web.Request) -> list[Any]:
    if "uuid" in request.match_info:
        return _by_uuid_refs(request, await _json_body(request))
    return await _list_body(request)


async def _start(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        prev = metro.start(rec)
        timeout = _timeout(opts.get("timeout_s"), 0.0)
        if timeout != 0.0:
            ok = await metro.wait_for(lambda: rec.state != "starting", timeout)
            if not ok:
                return {
                    "status": "error",
                    "state": rec.state,
                    "error": CODE_TIMED_OUT,
                    "message": "timed out",
                    "previous_state": prev,
                }
        return {"state": rec.state, "previous_state": prev}

    return await _batch(request, await _refs(request), op)


async def _stop(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        drain = opts.get("drain_timeout_ms", 0) or 0
        if opts.get("force") and drain:
            raise ItemError("stop: force and drain_timeout_ms cannot be combined", status=400)
        if not isinstance(drain, int) or isinstance(drain, bool):
            raise ItemError(f"drain_timeout_ms {drain!r} is not an integer", status=400)
        if drain < 0:
            drain = 60000
        ifstate = opts.get("ifstate")
        if ifstate is not None and ifstate != rec.state:
            return {"state": rec.state, "previous_state": rec.state}
        prev = metro.stop(rec, drain_timeout_ms=0 if opts.get("force") else drain)
        return {"state": rec.state, "previous_state": prev}

    return await _batch(request, await _refs(request), op)


async def _suspend(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        drain = opts.get("drain_timeout_ms", 0) or 0
        if not isinstance(drain, int) or isinstance(drain, bool):
            raise ItemError(f"drain_timeout_ms {drain!r} is not an integer", status=400)
        prev = metro.suspend(rec, drain_timeout_ms=max(drain, 0))
        return {"state": rec.state, "previous_state": prev}

    return await _batch(request, await _refs(request), op)


async def _wait(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        want = opts.get("state", "running")
        if want not in STATES:
            raise ItemError(f"wait: unknown state {want!r}", status=400)
        # no timeout given: block like a wait should (the SDK then stretches its read timeout)
        timeout = _timeout(opts.get("timeout_s"), None)
        raw_ms = opts.get("timeout_ms")
        if opts.get("timeout_s") is None and isinstance(raw_ms, int | float):
            timeout = _timeout(raw_ms / 1000 if raw_ms >= 0 else -1, None)

        def gone() -> bool:
            return rec.uuid not in metro.records

        ok = await metro.wait_for(lambda: rec.state == want or gone(), timeout)
        if gone():
            if want == "deleted":
                return {"state": "deleted"}
            raise ItemError(f"instance {rec.uuid} was deleted while waiting", code=CODE_NOT_FOUND)
        if not ok:
            return {
                "status": "error",
                "state": rec.state,
                "error": CODE_TIMED_OUT,
                "message": "timed out",
            }
        return {"state": rec.state}

    return await _batch(request, await _refs(request), op)


async def _delete(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        prev = rec.state
        task = await metro.delete(rec)
        timeout = _timeout(opts.get("timeout_s"), 0.0)
        if timeout != 0.0:
            # why: shield so a lapsed wait does not cancel the teardown itself
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return {"previous_state": prev}

    return await _batch(request, await _refs(request), op)


async def _logs(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        data = metro.console(rec)
        total = len(data)
        offset = opts.get("offset", 0)
        limit = opts.get("limit")
        if not isinstance(offset, int) or isinstance(offset, bool):
            raise ItemError(f"offset {offset!r} is not an integer", status=400)
        start = max(total + offset, 0) if offset < 0 else min(offset, total)
        end = total if not isinstance(limit, int) or limit <= 0 else min(total, start + limit)
        return {
            "output": base64.b64encode(data[start:end]).decode(),
            "available": {"start": 0, "end": total},
            "range": {"start": start, "end": end},
            "state": rec.state,
        }

    return await _batch(request, await _refs(request), op)


async def _patch(request: web.Request) -> web.Response:
    metro = request.app[_METRO]

    async def op(rec: InstanceRecord, opts: dict[str, Any]) -> dict[str, Any]:
        prop, kind, value = opts.get("prop"), opts.get("op"), opts.get("value")
        if prop == "env" and kind in ("set", "add") and isinstance(value, dict):
            if kind == "set":
                rec.env = {}
            rec.env.update({str(k): str(v) for k, v in value.items()})
        elif prop == "env" and kind == "set" and value is None:
            rec.env = {}
        elif prop == "env" and kind == "del" and isinstance(value, list):
            for k in value:
                rec.env.pop(str(k), None)
        elif prop == "memory_mb" and kind == "set" and isinstance(value, int):
            lim = metro.limits
            if not lim.min_memory_mb <= value <= lim.max_memory_mb:
                raise ItemError(
                    f"memory_mb {value} is outside the quota limits "
                    f"{lim.min_memory_mb}..{lim.max_memory_mb}",
                    code=19,
                )
            rec.memory_mb = value
        elif prop == "tags" and kind in ("set", "add", "del"):
            vals = value if isinstance(value, list) else ([] if value is None else [value])
            vals = [str(v) for v in vals]
            if kind == "set":
                rec.tags = vals
            elif kind == "add":
                rec.tags += [v for v in vals if v not in rec.tags]
            else:
                rec.tags = [t for t in rec.tags if t not in vals]
        else:
            raise ItemError(f"update of {prop!r} with op {kind!r} is not supported", code=1)
        metro._mark_dirty()
        out: dict[str, Any] = {}
        if "id" in opts:
            out["id"] = opts["id"]
        return out

    return await _batch(request, await _refs(request), op)


# ------------------------------------------------------------------ plugin proxy


def _session(app: web.Application, socket: Path) -> aiohttp.ClientSession:
    sessions = app[_SESSIONS]
    session = sessions.get(socket)
    if session is None or session.closed:
        # why: force_close — a restarted sandbox listens on a new socket under the same path,
        # so pooled keep-alive connections would point at a dead listener
        connector = aiohttp.UnixConnector(path=str(socket), force_close=True)
        session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=_PLUGIN_TIMEOUT_S),
            auto_decompress=False,
        )
        sessions[socket] = session
    return session


async def _plugin(request: web.Request) -> web.StreamResponse:
    metro = request.app[_METRO]
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
        if len(body) > _PLUGIN_MAX_BODY:
            return envelope_response(
                request, http_status=413, message=f"plugin body of {len(body)} bytes is too large"
            )
        headers = {
            k: v for k, v in request.headers.items() if k.lower() in ("range", "content-type")
        }
        url = "http://sandbox/" + request.match_info["path"]
        try:
            async with _session(request.app, socket).request(
                request.method, url, params=request.query, data=body, headers=headers
            ) as resp:
                payload = await resp.read()
                out_headers = {}
                if "Content-Range" in resp.headers:
                    out_headers["Content-Range"] = resp.headers["Content-Range"]
                return web.Response(
                    body=payload,
                    status=resp.status,
                    headers=out_headers,
                    content_type=resp.content_type if payload else None,
                )
        except TimeoutError:
            return web.Response(
                status=504,
                text="<html><body><h1>504 Gateway Time-out</h1></body></html>",
                content_type="text/html",
            )
        except (aiohttp.ClientConnectionError, OSError):
            return envelope_response(
                request, http_status=503, message=f"plugin of instance {rec.name} is not answering"
            )
    finally:
        metro.on_activity(rec.uuid, -1)


# ------------------------------------------------------------------ admin


async def _status(request: web.Request) -> web.Response:
    metro = request.app[_METRO]
    states: dict[str, int] = {}
    for rec in metro.records.values():
        states[rec.state] = states.get(rec.state, 0) + 1
    data: dict[str, Any] = {
        "pid": os.getpid(),
        "instances": len(metro.records),
        "states": states,
        "app_domain": metro.app_domain,
        "faults": request.app[_FAULTS].snapshot(),
    }
    data.update(request.app[_STATUS_EXTRA]())
    body = {"status": "success", "data": data, "op_time_us": _op_time_us(request)}
    return web.json_response(body)


async def _faults(request: web.Request) -> web.Response:
    body = await _json_body(request)
    if not isinstance(body, dict):
        raise ApiError("faults body must be a JSON object", status=400)
    faults = request.app[_FAULTS]
    faults.apply(body, current_seq=request.app[_METRO]._seq)
    return web.json_response(
        {"status": "success", "data": faults.snapshot(), "op_time_us": _op_time_us(request)}
    )


async def _shutdown(request: web.Request) -> web.Response:
    # why: answer first, then stop — the caller waits for the process to exit
    asyncio.get_running_loop().call_later(0.05, request.app[_SHUTDOWN])
    return web.json_response({"status": "success", "op_time_us": _op_time_us(request)})


async def _close_sessions(app: web.Application) -> None:
    for session in app[_SESSIONS].values():
        await session.close()


def create_app(
    metro: Metro,
    faults: Faults,
    token: str,
    *,
    shutdown: Callable[[], None],
    status_extra: Callable[[], dict[str, Any]] | None = None,
) -> web.Application:
    """The aiohttp application of one local metro."""
    app = web.Application(middlewares=[_middleware], client_max_size=_PLUGIN_MAX_BODY)
    app[_METRO] = metro
    app[_FAULTS] = faults
    app[_TOKEN] = token
    app[_SHUTDOWN] = shutdown
    app[_STATUS_EXTRA] = status_extra or dict
    app[_SESSIONS] = {}
    app.on_cleanup.append(_close_sessions)
    r = app.router
    r.add_get("/v1/instances", _list_instances)
    r.add_post("/v1/instances", _create_instance)
    r.add_delete("/v1/instances", _delete)
    r.add_patch("/v1/instances", _patch)
    r.add_put("/v1/instances/start", _start)
    r.add_put("/v1/instances/stop", _stop)
    r.add_put("/v1/instances/suspend", _suspend)
    r.add_get("/v1/instances/wait", _wait)
    r.add_get("/v1/instances/log", _logs)
    r.add_get("/v1/instances/logs", _logs)
    r.add_route("*", "/v1/instances/{uuid}/plugins/{plugin}/{path:.*}", _plugin)
    r.add_get("/v1/instances/{uuid}", _get_instance)
    r.add_delete("/v1/instances/{uuid}", _delete)
    r.add_patch("/v1/instances/{uuid}", _patch)
    r.add_put("/v1/instances/{uuid}/start", _start)
    r.add_put("/v1/instances/{uuid}/stop", _stop)
    r.add_put("/v1/instances/{uuid}/suspend", _suspend)
    r.add_get("/v1/instances/{uuid}/wait", _wait)
    r.add_get("/v1/instances/{uuid}/log", _logs)
    r.add_get("/v1/instances/{uuid}/logs", _logs)
    r.add_get("/_local/status", _status)
    r.add_post("/_local/faults", _faults)
    r.add_post("/_local/shutdown", _shutdown)
    return app
