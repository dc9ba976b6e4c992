"""`UkcApi.suspend_instances`: one `PUT /v1/instances/suspend` for many instances (the platform
takes a list), against the local metro's real API app and a few hostile answers through a mock
transport. An instance the platform refuses is refused alone; a refusal that cannot be told
apart from the others fails the whole request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.cloud.api import UkcApi
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


def _until_standby(api: UkcApi, name: str) -> None:
    deadline = time.monotonic() + 5
    while (read := api.get_instance(name)) is not None and read.state != "standby":
        assert time.monotonic() < deadline, f"{name} is {read.state}"
        time.sleep(0.02)


def test_one_request_suspends_every_instance_it_names(metro: InProcessMetro) -> None:
    with UkcApi(metro.url, metro.token, metro="local") as api:
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
    with UkcApi(metro.url, metro.token, metro="local") as api:
        name, ghost = unique(), unique()
        api.create_instance(CreateRequest(name=name, image=IMAGE, env={}, tags=[]))
        api.wait_instance(name, "running", 5)
        refused = api.suspend_instances([ghost, name])
        assert list(refused) == [ghost] and isinstance(refused[ghost], NotFoundError)
        assert ghost in str(refused[ghost])
        _until_standby(api, name)


def _answering(items: list[dict[str, Any]]) -> UkcApi:
    status = "error" if all(i.get("status") == "error" for i in items) else "partial_success"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"status": status, "data": {"instances": items}})

    return UkcApi(
        "https://api.fra.unikraft.cloud", "tok", metro="fra", transport=httpx.MockTransport(handler)
    )


def test_a_refusal_that_names_no_instance_is_placed_by_its_order() -> None:
    items: list[dict[str, Any]] = [
        {"status": "success", "name": "a", "state": "running"},
        {"status": "error", "error": 3, "message": "busy"},
    ]
    with _answering(items) as api:
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
    with _answering(items) as api, pytest.raises(ApiError, match="suspend 2 instance"):
        api.suspend_instances(["a", "b"])
