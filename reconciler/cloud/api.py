"""`UkcApi`: the UKC platform API of one metro over httpx (implements `cloud.model.CloudApi`).

The local metro speaks the same wire protocol, so the only differences are the base URL and
the token. This module owns the
wire facts: the JSON envelope, per-item errors inside a 200, pagination with an inclusive
`from` cursor, GET/DELETE with JSON bodies, and the mapping of failures onto
`reconciler.errors` (the facts are in docs/PLATFORM.md). Retries (429/5xx/transport) happen
inside each method through `_util.retry`; a create is never retried blindly: after a lost
answer we look the name up, and an instance found there is reported as `AlreadyExistsError`
(whether it is ours to adopt is the controller's ownership rule, not a wire fact).

The token lives only in this object's private attribute and the Authorization header; it never
appears in `repr`, logs or exception text (server-sent text is scrubbed of it too).
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import json
import logging
import math
import os
import random
import re
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import httpx

from reconciler._util.names import is_metro_code
from reconciler._util.retry import RetryPolicy, call_with_retries
from reconciler.cloud.model import (
    ConsoleLog,
    CreateRequest,
    Instance,
    PluginReply,
    Volume,
)
from reconciler.cloud.quotas import Quota
from reconciler.cloud.trust import remote_trust, verifying_context
from reconciler.errors import (
    AlreadyExistsError,
    ApiError,
    AuthError,
    NotFoundError,
    RateLimitedError,
    SandboxNotReadyError,
    TransportError,
)

__all__ = [
    "UkcApi",
    "metro_base_url",
    "normalize_base_url",
    "parse_instance",
    "parse_retry_after",
    "verifying_context",
]

log = logging.getLogger(__name__)

_MAX_MESSAGE = 200
_MAX_RETRY_AFTER_S = 3600.0
#: item error codes of the platform (docs/PLATFORM.md, "The response envelope")
_CODE_NOT_FOUND = 8
_CODE_QUOTA = 19
_CODE_ALREADY_EXISTS = 23
#: a deleted instance an account retains is listed in this state until `retained_until`; it
#: is gone for every purpose of ours
DELETED = "deleted"
#: how long a DELETE may block until the instance is gone (the platform's `timeout_s`)
DELETE_TIMEOUT_S = 30
#: an instance uuid, a plugin name, and a plugin path (segments of safe characters, no dot
#: segments): a path made of the sandbox's answers must stay under its instance's plugin route
_UUID = re.compile(r"[0-9A-Za-z-]{1,64}")
_PLUGIN_NAME = re.compile(r"[A-Za-z0-9_-]{1,63}")
_PLUGIN_PATH = re.compile(r"[A-Za-z0-9_-]+(?:/[A-Za-z0-9_-]+)*")


def normalize_base_url(url: str) -> str:
    """Strip a trailing "/" and "/v1": operation paths already start with /v1."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")].rstrip("/")
    return url


def metro_base_url(metro_code: str) -> str:
    """The API base URL of a metro code ("fra" → https://api.fra.unikraft.cloud); URLs pass."""
    if metro_code.startswith(("http://", "https://")):
        return normalize_base_url(metro_code)
    if not is_metro_code(metro_code):
        raise ValueError(f"metro code {metro_code!r} is not a metro code")
    return f"https://api.{metro_code}.unikraft.cloud"


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date); None when absent or garbled."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return min(max(seconds, 0.0), _MAX_RETRY_AFTER_S)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def parse_instance(item: Mapping[str, Any], metro: str) -> Instance | None:
    """An `Instance` from one wire item, tolerantly; None when it lacks a name or uuid.

    Unknown states are kept verbatim; wrongly typed optional fields are dropped.
    """
    uuid = _str_or_none(item.get("uuid"))
    name = _str_or_none(item.get("name"))
    if not uuid or not name:
        return None
    fqdn: str | None = None
    group = item.get("service_group")
    if isinstance(group, Mapping):
        domains = group.get("domains")
        if isinstance(domains, list) and domains and isinstance(domains[0], Mapping):
            fqdn = _str_or_none(domains[0].get("fqdn"))
    raw_tags = item.get("tags")
    tags = tuple(t for t in raw_tags if isinstance(t, str)) if isinstance(raw_tags, list) else ()
    return Instance(
        autokill_ms=_autokill_ms(item),
        uuid=uuid,
        name=name,
        state=_str_or_none(item.get("state")) or "unknown",
        fqdn=fqdn,
        tags=tags,
        image=_str_or_none(item.get("image")),
        memory_mb=_int_or_none(item.get("memory_mb")),
        created_at=_str_or_none(item.get("created_at")),
        started_at=_str_or_none(item.get("started_at")),
        start_count=_int_or_none(item.get("start_count")),
        metro=metro,
        stop_reason=_int_or_none(item.get("stop_reason")),
        stop_code=_int_or_none(item.get("stop_code")),
        exit_code=_int_or_none(item.get("exit_code")),
        stopped_at=_str_or_none(item.get("stopped_at")),
    )


