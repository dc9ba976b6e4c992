"""`UkcApi` against a small stateful fake of the platform API (httpx.MockTransport).

The fake keeps instances in creation order, pages with an inclusive `from` cursor, filters
by tags, answers per-item errors inside 200s, and can inject faults per request. Time is
injected, so retries are asserted as lists of sleeps.
"""

from __future__ import annotations

import json
import logging
import random
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from reconciler._util.retry import RetryPolicy
from reconciler.cloud.api import (
    UkcApi,
    metro_base_url,
    normalize_base_url,
    parse_retry_after,
)
from reconciler.cloud.model import CreateRequest, Plugin, Service
from reconciler.errors import (
    AlreadyExistsError,
    ApiError,
    AuthError,
    NotFoundError,
    RateLimitedError,
    SandboxNotReadyError,
    TransportError,
    UkcError,
)

CANARY = "tok-CANARY-7f3a9c1e5d"

Fault = Callable[[httpx.Request], httpx.Response | None]


class FakeUkc:
    """Just enough of the platform API, with a fault queue per "METHOD /path"."""

    def __init__(self, token: str = CANARY) -> None:
        self.token = token
        self.instances: list[dict[str, Any]] = []
        self.requests: list[httpx.Request] = []
        self.faults: dict[str, list[Fault]] = {}
        self.becomes: dict[str, str] = {}

    # -------------------------------------------------------------- helpers for tests
    def add(self, name: str, tags: list[str], state: str = "running") -> dict[str, Any]:
        inst = {
            "uuid": str(uuidlib.UUID(int=len(self.instances) + 1)),
            "name": name,
            "state": state,
            "tags": tags,
            "created_at": "2026-01-01T00:00:00Z",
            "start_count": 1,
            "started_at": "2026-01-01T00:00:01Z",
            "memory_mb": 256,
            "image": "img:1",
            "service_group": {"domains": [{"fqdn": f"{name}.fra.unikraft.app"}]},
            "extra_field": {"ignored": True},
        }
        self.instances.append(inst)
        return inst

    def fault(self, key: str, *faults: Fault) -> None:
        self.faults.setdefault(key, []).extend(faults)

    def by_name(self, name: str) -> dict[str, Any] | None:
        return next((i for i in self.instances if i["name"] == name), None)

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.raw_path.decode()}" for r in self.requests]

    # -------------------------------------------------------------- the server
    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.headers.get("authorization") != f"Bearer {self.token}":
            # why: echo the credential back, as a careless server might, to prove scrubbing
            sent = request.headers.get("authorization", "")
            return httpx.Response(401, json={"status": "error", "message": f"bad {sent}"})
        key = f"{request.method} {request.url.path}"
        queue = self.faults.get(key)
        if queue:
            answer = queue.pop(0)(request)
            if answer is not None:
                return answer
        body = json.loads(request.content) if request.content else None
        return self.route(request, key, body)

    def route(self, request: httpx.Request, key: str, body: Any) -> httpx.Response:
        if key == "GET /v1/instances":
            return self.list(request)
        if key == "POST /v1/instances":
            if self.by_name(body["name"]):
                return ok([{"status": "error", "name": body["name"], "error": 23}], "error")
            inst = self.add(body["name"], body.get("tags", []), state="starting")
            return ok(
                [
                    {
                        "status": "success",
                        **{k: inst[k] for k in ("uuid", "name", "state")},
                        "service_group": inst["service_group"],
                    }
                ]
            )
        if key in ("PUT /v1/instances/start", "PUT /v1/instances/stop"):
            return self.batch(body, "running" if key.endswith("start") else "stopped")
        if key == "DELETE /v1/instances":
            items = []
            for ref in body:
                if "uuid" in ref:
                    inst = next((i for i in self.instances if i["uuid"] == ref["uuid"]), None)
                else:
                    inst = self.by_name(ref["name"])
                if inst is None:
                    items.append({"status": "error", **ref, "error": 8})
                else:
                    self.instances.remove(inst)
                    items.append({"status": "success", "name": inst["name"]})
            return ok(items)
        if key == "GET /v1/instances/wait":
            ref = body[0]
            inst = self.by_name(ref["name"])
            if inst is None:
                return ok([{"status": "error", "name": ref["name"], "error": 8}], "error")
            if ref["name"] in self.becomes:
                inst["state"] = self.becomes.pop(ref["name"])
            if inst["state"] == ref["state"]:
                return ok([{"status": "success", "name": inst["name"], "state": inst["state"]}])
            item = {"status": "error", "name": inst["name"], "state": inst["state"], "error": 12}
            return httpx.Response(
                200,
                json={
                    "status": "error",
                    "message": "Operation timed out",
                    "data": {"instances": [item]},
                },
            )
        return httpx.Response(404, json={"status": "error", "message": "no route"})

    def batch(self, body: list[dict[str, str]], state: str) -> httpx.Response:
        items = []
        for ref in body:
            inst = self.by_name(ref["name"])
            if inst is None:
                items.append({"status": "error", "name": ref["name"], "error": 8})
            else:
                inst["state"] = state
                items.append({"status": "success", "name": inst["name"], "state": state})
        return ok(items)

    def list(self, request: httpx.Request) -> httpx.Response:
        query = parse_qs(urlsplit(str(request.url)).query)
        names = query.get("name", [])
        if names:
            items: list[dict[str, Any]] = []
            for name in names:
                inst = self.by_name(name)
                items.append(
                    {"status": "success", **inst}
                    if inst
                    else {"status": "error", "name": name, "error": 8, "message": "nope"}
                )
            bad = any(i["status"] == "error" for i in items)
            return ok(items, "error" if bad else "success")
        wanted = query["tags"][0].split(",") if "tags" in query else []
        found = [i for i in self.instances if set(wanted).issubset(i["tags"])]
        if "from" in query:
            cursor = query["from"][0]
            idx = next((n for n, i in enumerate(found) if i["uuid"] == cursor), None)
            found = [] if idx is None else found[idx:]
        if "count" in query and int(query["count"][0]) > 0:
            found = found[: int(query["count"][0])]
        return ok([dict(i) for i in found])


