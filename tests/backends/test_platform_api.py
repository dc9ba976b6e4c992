"""`UkcApi`'s autokill, suspend and quota calls against the local metro's real API app (and a
few hostile answers through a mock transport): what goes on the wire and how answers are read.
A suspend names many instances in one request (the platform takes a list): an instance the
platform refuses is refused alone; a refusal that cannot be told apart from the others fails
the whole request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.cloud.api import UkcApi, parse_instance
from reconciler.cloud.model import CreateRequest
from reconciler.errors import ApiError, NotFoundError
from tests.support.inproc_metro import InProcessMetro, unique

IMAGE = "ukc/local-sandbox:latest"


@pytest.fixture
def metro(tmp_path: Path) -> Iterator[InProcessMetro]:
    m = InProcessMetro(tmp_path)
    try:
        yield m
    finally:
        m.close()


def api_of(metro: InProcessMetro) -> UkcApi:
    return UkcApi(metro.url, metro.token, metro="local")


def test_a_create_sends_autokill_and_reads_show_it(metro: InProcessMetro) -> None:
    with api_of(metro) as api:
        name = unique()
        made = api.create_instance(
            CreateRequest(name=name, image=IMAGE, env={}, tags=["t"], autokill_ms=90_000)
        )
        assert made.autokill_ms == 90_000
        read = api.get_instance(name)
        assert read is not None and read.autokill_ms == 90_000
        plain = api.create_instance(CreateRequest(name=unique(), image=IMAGE, env={}, tags=[]))
        assert plain.autokill_ms == 0


def test_set_autokill_patches_exactly_that_instance(metro: InProcessMetro) -> None:
    with api_of(metro) as api:
        name = unique()
        made = api.create_instance(CreateRequest(name=name, image=IMAGE, env={}, tags=[]))
        api.set_autokill(name, uuid=made.uuid, time_ms=5000)
        read = api.get_instance(name)
        assert read is not None and read.autokill_ms == 5000


def _until_standby(api: UkcApi, name: str) -> None:
    deadline = time.monotonic() + 5
    while (read := api.get_instance(name)) is not None and read.state != "standby":
        assert time.monotonic() < deadline, f"{name} is {read.state}"
        time.sleep(0.02)


def test_one_request_suspends_every_instance_it_names(metro: InProcessMetro) -> None:
    with api_of(metro) as api:
        names = [unique() for _ in range(3)]
        for name in names:
            api.create_instance(CreateRequest(name=name, image=IMAGE, env={}, tags=[]))
        for name in names:
            api.wait_instance(name, "running", 5)
        before = api.request_count
        assert api.suspend_instances(names) == {}
        assert api.request_count == before + 1
        for name in names:
            _until_standby(api, name)


def test_an_instance_the_platform_refuses_is_refused_alone(metro: InProcessMetro) -> None:
    with api_of(metro) as api:
        name, ghost = unique(), unique()
        api.create_instance(CreateRequest(name=name, image=IMAGE, env={}, tags=[]))
        api.wait_instance(name, "running", 5)
        refused = api.suspend_instances([ghost, name])
        assert list(refused) == [ghost] and isinstance(refused[ghost], NotFoundError)
        assert ghost in str(refused[ghost])
        _until_standby(api, name)


def test_the_quota_is_read_with_what_is_used_and_the_hard_limits(metro: InProcessMetro) -> None:
    with api_of(metro) as api:
        api.create_instance(CreateRequest(name=unique(), image=IMAGE, env={}, tags=[]))
        quota = api.get_quotas()
        assert quota.used.instances == 1 and quota.hard.instances == 5000
        assert quota.room("instances") == 4999
        assert quota.limits.max_memory_mb == 8192


def _answering(body: Any, status: int = 200) -> UkcApi:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    return UkcApi(
        "https://api.fra.unikraft.cloud", "tok", metro="fra", transport=httpx.MockTransport(handler)
    )


def test_a_quota_answer_with_odd_values_is_read_as_not_said() -> None:
    body = {
        "status": "success",
        "data": {
            "quotas": [
                {
                    "used": {"instances": "many", "live_memory_mb": -5, "volumes": True},
                    "hard": ["not", "an", "object"],
                    "limits": {"max_memory_mb": 4096.5},
                    "surprise": {"nested": 1},
                }
            ]
        },
    }
    with _answering(body) as api:
        quota = api.get_quotas()
    assert quota.used.instances is None and quota.used.live_memory_mb is None
    assert quota.used.volumes is None and quota.hard.instances is None
    assert quota.limits.max_memory_mb is None
    assert quota.room("instances") is None


def test_an_answer_without_a_quota_is_an_error_naming_what_was_read() -> None:
    api = _answering({"status": "success", "data": {"quotas": []}})
    with api, pytest.raises(ApiError, match="quota"):
        api.get_quotas()


def test_a_read_without_autokill_says_nothing_and_a_null_one_says_none() -> None:
    base = {"uuid": "u", "name": "n", "state": "running"}
    assert parse_instance(base, "fra") is not None
    assert parse_instance(base, "fra").autokill_ms is None  # type: ignore[union-attr]
    assert parse_instance({**base, "autokill": None}, "fra").autokill_ms == 0  # type: ignore[union-attr]
    garbled = {**base, "autokill": {"time_ms": "soon"}}
    assert parse_instance(garbled, "fra").autokill_ms == 0  # type: ignore[union-attr]


def _suspend_answer(items: list[dict[str, Any]]) -> dict[str, Any]:
    status = "error" if all(i.get("status") == "error" for i in items) else "partial_success"
    return {"status": status, "data": {"instances": items}}


def test_a_refusal_that_names_no_instance_is_placed_by_its_order() -> None:
    items: list[dict[str, Any]] = [
        {"status": "success", "name": "a", "state": "running"},
        {"status": "error", "error": 3, "message": "busy"},
    ]
    with _answering(_suspend_answer(items)) as api:
        refused = api.suspend_instances(["a", "b"])
    assert list(refused) == ["b"] and "busy" in str(refused["b"])


@pytest.mark.parametrize(
    "items",
    [
        [{"status": "error", "error": 3, "message": "busy"}],
        [{"status": "success", "name": "a"}, {"status": "error", "name": "c", "error": 3}],
    ],
    ids=["fewer items than asked, unnamed", "an instance not asked for"],
)
def test_a_refusal_that_cannot_be_placed_fails_the_whole_request(
    items: list[dict[str, Any]],
) -> None:
    with (
        _answering(_suspend_answer(items)) as api,
        pytest.raises(ApiError, match="suspend 2 instance"),
    ):
        api.suspend_instances(["a", "b"])