def _autokill_ms(item: Mapping[str, Any]) -> int | None:
    """The read's autokill `time_ms`: 0 for an explicit none (null, or no `time_ms`), None
    when the read has no `autokill` at all (the platform did not say)."""
    if "autokill" not in item:
        return None
    raw = item.get("autokill")
    if not isinstance(raw, Mapping):
        return 0
    value = _int_or_none(raw.get("time_ms"))
    return max(value, 0) if value is not None else 0


def parse_volume(item: Mapping[str, Any], metro: str) -> Volume | None:
    """A `Volume` from one wire item, tolerantly; None when it lacks a name or uuid."""
    uuid = _str_or_none(item.get("uuid"))
    name = _str_or_none(item.get("name"))
    if not uuid or not name:
        return None
    raw_tags = item.get("tags")
    tags = tuple(t for t in raw_tags if isinstance(t, str)) if isinstance(raw_tags, list) else ()
    raw_attached = item.get("attached_to")
    attached: list[str] = []
    if isinstance(raw_attached, list):
        for ref in raw_attached:
            if isinstance(ref, Mapping):
                who = _str_or_none(ref.get("name")) or _str_or_none(ref.get("uuid"))
                if who:
                    attached.append(who)
    return Volume(
        uuid=uuid,
        name=name,
        tags=tags,
        state=_str_or_none(item.get("state")) or "unknown",
        size_mb=_int_or_none(item.get("size_mb")),
        attached_to=tuple(attached),
        metro=metro,
    )


class _Envelope:
    """A parsed 2xx answer: envelope status/message and the items of one list."""

    def __init__(self, body: Mapping[str, Any], key: str) -> None:
        self.status = _str_or_none(body.get("status")) or "success"
        self.message = _str_or_none(body.get("message")) or ""
        errors = body.get("errors")
        self.errors = errors if isinstance(errors, list) else []
        data = body.get("data")
        items = data.get(key) if isinstance(data, Mapping) else None
        self.items: list[Mapping[str, Any]] = (
            [i for i in items if isinstance(i, Mapping)] if isinstance(items, list) else []
        )

    def failed_items(self) -> list[Mapping[str, Any]]:
        return [i for i in self.items if i.get("status") == "error"]