def ok(items: list[dict[str, Any]], status: str = "success") -> httpx.Response:
    return httpx.Response(200, json={"status": status, "data": {"instances": items}})


def connect_error(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def answer(status: int, headers: dict[str, str] | None = None) -> Fault:
    def fault(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers=headers, json={"status": "error", "message": "x"})

    return fault


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def sleep(self, s: float) -> None:
        self.sleeps.append(s)
        self.now += s

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def fake() -> FakeUkc:
    return FakeUkc()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def api(fake: FakeUkc, clock: Clock) -> UkcApi:
    return UkcApi(
        "http://127.0.0.1:9999/v1/",
        CANARY,
        metro="local",
        transport=httpx.MockTransport(fake),
        retry=RetryPolicy(max_attempts=4, base_s=1.0, cap_s=4.0, deadline_s=60.0),
        sleep=clock.sleep,
        monotonic=clock.monotonic,
        rng=random.Random(5),
    )


OURS = ["ukc", "ukc.project=abcd1234"]


def request_for(name: str) -> CreateRequest:
    return CreateRequest(
        name=name,
        image="img:1",
        env={"PUBKEY": "ssh-ed25519 AAAA k"},
        tags=OURS,
        memory_mb=512,
        services=(Service(2222, 2222, ("tls",)), Service(443, 8080, ("tls", "http"))),
        scale_to_zero={"policy": "on", "stateful": True, "cooldown_time_ms": 5000},
    )


class TestUrls:
    def test_a_trailing_slash_and_v1_are_stripped(self) -> None:
        assert normalize_base_url("http://127.0.0.1:8080/v1/") == "http://127.0.0.1:8080"
        assert normalize_base_url("https://api.fra.unikraft.cloud") == (
            "https://api.fra.unikraft.cloud"
        )

    def test_a_metro_code_maps_to_its_api_host(self) -> None:
        assert metro_base_url("fra") == "https://api.fra.unikraft.cloud"
        assert metro_base_url("http://127.0.0.1:1/v1") == "http://127.0.0.1:1"
        with pytest.raises(ValueError, match="metro code"):
            metro_base_url("Fra/../x")

    def test_requests_go_below_v1_of_the_normalized_base(self, api: UkcApi, fake: FakeUkc) -> None:
        api.get_instance("x")
        assert str(fake.requests[0].url).startswith("http://127.0.0.1:9999/v1/instances?")


class TestListing:
    def test_a_250_item_listing_is_paged_with_an_inclusive_cursor_and_no_repeats(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        for n in range(300):
            fake.add(f"i{n:03d}", OURS if n % 6 else ["other"])
        ours = [i["name"] for i in fake.instances if i["tags"] == OURS]
        got = api.list_instances(OURS)
        assert [i.name for i in got] == ours
        assert len(ours) == 250
        paths = fake.paths()
        assert (
            paths[0] == "GET /v1/instances?details=true&count=100&tags=ukc,ukc.project%3Dabcd1234"
        )
        assert all("count=101&" in p and "&from=" in p for p in paths[1:])
        assert len(paths) == 3
        assert api.request_count == 3

    def test_instances_without_our_tags_are_dropped_even_if_the_server_ignores_the_filter(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.add("mine", OURS)
        fake.add("theirs", ["ukc"])
        fake.fault("GET /v1/instances", lambda r: ok([dict(i) for i in fake.instances]))
        assert [i.name for i in api.list_instances(OURS)] == ["mine"]

    def test_a_deleted_cursor_resumes_from_an_earlier_one(
        self, fake: FakeUkc, clock: Clock
    ) -> None:
        api = UkcApi(
            "http://h",
            CANARY,
            metro="local",
            transport=httpx.MockTransport(fake),
            page_size=2,
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
        for n in range(7):
            fake.add(f"i{n}", OURS)

        def delete_cursor(request: httpx.Request) -> None:
            if "from=" in str(request.url) and fake.by_name("i3"):
                fake.instances.remove(fake.by_name("i3"))  # type: ignore[arg-type]

        fake.fault("GET /v1/instances", lambda r: None, lambda r: None, delete_cursor)
        names = [i.name for i in api.list_instances(OURS)]
        assert names == ["i0", "i1", "i2", "i3", "i4", "i5", "i6"]

    def test_a_page_is_retried_after_a_server_error(
        self, api: UkcApi, fake: FakeUkc, clock: Clock
    ) -> None:
        fake.add("a", OURS)
        fake.fault("GET /v1/instances", answer(503))
        assert [i.name for i in api.list_instances(OURS)] == ["a"]
        assert len(clock.sleeps) == 1
        assert api.request_count == 2


class TestGet:
    def test_a_missing_name_is_none(self, api: UkcApi) -> None:
        assert api.get_instance("nope") is None

    def test_an_instance_is_parsed_tolerantly(self, api: UkcApi, fake: FakeUkc) -> None:
        inst = fake.add("web", OURS, state="hibernating-in-2030")
        inst["memory_mb"] = "lots"
        inst["tags"] = ["ukc", 7]
        got = api.get_instance("web")
        assert got is not None
        assert got.state == "hibernating-in-2030"
        assert got.fqdn == "web.fra.unikraft.app"
        assert got.memory_mb is None
        assert got.tags == ("ukc",)
        assert got.start_count == 1
        assert got.started_at == "2026-01-01T00:00:01Z"
        assert got.metro == "local"
        assert fake.paths() == ["GET /v1/instances?details=true&name=web"]

    def test_a_non_json_answer_is_an_api_error(self, api: UkcApi, fake: FakeUkc) -> None:
        fake.fault("GET /v1/instances", lambda r: httpx.Response(200, text="<html>"))
        with pytest.raises(ApiError, match="not json"):
            api.get_instance("x")


class TestCreate:
    def test_the_body_is_sandbox_style(self, api: UkcApi, fake: FakeUkc) -> None:
        got = api.create_instance(request_for("s1"))
        body = json.loads(fake.requests[0].content)
        assert body == {
            "name": "s1",
            "image": "img:1",
            "env": {"PUBKEY": "ssh-ed25519 AAAA k"},
            "tags": OURS,
            "autostart": True,
            "memory_mb": 512,
            "service_group": {
                "services": [
                    {"port": 2222, "destination_port": 2222, "handlers": ["tls"]},
                    {"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]},
                ]
            },
            "scale_to_zero": {"policy": "on", "stateful": True, "cooldown_time_ms": 5000},
        }
        assert got.fqdn == "s1.fra.unikraft.app"
        assert got.tags == tuple(OURS)
        assert got.state == "starting"

    def test_plugins_are_sent_only_when_a_transport_asks_for_them(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        api.create_instance(request_for("s1"))
        assert "plugins" not in json.loads(fake.requests[-1].content)
        with_plugin = replace(
            request_for("s2"),
            services=(),
            plugins=(Plugin("sandbox", "plugins/sandbox:latest", {"k": "v"}), Plugin("p", "i")),
        )
        api.create_instance(with_plugin)
        body = json.loads(fake.requests[-1].content)
        assert body["plugins"] == [
            {"name": "sandbox", "image": "plugins/sandbox:latest", "config": {"k": "v"}},
            {"name": "p", "image": "i"},
        ]
        assert "service_group" not in body

    def test_a_taken_name_raises_already_exists_without_retry(
        self, api: UkcApi, fake: FakeUkc, clock: Clock
    ) -> None:
        fake.add("s1", OURS)
        with pytest.raises(AlreadyExistsError, match=r"s1.*code 23"):
            api.create_instance(request_for("s1"))
        assert clock.sleeps == []
        assert fake.paths() == ["POST /v1/instances"]

    def test_a_quota_error_names_the_quota_and_is_not_retried(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.fault(
            "POST /v1/instances",
            lambda r: ok([{"status": "error", "error": 19, "message": "Memory quota"}], "error"),
        )
        with pytest.raises(ApiError, match=r"quota exceeded \(code 19: memory quota") as err:
            api.create_instance(request_for("s1"))
        assert err.value.code == 19
        assert api.request_count == 1

    def test_a_lost_create_answer_is_looked_up_and_reported_taken_instead_of_created_again(
        self, api: UkcApi, fake: FakeUkc, clock: Clock
    ) -> None:
        def lose_answer(request: httpx.Request) -> httpx.Response:
            fake.route(request, "POST /v1/instances", json.loads(request.content))
            raise httpx.ReadTimeout("read timed out", request=request)

        fake.fault("POST /v1/instances", lose_answer)
        # whether to adopt it is the controller's ownership rule, not the wire's
        with pytest.raises(AlreadyExistsError, match="exists after a lost answer"):
            api.create_instance(request_for("s1"))
        assert [i["name"] for i in fake.instances] == ["s1"]
        assert fake.paths() == ["POST /v1/instances", "GET /v1/instances?details=true&name=s1"]
        assert len(clock.sleeps) == 1

    def test_a_failed_create_that_made_nothing_is_retried_after_looking(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.fault("POST /v1/instances", answer(502))
        got = api.create_instance(request_for("s1"))
        assert got.name == "s1"
        assert fake.paths() == [
            "POST /v1/instances",
            "GET /v1/instances?details=true&name=s1",
            "POST /v1/instances",
        ]

    def test_a_name_taken_by_someone_else_after_a_lost_answer_is_not_returned(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        def someone_else(request: httpx.Request) -> httpx.Response:
            fake.add("s1", ["not-ours"])
            raise httpx.ReadTimeout("read timed out", request=request)

        fake.fault("POST /v1/instances", someone_else)
        with pytest.raises(AlreadyExistsError):
            api.create_instance(request_for("s1"))
        assert [r.method for r in fake.requests].count("POST") == 1


class TestErrors:
    def test_429_waits_at_least_retry_after_seconds(
        self, api: UkcApi, fake: FakeUkc, clock: Clock
    ) -> None:
        fake.fault("PUT /v1/instances/start", answer(429, {"Retry-After": "3"}))
        fake.add("s1", OURS, state="stopped")
        api.start_instance("s1")
        assert clock.sleeps == [3.0]
        assert fake.by_name("s1")["state"] == "running"  # type: ignore[index]

    def test_retry_after_as_an_http_date_is_understood(self) -> None:
        now = datetime(2026, 1, 1, tzinfo=UTC)
        later = format_datetime(now + timedelta(seconds=42), usegmt=True)
        assert parse_retry_after(later, now=now) == 42.0
        assert parse_retry_after("soon", now=now) is None
        assert parse_retry_after("1e9") == 3600.0

    def test_persistent_429_gives_up_with_rate_limited_error(
        self, api: UkcApi, fake: FakeUkc, clock: Clock
    ) -> None:
        fake.fault("GET /v1/instances", *[answer(429, {"Retry-After": "30"})] * 5)
        with pytest.raises(RateLimitedError, match="http 429") as err:
            api.get_instance("x")
        assert err.value.retry_after == 30.0
        # a third 30 s wait would pass the 60 s deadline: give up instead of sleeping
        assert clock.sleeps == [30.0, 30.0]
        assert api.request_count == 3

    def test_persistent_5xx_gives_up_after_the_attempts(
        self, api: UkcApi, fake: FakeUkc, clock: Clock
    ) -> None:
        fake.fault("GET /v1/instances", *[answer(500)] * 5)
        with pytest.raises(ApiError, match="http 500") as err:
            api.get_instance("x")
        assert err.value.status == 500
        assert err.value.retryable
        assert api.request_count == 4
        assert len(clock.sleeps) == 3

    def test_connect_errors_become_transport_errors_after_retries(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.fault("GET /v1/instances", *[connect_error] * 5)
        with pytest.raises(TransportError, match="connection failed"):
            api.get_instance("x")
        assert api.request_count == 4

    def test_a_400_is_not_retried(self, api: UkcApi, fake: FakeUkc, clock: Clock) -> None:
        fake.fault("PUT /v1/instances/stop", answer(400))
        with pytest.raises(ApiError, match="http 400"):
            api.stop_instance("s1")
        assert clock.sleeps == []

    def test_a_wrong_token_is_an_auth_error_and_not_retried(
        self, fake: FakeUkc, clock: Clock
    ) -> None:
        fake.token = "the-right-one"
        api = UkcApi(
            "http://h",
            CANARY,
            metro="local",
            transport=httpx.MockTransport(fake),
            sleep=clock.sleep,
            monotonic=clock.monotonic,
        )
        with pytest.raises(AuthError, match="http 401") as err:
            api.list_instances(OURS)
        assert CANARY not in str(err.value)
        assert api.request_count == 1

    def test_no_token_sends_no_authorization_header(self, fake: FakeUkc) -> None:
        api = UkcApi("http://h", None, metro="local", transport=httpx.MockTransport(fake))
        with pytest.raises(AuthError):
            api.get_instance("x")
        assert "authorization" not in fake.requests[0].headers


class TestTokenNeverLeaks:
    def test_the_canary_token_is_in_no_exception_log_or_repr(
        self, api: UkcApi, fake: FakeUkc, caplog: pytest.LogCaptureFixture
    ) -> None:
        caplog.set_level(logging.DEBUG)
        errors: list[BaseException] = []
        fake.fault("GET /v1/instances", connect_error, *[answer(500)] * 4)
        fake.fault("PUT /v1/instances/start", answer(429, {"Retry-After": "1"}))
        fake.fault("PUT /v1/instances/stop", *[connect_error] * 4)
        fake.add("a", OURS)
        for call in (
            lambda: api.get_instance("x"),
            lambda: api.start_instance("nope"),
            lambda: api.stop_instance("a"),
            lambda: api.create_instance(request_for("a")),
        ):
            try:
                call()
            except UkcError as err:
                errors.append(err)
        fake.token = "other"
        try:
            api.delete_instance("a")
        except UkcError as err:
            errors.append(err)
        assert len(errors) == 5
        assert any(isinstance(e, AuthError) for e in errors)
        for err in errors:
            assert CANARY not in str(err)
            assert CANARY not in repr(err)
            assert err.__cause__ is None
            assert err.__context__ is None or CANARY not in repr(err.__context__)
        assert CANARY not in caplog.text
        assert CANARY not in repr(api)
        assert CANARY not in repr(api.__dict__.get("_client"))


class TestActions:
    def test_start_and_stop_send_batch_bodies(self, api: UkcApi, fake: FakeUkc) -> None:
        fake.add("s1", OURS, state="stopped")
        api.start_instance("s1")
        api.stop_instance("s1")
        assert [json.loads(r.content) for r in fake.requests] == [[{"name": "s1"}]] * 2
        assert fake.paths() == ["PUT /v1/instances/start", "PUT /v1/instances/stop"]

    def test_starting_a_missing_instance_is_not_found(self, api: UkcApi) -> None:
        with pytest.raises(NotFoundError, match="start instance gone"):
            api.start_instance("gone")

    def test_delete_returns_false_when_already_gone(self, api: UkcApi, fake: FakeUkc) -> None:
        fake.add("s1", OURS)
        assert api.delete_instance("s1") is True
        assert api.delete_instance("s1") is False
        assert fake.requests[0].method == "DELETE"
        # no retention, and the platform answers once it is gone
        assert json.loads(fake.requests[0].content) == [
            {"name": "s1", "timeout_s": 30, "dont_retain": True}
        ]

    def test_a_delete_by_uuid_names_only_the_uuid(self, api: UkcApi, fake: FakeUkc) -> None:
        inst = fake.add("s1", OURS)
        assert api.delete_instance("s1", uuid=inst["uuid"]) is True
        assert json.loads(fake.requests[0].content) == [
            {"uuid": inst["uuid"], "timeout_s": 30, "dont_retain": True}
        ]
        assert fake.instances == []

    def test_a_delete_by_uuid_leaves_a_new_instance_of_the_same_name_alone(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        old = fake.add("s1", OURS)
        fake.instances.remove(old)
        fake.add("s1", ["someone-else"])["uuid"] = str(uuidlib.uuid4())
        assert api.delete_instance("s1", uuid=old["uuid"]) is False
        assert [i["tags"] for i in fake.instances] == [["someone-else"]]

    def test_a_delete_whose_answer_was_lost_still_reports_deleted(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.add("s1", OURS)

        def lose_answer(request: httpx.Request) -> httpx.Response:
            fake.route(request, "DELETE /v1/instances", json.loads(request.content))
            raise httpx.ReadError("reset", request=request)

        fake.fault("DELETE /v1/instances", lose_answer)
        assert api.delete_instance("s1") is True
        assert fake.instances == []


class TestWait:
    def test_a_reached_state_returns_the_instance_read_back(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.add("s1", OURS, state="starting")
        fake.becomes["s1"] = "running"
        got = api.wait_instance("s1", "running", 45)
        assert got.state == "running"
        assert got.fqdn == "s1.fra.unikraft.app"
        wait = fake.requests[0]
        assert wait.method == "GET"
        assert json.loads(wait.content) == [{"name": "s1", "state": "running", "timeout_s": 45}]
        assert wait.extensions["timeout"]["read"] > 45

    def test_a_lapsed_wait_is_sandbox_not_ready_naming_the_seconds(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.add("s1", OURS, state="starting")
        with pytest.raises(SandboxNotReadyError, match=r"instance s1 not running after 5 s"):
            api.wait_instance("s1", "running", 5)


class TestPlatformRealism:
    def test_a_retained_deleted_instance_is_absent_from_lists_and_gets(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.add("s1", OURS, state="deleted")
        fake.add("s2", OURS)
        assert [i.name for i in api.list_instances(OURS)] == ["s2"]
        assert api.get_instance("s1") is None

    def test_stop_reason_code_and_exit_code_are_read(self, api: UkcApi, fake: FakeUkc) -> None:
        inst = fake.add("s1", OURS, state="stopped")
        inst.update(stop_reason=4, stop_code=1, start_count=0, stopped_at="2026-01-01T00:00:02Z")
        got = api.get_instance("s1")
        assert got is not None
        assert (got.stop_reason, got.stop_code, got.exit_code, got.start_count) == (4, 1, None, 0)
        assert got.stopped_at == "2026-01-01T00:00:02Z"

    def test_a_create_whose_boot_stopped_at_once_is_a_created_instance(
        self, api: UkcApi, fake: FakeUkc
    ) -> None:
        fake.fault(
            "POST /v1/instances",
            lambda r: ok(
                [{"status": "error", "uuid": "u-9", "name": "s1", "state": "stopped"}], "error"
            ),
        )
        got = api.create_instance(request_for("s1"))
        assert (got.uuid, got.state) == ("u-9", "stopped")
