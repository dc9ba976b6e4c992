"""The `/v1/instances` routes: list, read, create, and the batch operations.

Batch routes take a list of `{uuid}` / `{name}` references (or one instance by the path) and
answer one item per reference; a malformed request is an HTTP 400, a failed item an error
item with UKC's code. Waits (`timeout_s`) block on the metro's state changes.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from aiohttp import web

from reconciler.errors import ApiError
from reconciler.local.api.envelope import (
    answer_refs,
    bool_query,
    envelope_response,
    error_item,
    json_body,
    list_body,
    named_refs,
    parse_timeout,
)
from reconciler.local.api.keys import FAULTS, METRO
from reconciler.local.state.records import (
    CODE_NOT_FOUND,
    CODE_TIMED_OUT,
    STATES,
    ItemError,
    LocalInstance,
)

__all__ = ["add_routes"]

_Op = Callable[[LocalInstance, dict[str, Any]], Awaitable[dict[str, Any]]]
_TIMED_OUT = "Operation timed out"


def _read_item(rec: LocalInstance, details: bool, now: float) -> dict[str, Any]:
    item = rec.to_wire(now) if details else rec.identity()
    item["status"] = "success"
    return item


def _timed_out(state: str, **extra: Any) -> dict[str, Any]:
    item = {"status": "error", "state": state, "error": CODE_TIMED_OUT, "message": "timed out"}
    item.update(extra)
    return item


async def _list_instances(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    faults = request.app[FAULTS]
    now = time.time()
    details = bool_query(request, "details", True)
    refs = await named_refs(request)
    if refs:
        items = answer_refs(refs, lambda ref: _read_item(metro.index.lookup(ref), details, now))
        faults.show_deleting_live(items)
        return envelope_response(request, items=items)
    tags_raw = request.query.get("tags", "")
    recs = metro.index.select(tags_raw.split(",") if tags_raw else [])
    if faults.list_lag_count:
        recs = [r for r in recs if not faults.hides(r.seq)]
        faults.list_answered()
    if request.query.get("order", "asc") == "desc":
        recs.reverse()
    start = request.query.get("from")
    if start:
        pos = next((i for i, r in enumerate(recs) if r.uuid == start), None)
        if pos is None:
            # an ISO creation time also works as a cursor
            try:
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
    faults.show_deleting_live(out)
    return envelope_response(request, items=out)


async def _get_instance(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    ref = {"uuid": request.match_info["uuid"]}
    try:
        rec = metro.index.lookup(ref)
    except ItemError as exc:
        return envelope_response(request, items=[error_item(ref, exc)])
    details = bool_query(request, "details", True)
    items = [_read_item(rec, details, time.time())]
    request.app[FAULTS].show_deleting_live(items)
    return envelope_response(request, items=items)


async def _create_instance(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    body = await json_body(request)
    try:
        rec = metro.create(body)
    except ItemError as exc:
        if exc.status is not None:
            raise
        ref = {"name": body.get("name")} if isinstance(body, dict) else {}
        return envelope_response(request, items=[error_item(ref, exc)], message=str(exc))
    assert isinstance(body, dict)
    await metro.publish_ports(rec)
    timeout = parse_timeout(body.get("timeout_s"), 0.0)
    if body.get("timeout_s") is None and body.get("wait_timeout_ms") is not None:
        timeout = parse_timeout(-(-int(body["wait_timeout_ms"]) // 1000), 0.0)
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
    group = rec.service_group_wire()
    if group is not None:
        item["service_group"] = group
    if timeout != 0.0 and rec.state == "starting":
        item.update(status="error", error=CODE_TIMED_OUT, message="timed out")
        return envelope_response(request, items=[item], message=_TIMED_OUT)
    if timeout != 0.0 and rec.state != "running":
        item["status"] = "error"
        item["state"] = rec.state if rec.uuid in metro.records else "deleted"
    return envelope_response(request, items=[item])


async def _batch(request: web.Request, op: _Op) -> web.Response:
    """Run `op` on every referenced instance; one item per reference."""
    metro = request.app[METRO]
    if "uuid" in request.match_info:
        body = await json_body(request)
        ref: dict[str, Any] = dict(body) if isinstance(body, dict) else {}
        ref["uuid"] = request.match_info["uuid"]
        ref.pop("name", None)
        refs: list[Any] = [ref]
    else:
        refs = await list_body(request)

    async def one(ref: Any) -> dict[str, Any]:
        try:
            rec = metro.index.lookup(ref)
            extra = await op(rec, ref if isinstance(ref, dict) else {})
        except ItemError as exc:
            if exc.status is not None:
                raise
            return error_item(ref, exc)
        item: dict[str, Any] = {"status": "success", "uuid": rec.uuid, "name": rec.name}
        item.update(extra)
        return item

    items = list(await asyncio.gather(*(one(r) for r in refs)))
    message = _TIMED_OUT if any(i.get("error") == CODE_TIMED_OUT for i in items) else None
    return envelope_response(request, items=items, message=message)


def _drain_ms(opts: dict[str, Any]) -> int:
    drain = opts.get("drain_timeout_ms", 0) or 0
    if not isinstance(drain, int) or isinstance(drain, bool):
        raise ItemError(f"drain_timeout_ms {drain!r} is not an integer", status=400)
    return drain


async def _start(request: web.Request) -> web.Response:
    metro = request.app[METRO]

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
        prev = metro.start(rec)
        timeout = parse_timeout(opts.get("timeout_s"), 0.0)
        if timeout != 0.0 and not await metro.wait_for(lambda: rec.state != "starting", timeout):
            return _timed_out(rec.state, previous_state=prev)
        return {"state": rec.state, "previous_state": prev}

    return await _batch(request, op)


async def _stop(request: web.Request) -> web.Response:
    metro = request.app[METRO]

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
        if opts.get("force") and opts.get("drain_timeout_ms", 0):
            raise ItemError("stop: force and drain_timeout_ms cannot be combined", status=400)
        drain = _drain_ms(opts)
        if drain < 0:
            drain = 60000
        ifstate = opts.get("ifstate")
        if ifstate is not None and ifstate != rec.state:
            return {"state": rec.state, "previous_state": rec.state}
        prev = metro.stop(rec, drain_timeout_ms=0 if opts.get("force") else drain)
        return {"state": rec.state, "previous_state": prev}

    return await _batch(request, op)


async def _suspend(request: web.Request) -> web.Response:
    metro = request.app[METRO]
    # why: UKC answers a suspend without waiting for the snapshot; each freeze's first pass
    # (the sandbox's processes listed and stopped, on this loop) ran before a batch's answer
    # was written, ~1 ms per instance
    answered = asyncio.Event()

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
        prev = metro.suspend(rec, drain_timeout_ms=max(_drain_ms(opts), 0), after=answered)
        return {"state": rec.state, "previous_state": prev}

    try:
        response = await _batch(request, op)
        await response.prepare(request)
        await response.write_eof()
    finally:
        answered.set()
    return response


async def _wait(request: web.Request) -> web.Response:
    metro = request.app[METRO]

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
        want = opts.get("state", "running")
        if want not in STATES:
            raise ItemError(f"wait: unknown state {want!r}", status=400)
        # no timeout given: block like a wait should (the SDK then stretches its read timeout)
        timeout = parse_timeout(opts.get("timeout_s"), None)
        raw_ms = opts.get("timeout_ms")
        if opts.get("timeout_s") is None and isinstance(raw_ms, int | float):
            timeout = parse_timeout(raw_ms / 1000 if raw_ms >= 0 else -1, None)

        def gone() -> bool:
            return rec.uuid not in metro.records

        ok = await metro.wait_for(lambda: rec.state == want or gone(), timeout)
        if gone():
            if want == "deleted":
                return {"state": "deleted"}
            raise ItemError(f"instance {rec.uuid} was deleted while waiting", code=CODE_NOT_FOUND)
        return {"state": rec.state} if ok else _timed_out(rec.state)

    return await _batch(request, op)


async def _delete(request: web.Request) -> web.Response:
    metro = request.app[METRO]

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
        prev = rec.state
        task = await metro.delete(rec, dont_retain=opts.get("dont_retain") is True)
        timeout = parse_timeout(opts.get("timeout_s"), 0.0)
        if timeout != 0.0 and metro.behaviour.delete_timeout_honoured:
            # why: shield so a lapsed wait does not cancel the teardown itself
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
        return {"previous_state": prev}

    return await _batch(request, op)


async def _logs(request: web.Request) -> web.Response:
    metro = request.app[METRO]

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
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

    return await _batch(request, op)


async def _patch(request: web.Request) -> web.Response:
    metro = request.app[METRO]

    async def op(rec: LocalInstance, opts: dict[str, Any]) -> dict[str, Any]:
        metro.update(rec, opts)
        return {"id": opts["id"]} if "id" in opts else {}

    return await _batch(request, op)


def add_routes(router: web.UrlDispatcher) -> None:
    """The instance routes, by list (references in the body), then by uuid in the path."""
    router.add_get("/v1/instances", _list_instances)
    router.add_post("/v1/instances", _create_instance)
    for prefix in ("/v1/instances", "/v1/instances/{uuid}"):
        if prefix != "/v1/instances":
            # why: after `/v1/instances/wait` and the other list routes, which it would match
            router.add_get(prefix, _get_instance)
        router.add_delete(prefix, _delete)
        router.add_patch(prefix, _patch)
        router.add_put(f"{prefix}/start", _start)
        router.add_put(f"{prefix}/stop", _stop)
        router.add_put(f"{prefix}/suspend", _suspend)
        router.add_get(f"{prefix}/wait", _wait)
        router.add_get(f"{prefix}/log", _logs)
        router.add_get(f"{prefix}/logs", _logs)