class UkcApi:
    """The platform API of one metro; every public method is one logical operation."""

    def __init__(
        self,
        base_url: str,
        token: str | None,
        *,
        metro: str,
        transport: httpx.BaseTransport | None = None,
        retry: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        page_size: int = 100,
        verify: bool | ssl.SSLContext = True,
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page size {page_size} is below 1")
        self.metro = metro
        self.base_url = normalize_base_url(base_url)
        self.request_count = 0
        self._token = token
        self._retry = retry or RetryPolicy()
        self._sleep = sleep
        self._monotonic = monotonic
        self._rng = rng or random.Random()
        self._page_size = page_size
        self._transport = transport
        if verify is True and self.base_url.lower().startswith("http://"):
            # why: httpx builds a verifying context (certifi's ~150 CA certificates, ~35 ms) even
            # for a plain-HTTP base URL such as the local metro's; with redirects off it is never
            # used. An empty one that trusts nothing fails closed if it ever were.
            verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        elif verify is True:
            verify, _ = remote_trust(os.environ)
        self._verify = verify
        # why: a proxy named by the environment would read a plain-HTTP request whole, bearer
        # token included, and a plain-HTTP metro is always one on this machine (the local
        # metro, or one `UKC_METRO_ALLOW` names), which no proxy can reach; https keeps the
        # environment's proxies (they tunnel TLS and see no token)
        self._trust_env = not self.base_url.lower().startswith("http://")
        #: one client (and connection pool) per thread that asks; see `_client`
        self._clients: dict[threading.Thread, httpx.Client] = {}
        self._clients_lock = threading.Lock()
        self._closed = False

    @property
    def _client(self) -> httpx.Client:
        """This thread's client. Why one per thread: one pool shared by the session threads
        keeps at most 20 idle connections, so with more threads than that an answered request
        closed a connection the next one opened again (a TCP, on UKC a TLS, handshake: 172-180
        connections for 250 requests of 50 sessions at concurrency 32-64, against one per
        thread), and it walks all its connections at every request and answer."""
        me = threading.current_thread()
        client = self._clients.get(me)
        if client is not None and not client.is_closed:
            return client
        with self._clients_lock:
            # the clients of threads that ended are closed now: a long `ukc watch` starts
            # threads again and again
            gone = [t for t in self._clients if not t.is_alive() and t is not me]
            for thread in gone:
                self._clients.pop(thread).close()
            client = httpx.Client(
                base_url=self.base_url,
                transport=self._transport,
                verify=self._verify,
                trust_env=self._trust_env,
                follow_redirects=False,
                timeout=httpx.Timeout(30.0, connect=10.0),
                headers={"accept": "application/json", "user-agent": "ukc-reconciler"},
            )
            if self._closed:
                client.close()  # why: a closed api answers no more requests, in any thread
            self._clients[me] = client
        return client

    def paged(self, page_size: int) -> UkcApi:
        """Another client of the same metro and token that lists `page_size` per page."""
        return UkcApi(
            self.base_url,
            self._token,
            metro=self.metro,
            transport=self._transport,
            retry=self._retry,
            sleep=self._sleep,
            monotonic=self._monotonic,
            page_size=page_size,
            verify=self._verify,
        )

    def __repr__(self) -> str:
        return f"UkcApi(base_url={self.base_url!r}, metro={self.metro!r})"

    # ------------------------------------------------------------------ transport layer

    def _scrub(self, text: str) -> str:
        """One line, bounded, without the token (server text is untrusted and may echo it)."""
        text = " ".join(text.split())[:_MAX_MESSAGE]
        if self._token:
            text = text.replace(self._token, "***")
        return text.lower()

    def _send(
        self,
        method: str,
        path: str,
        what: str,
        *,
        body: object = None,
        read_timeout: float | None = None,
    ) -> Mapping[str, Any]:
        """One HTTP request; returns the decoded 2xx body or raises a mapped error."""
        headers: dict[str, str] = {}
        content: bytes | None = None
        if body is not None:
            content = json.dumps(body).encode()
            headers["content-type"] = "application/json"
        if self._token:
            headers["authorization"] = f"Bearer {self._token}"
        timeout = (
            httpx.Timeout(30.0, connect=10.0)
            if read_timeout is None
            else httpx.Timeout(read_timeout, connect=10.0)
        )
        self.request_count += 1
        prefix = f"ukc api {self.metro}: {what}"
        try:
            response = self._client.request(
                method, path, content=content, headers=headers, timeout=timeout
            )
        except httpx.TimeoutException as err:
            raise TransportError(f"{prefix}: timed out ({type(err).__name__})") from None
        except httpx.TransportError as err:
            raise TransportError(
                f"{prefix}: connection failed ({type(err).__name__}: {self._scrub(str(err))})"
            ) from None
        log.debug("%s %s -> %d", method, path.split("?", 1)[0], response.status_code)
        status = response.status_code
        try:
            decoded: object = response.json()
        except (ValueError, UnicodeDecodeError):
            decoded = None
        parsed: Mapping[str, Any] = decoded if isinstance(decoded, Mapping) else {}
        if 200 <= status < 300:
            if decoded is None:
                raise ApiError(f"{prefix}: http {status} body is not json", status=status)
            return parsed
        message = _str_or_none(parsed.get("message")) or response.reason_phrase or ""
        detail = f"http {status} ({self._scrub(message)})" if message else f"http {status}"
        if status in (401, 403):
            raise AuthError(f"{prefix}: {detail}, the token was rejected", status=status)
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            hint = f", retry after {retry_after:g} s" if retry_after is not None else ""
            raise RateLimitedError(f"{prefix}: {detail}{hint}", retry_after=retry_after)
        if status == 409:
            raise AlreadyExistsError(f"{prefix}: {detail}", status=status)
        raise ApiError(f"{prefix}: {detail}", status=status)

    def _item_error(self, what: str, item: Mapping[str, Any]) -> ApiError:
        code = _int_or_none(item.get("error"))
        message = self._scrub(_str_or_none(item.get("message")) or "")
        prefix = f"ukc api {self.metro}: {what}"
        if code == _CODE_NOT_FOUND:
            return NotFoundError(f"{prefix}: not found (code 8)", code=code, status=404)
        if code == _CODE_ALREADY_EXISTS:
            return AlreadyExistsError(f"{prefix}: name already taken (code 23)", code=code)
        if code == _CODE_QUOTA:
            return ApiError(f"{prefix}: quota exceeded (code 19: {message})", code=code)
        return ApiError(f"{prefix}: failed (code {code}: {message})", code=code)

    def _check(self, what: str, env: _Envelope) -> None:
        """Raise for per-item errors and error envelopes inside a 2xx."""
        failed = env.failed_items()
        if failed:
            raise self._item_error(what, failed[0])
        if env.status == "error" or env.errors:
            raise ApiError(f"ukc api {self.metro}: {what}: failed ({self._scrub(env.message)})")

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        return call_with_retries(
            fn,
            policy=self._retry,
            sleep=self._sleep,
            monotonic=self._monotonic,
            rng=self._rng,
        )

    # ------------------------------------------------------------------ CloudApi

    def list_instances(self, tags: Sequence[str]) -> list[Instance]:
        """All instances carrying every tag, across pages (inclusive `from` cursor)."""
        wanted = set(tags)
        base = "/v1/instances?details=true&count={count}"
        if tags:
            # why: the API wants one `tags` parameter, values percent-encoded, joined by a
            # literal comma (docs/PLATFORM.md, "Identifying and filtering"); httpx's params=
            # would encode the comma too.
            base += "&tags=" + ",".join(quote(t, safe="") for t in tags)
        seen: set[str] = set()
        result: list[Instance] = []
        cursors: list[str] = []
        while True:
            if cursors:
                count = self._page_size + 1
                path = base.format(count=count) + "&from=" + quote(cursors[-1], safe="")
            else:
                count = self._page_size
                path = base.format(count=count)
            env = self._list_page(path)
            self._check("list instances", env)
            items = env.items
            if cursors and not items:
                # why: the cursor instance was deleted meanwhile; resume from an earlier one
                # (already-seen items are dropped below), like the official SDK does.
                cursors.pop()
                if cursors:
                    continue
                break
            last_uuid: str | None = None
            for item in items:
                inst = parse_instance(item, self.metro)
                if inst is None:
                    continue
                last_uuid = inst.uuid
                if inst.uuid in seen:
                    continue
                seen.add(inst.uuid)
                if inst.state == DELETED:
                    continue
                # why: filter again locally; never act on an instance lacking our tags even
                # if a server ignored the filter.
                if wanted.issubset(inst.tags):
                    result.append(inst)
            if len(items) < count or last_uuid is None or last_uuid in cursors:
                break
            cursors.append(last_uuid)
            del cursors[:-32]
        return result

    def _list_page(self, path: str) -> _Envelope:
        def attempt() -> _Envelope:
            return _Envelope(self._send("GET", path, "list instances"), "instances")

        result: _Envelope = self._retrying(attempt)
        return result

    def _get_once(self, name: str) -> Instance | None:
        path = "/v1/instances?details=true&name=" + quote(name, safe="")
        env = _Envelope(self._send("GET", path, f"get instance {name}"), "instances")
        try:
            self._check(f"get instance {name}", env)
        except NotFoundError:
            return None
        for item in env.items:
            inst = parse_instance(item, self.metro)
            if inst is not None and inst.name == name and inst.state != DELETED:
                return inst
        return None

    def get_instance(self, name: str) -> Instance | None:
        result: Instance | None = self._retrying(lambda: self._get_once(name))
        return result

    def _create_body(self, request: CreateRequest) -> dict[str, object]:
        body: dict[str, object] = {
            "name": request.name,
            "image": request.image,
            "env": dict(request.env),
            "tags": list(request.tags),
            "autostart": request.autostart,
        }
        if request.memory_mb is not None:
            body["memory_mb"] = request.memory_mb
        if request.services:
            body["service_group"] = {
                "services": [
                    {
                        "port": s.port,
                        "destination_port": s.destination_port,
                        "handlers": list(s.handlers),
                    }
                    for s in request.services
                ]
            }
        if request.plugins:
            body["plugins"] = [
                {
                    "name": p.name,
                    "image": p.image,
                    **({"config": dict(p.config)} if p.config else {}),
                }
                for p in request.plugins
            ]
        if request.scale_to_zero is not None:
            body["scale_to_zero"] = dict(request.scale_to_zero)
        if request.autokill_ms:
            body["autokill"] = {"time_ms": request.autokill_ms}
        if request.volumes:
            # why no name: a volume created in the create call is the instance's and goes
            # with it; the platform names it (a name of ours could still be taken by the
            # previous instance's volume while its delete completes)
            body["volumes"] = [
                {"at": v.at, "size_mb": v.size_mb, "tags": list(v.tags)} for v in request.volumes
            ]
        return body

    def create_instance(self, request: CreateRequest) -> Instance:
        """Create; `AlreadyExistsError` when the name is taken, also by an earlier attempt of
        this call whose answer was lost (the caller decides whether to adopt it)."""
        what = f"create instance {request.name}"
        body = self._create_body(request)
        attempts = 0

        def attempt() -> Instance:
            nonlocal attempts
            attempts += 1
            if attempts > 1 and self._get_once(request.name) is not None:
                # why: the previous POST may have succeeded with its answer lost; creating
                # again would fail (name taken) or, worse, duplicate. Look first.
                raise AlreadyExistsError(
                    f"ukc api {self.metro}: {what}: the name exists after a lost answer",
                    code=_CODE_ALREADY_EXISTS,
                )
            env = _Envelope(self._send("POST", "/v1/instances", what, body=body), "instances")
            first = env.items[0] if env.items else {}
            if not (
                first.get("status") == "error"
                and first.get("state") == "stopped"
                and _int_or_none(first.get("error")) is None
            ):
                # why not for that one: an instance that stopped during its boot (a missing
                # image) was created; its stop reason is read next, not a create failure
                self._check(what, env)
            inst = parse_instance(env.items[0], self.metro) if env.items else None
            if inst is None:
                raise ApiError(f"ukc api {self.metro}: {what}: answer lacks uuid or name")
            # why: the create answer carries less than a read; fill what we just sent.
            return Instance(
                uuid=inst.uuid,
                name=inst.name,
                state=inst.state,
                fqdn=inst.fqdn,
                tags=inst.tags or tuple(request.tags),
                image=inst.image or request.image,
                memory_mb=inst.memory_mb if inst.memory_mb is not None else request.memory_mb,
                created_at=inst.created_at,
                started_at=inst.started_at,
                start_count=inst.start_count,
                metro=self.metro,
                autokill_ms=inst.autokill_ms
                if inst.autokill_ms is not None
                else (request.autokill_ms or 0),
            )

        result: Instance = self._retrying(attempt)
        return result

    def _batch(self, method: str, path: str, name: str, what: str) -> None:
        def attempt() -> None:
            env = _Envelope(self._send(method, path, what, body=[{"name": name}]), "instances")
            self._check(what, env)

        self._retrying(attempt)

    def start_instance(self, name: str) -> None:
        self._batch("PUT", "/v1/instances/start", name, f"start instance {name}")

    def stop_instance(self, name: str) -> None:
        self._batch("PUT", "/v1/instances/stop", name, f"stop instance {name}")

    def suspend_instances(self, names: Sequence[str]) -> dict[str, ApiError]:
        what = f"suspend {len(names)} instance(s)"
        body = [{"name": name} for name in names]

        def attempt() -> dict[str, ApiError]:
            env = _Envelope(
                self._send("PUT", "/v1/instances/suspend", what, body=body), "instances"
            )
            failed = env.failed_items()
            if env.errors or (env.status == "error" and not failed):
                raise ApiError(f"ukc api {self.metro}: {what}: failed ({self._scrub(env.message)})")
            refused: dict[str, ApiError] = {}
            for index, item in enumerate(env.items):
                if item.get("status") != "error":
                    continue
                # an item names its instance; else the answer's order is the request's
                name = _str_or_none(item.get("name"))
                if name is None and len(env.items) == len(names):
                    name = names[index]
                if name is None or name not in names:
                    raise self._item_error(what, item)  # refused, but which one is unknown
                refused[name] = self._item_error(f"suspend instance {name}", item)
            return refused

        result: dict[str, ApiError] = self._retrying(attempt)
        return result

    def set_autokill(self, name: str, *, uuid: str, time_ms: int) -> None:
        what = f"set the autokill of instance {name}"
        body = [{"uuid": uuid, "prop": "autokill", "op": "set", "value": {"time_ms": time_ms}}]

        def attempt() -> None:
            env = _Envelope(self._send("PATCH", "/v1/instances", what, body=body), "instances")
            self._check(what, env)

        self._retrying(attempt)

    def get_quotas(self) -> Quota:
        what = "read the account's quota"

        def attempt() -> Quota:
            env = _Envelope(self._send("GET", "/v1/users/quotas", what), "quotas")
            self._check(what, env)
            if not env.items:
                raise ApiError(f"ukc api {self.metro}: {what}: the answer holds no quota")
            return Quota.model_validate(dict(env.items[0]))

        result: Quota = self._retrying(attempt)
        return result

    def delete_instance(self, name: str, *, uuid: str | None = None, wait: bool = True) -> bool:
        """Delete by name, or exactly the instance `uuid` (then `name` is for messages);
        `wait=False` has the platform answer at once, while the name is still taken."""
        what = f"delete instance {name}"
        ref: dict[str, object] = {"uuid": uuid} if uuid else {"name": name}
        # why: without `dont_retain` an account with retention keeps the instance (and maybe
        # its name) in state `deleted`; `timeout_s` has the platform answer once it is gone
        ref.update(timeout_s=DELETE_TIMEOUT_S if wait else 0, dont_retain=True)
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            env = _Envelope(
                self._send(
                    "DELETE",
                    "/v1/instances",
                    what,
                    body=[ref],
                    read_timeout=DELETE_TIMEOUT_S + 10.0,
                ),
                "instances",
            )
            try:
                self._check(what, env)
            except NotFoundError:
                # why: after a lost answer the retry finds it gone: our delete did it.
                return attempts > 1
            if not env.items:
                return attempts > 1
            return True

        result: bool = self._retrying(attempt)
        return result

    def list_volumes(self, tags: Sequence[str]) -> list[Volume]:
        """Every volume carrying every tag (one page: an account has few volumes)."""
        wanted = set(tags)
        path = "/v1/volumes?details=true"
        if tags:
            path += "&tags=" + ",".join(quote(t, safe="") for t in tags)

        def attempt() -> _Envelope:
            return _Envelope(self._send("GET", path, "list volumes"), "volumes")

        env: _Envelope = self._retrying(attempt)
        self._check("list volumes", env)
        found = (parse_volume(item, self.metro) for item in env.items)
        # why: filter again locally; never act on a volume lacking our tags
        return [v for v in found if v is not None and wanted.issubset(v.tags)]

    def delete_volume(self, name: str, *, uuid: str) -> bool:
        what = f"delete volume {name}"
        attempts = 0

        def attempt() -> bool:
            nonlocal attempts
            attempts += 1
            env = _Envelope(
                self._send("DELETE", "/v1/volumes", what, body=[{"uuid": uuid}]), "volumes"
            )
            try:
                self._check(what, env)
            except NotFoundError:
                # why: after a lost answer the retry finds it gone: our delete did it
                return attempts > 1
            return bool(env.items) or attempts > 1

        result: bool = self._retrying(attempt)
        return result

    def set_tags(self, name: str, *, uuid: str, tags: Sequence[str]) -> None:
        what = f"update the tags of instance {name}"
        body = [{"uuid": uuid, "prop": "tags", "op": "set", "value": list(tags)}]

        def attempt() -> None:
            env = _Envelope(self._send("PATCH", "/v1/instances", what, body=body), "instances")
            self._check(what, env)

        self._retrying(attempt)

    def instance_log(self, uuid: str, *, offset: int, limit: int | None = None) -> ConsoleLog:
        what = f"console log of instance {uuid}"
        ref: dict[str, object] = {"uuid": uuid, "offset": offset}
        if limit is not None:
            ref["limit"] = limit

        def attempt() -> ConsoleLog:
            env = _Envelope(self._send("GET", "/v1/instances/log", what, body=[ref]), "instances")
            self._check(what, env)
            if not env.items:
                raise NotFoundError(f"ukc api {self.metro}: {what}: not found", status=404)
            item = env.items[0]
            raw = item.get("output")
            try:
                data = base64.b64decode(raw, validate=True) if isinstance(raw, str) else b""
            except (ValueError, binascii.Error):
                raise ApiError(f"ukc api {self.metro}: {what}: output is not base64") from None
            shown = _mapping(item.get("range"))
            kept = _mapping(item.get("available"))
            start = _int_or_none(shown.get("start")) or 0
            end = _int_or_none(shown.get("end"))
            available = _int_or_none(kept.get("end"))
            end = start + len(data) if end is None else end
            return ConsoleLog(data, start, end, end if available is None else available)

        result: ConsoleLog = self._retrying(attempt)
        return result

    def wait_instance(self, name: str, state: str, timeout_s: float) -> Instance:
        what = f"wait instance {name}"
        deadline = self._monotonic() + timeout_s

        def attempt() -> Instance:
            remaining = max(0.0, deadline - self._monotonic())
            body = [{"name": name, "state": state, "timeout_s": math.ceil(remaining)}]
            env = _Envelope(
                self._send(
                    "GET",
                    "/v1/instances/wait",
                    what,
                    body=body,
                    # why: the server holds the request up to timeout_s; reading must outlast it.
                    read_timeout=remaining + 10.0,
                ),
                "instances",
            )
            lapsed = "timed out" in env.message.lower() or any(
                "timed out" in (_str_or_none(i.get("message")) or "").lower()
                or _int_or_none(i.get("error")) == 12
                for i in env.failed_items()
            )
            if lapsed:
                current = next(
                    (s for i in env.items if (s := _str_or_none(i.get("state")))), "unknown"
                )
                raise SandboxNotReadyError(
                    f"instance {name} not {state} after {timeout_s:g} s (state {current})"
                )
            self._check(what, env)
            for item in env.items:
                got = _str_or_none(item.get("state"))
                if got is not None and got != state:
                    raise SandboxNotReadyError(
                        f"instance {name} not {state} after {timeout_s:g} s (state {got})"
                    )
            # why: the wait answer is thin (uuid/name/state); a read gives fqdn, tags, boot ids.
            inst = self._get_once(name)
            if inst is None:
                raise NotFoundError(f"ukc api {self.metro}: {what}: not found", code=8)
            return inst

        result: Instance = self._retrying(attempt)
        return result

    def plugin_request(
        self,
        uuid: str,
        plugin: str,
        method: str,
        path: str,
        *,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        max_bytes: int,
    ) -> PluginReply:
        if not (
            _UUID.fullmatch(uuid)
            and _PLUGIN_NAME.fullmatch(plugin)
            and _PLUGIN_PATH.fullmatch(path)
        ):
            raise ValueError(f"plugin request {plugin}/{path!r} of {uuid!r} is not a plugin route")
        sent: dict[str, str] = dict(headers or {})
        content: bytes | None = None
        if body is not None:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            sent["content-type"] = "application/json"
        if self._token:
            sent["authorization"] = f"Bearer {self._token}"
        self.request_count += 1
        prefix = f"ukc api {self.metro}: plugin {plugin} {path.split('/', 1)[0]}"
        try:
            with self._client.stream(
                method,
                f"/v1/instances/{uuid}/plugins/{plugin}/{path}",
                content=content,
                headers=sent,
                timeout=httpx.Timeout(timeout_s, connect=10.0),
            ) as response:
                if response.status_code in (401, 403):
                    raise AuthError(
                        f"{prefix}: http {response.status_code}, the token was rejected",
                        status=response.status_code,
                    )
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > max_bytes:
                        raise TransportError(
                            f"{prefix}: answer over {max_bytes} bytes", retryable=False
                        )
                return PluginReply(
                    response.status_code, bytes(data), response.headers.get("content-range")
                )
        except httpx.TimeoutException as err:
            raise TransportError(f"{prefix}: timed out ({type(err).__name__})") from None
        except httpx.TransportError as err:
            raise TransportError(
                f"{prefix}: connection failed ({type(err).__name__}: {self._scrub(str(err))})"
            ) from None

    def close(self) -> None:
        with self._clients_lock:
            self._closed = True
            clients = list(self._clients.values())
        for client in clients:
            client.close()

    def __enter__(self) -> UkcApi:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
