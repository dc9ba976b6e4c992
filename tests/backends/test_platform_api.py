"""`UkcApi`'s autokill, suspend and quota calls against the local metro's real API app (and a
few hostile answers through a mock transport): what goes on the wire and how answers are read."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.cloud.api import UkcApi, parse_instance
from reconciler.cloud.model import CreateRequest
from reconciler.errors import ApiError
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


def test_suspend_puts_a_running_instance_in_standby(metro: InProcessMetro) -> None:
    with api_of(metro) as api:
        name = unique()
        api.create_instance(CreateRequest(name=name, image=IMAGE, env={}, tags=[]))
        api.wait_instance(name, "running", 5)
        api.suspend_instance(name)
        deadline = time.monotonic() + 3
        while (read := api.get_instance(name)) is not None and read.state != "standby":
            assert time.monotonic() < deadline
            time.sleep(0.02)


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
