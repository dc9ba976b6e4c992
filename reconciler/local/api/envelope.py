"""UKC's response envelope and the request-body conventions every route shares.

Every answer is `{"status", "message"?, "data"?, "errors"?, "op_time_us"}`; batch routes answer
one item per reference, an error item carrying the reference, the message and the item code.
Bodies may come on GET and DELETE too; timeouts follow UKC's -1 / 0 / n seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from reconciler.errors import ApiError
from reconciler.local.api.keys import STARTED
from reconciler.local.state.records import ItemError

__all__ = [
    "bool_query",
    "envelope_response",
    "error_item",
    "json_body",
    "list_body",
    "op_time_us",
    "parse_timeout",
    "plain_response",
]


def op_time_us(request: web.Request) -> int:
    t0 = request.get(STARTED)
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
    body["op_time_us"] = op_time_us(request)
    return web.Response(
        body=json.dumps(body).encode(),
        status=http_status,
        content_type="application/json",
        headers=headers,
    )


def plain_response(request: web.Request, data: Any = None) -> web.Response:
    """A success envelope whose `data` is not a list of items (the admin routes)."""
    body: dict[str, Any] = {"status": "success"}
    if data is not None:
        body["data"] = data
    body["op_time_us"] = op_time_us(request)
    return web.json_response(body)


def error_item(ref: object, exc: ApiError) -> dict[str, Any]:
    """The item answering a reference whose operation failed."""
    item: dict[str, Any] = {"status": "error", "message": str(exc)}
    if isinstance(ref, dict):
        for k in ("uuid", "name"):
            if k in ref and isinstance(ref[k], str):
                item[k] = ref[k]
    if exc.code is not None:
        item["error"] = exc.code
    return item


async def json_body(request: web.Request) -> Any:
    """The parsed JSON body, None when there is none."""
    raw = await request.read()
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ApiError(f"request body is not valid JSON: {exc}", status=400) from None


async def named_refs(request: web.Request) -> list[object]:
    """What a list request names: `?uuid=` and `?name=` queries, then a JSON list body."""
    refs: list[object] = [{"uuid": u} for u in request.query.getall("uuid", [])]
    refs.extend({"name": n} for n in request.query.getall("name", []))
    body = await json_body(request)
    if isinstance(body, list):
        refs.extend(body)
    return refs


def answer_refs(
    refs: list[object], read: Callable[[object], dict[str, Any]]
) -> list[dict[str, Any]]:
    """One item per reference: what `read` makes of it, or its error item. A malformed
    reference (400) fails the whole request, as on UKC."""
    items: list[dict[str, Any]] = []
    for ref in refs:
        try:
            items.append(read(ref))
        except ItemError as exc:
            if exc.status == 400:
                raise
            items.append(error_item(ref, exc))
    return items


async def list_body(request: web.Request) -> list[Any]:
    """A body of references: a list, or one object taken as a list of one."""
    body = await json_body(request)
    if body is None:
        return []
    if isinstance(body, dict):
        return [body]
    if not isinstance(body, list):
        raise ApiError("request body must be a JSON array of references", status=400)
    return body


def parse_timeout(value: object, default: float | None) -> float | None:
    """UKC wait semantics: -1 = forever (None), 0 = now, n = seconds."""
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ApiError(f"timeout_s {value!r} is not a number", status=400)
    return None if value < 0 else float(value)


def bool_query(request: web.Request, key: str, default: bool) -> bool:
    raw = request.query.get(key)
    if raw is None:
        return default
    return raw.lower() not in ("false", "0", "no")
