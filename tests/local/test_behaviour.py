"""The local metro as hard as UKC: asynchronous deletes that keep the name and a `deleted`
record, a missing image that stops with the platform's code, and the behaviour knobs."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest

from reconciler.errors import ApiError
from reconciler.local import behaviour
from tests.support.inproc_metro import InProcessMetro, unique


def create(client: httpx.Client, name: str, image: str = "ukc/local-sandbox:latest") -> str:
    body = {"name": name, "image": image, "autostart": True, "timeout_s": 10}
    item = client.post("/v1/instances", json=body).json()["data"]["instances"][0]
    assert item["status"] == "success", item
    return str(item["uuid"])


def get(client: httpx.Client, uuid: str) -> dict[str, Any]:
    return client.get(f"/v1/instances/{uuid}").json()["data"]["instances"][0]  # type: ignore[no-any-return]


def behave(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    answer = client.post("/_local/behaviour", json=body)
    answer.raise_for_status()
    return answer.json()  # type: ignore[no-any-return]


def test_a_deleted_instance_keeps_its_name_while_it_is_torn_down(inproc: InProcessMetro) -> None:
    with inproc.client() as c:
        behave(c, {"delete_hold_s": 1.0, "retention_s": 0.0})
        name = unique()
        uuid = create(c, name)
        c.request("DELETE", "/v1/instances", json=[{"uuid": uuid}]).raise_for_status()
        assert get(c, uuid)["state"] == "deleted"
        again = c.post("/v1/instances", json={"name": name, "image": "ukc/local-sandbox:latest"})
        assert again.json()["data"]["instances"][0]["error"] == 23
        time.sleep(1.5)
        assert get(c, uuid)["error"] == 8
        create(c, name)


def test_a_retained_instance_stays_deleted_with_retained_until_unless_dont_retain(
    inproc: InProcessMetro,
) -> None:
    with inproc.client() as c:
        behave(c, {"delete_hold_s": 0.2, "retention_s": 60.0})
        kept, dropped = create(c, unique()), create(c, unique())
        c.request("DELETE", "/v1/instances", json=[{"uuid": kept}]).raise_for_status()
        started = time.monotonic()
        c.request(
            "DELETE",
            "/v1/instances",
            json=[{"uuid": dropped, "dont_retain": True, "timeout_s": 10}],
        ).raise_for_status()
        # `timeout_s` held the answer until the name was free
        assert get(c, dropped)["error"] == 8
        assert time.monotonic() - started >= 0.2
        retained = get(c, kept)
        assert retained["state"] == "deleted" and "retained_until" in retained
        listed = c.get("/v1/instances").json()["data"]["instances"]
        assert [i["state"] for i in listed if i["uuid"] == kept] == ["deleted"]


def test_the_kind_preset_frees_the_name_at_once(inproc: InProcessMetro) -> None:
    with inproc.client() as c:
        behave(c, {"preset": "kind"})
        name = unique()
        uuid = create(c, name)
        c.request("DELETE", "/v1/instances", json=[{"uuid": uuid}]).raise_for_status()
        create(c, name)


def test_an_unknown_image_stops_within_a_second_with_nomedium_and_no_start(
    inproc: InProcessMetro,
) -> None:
    with inproc.client() as c:
        behave(c, {"known_images_only": True})
        started = time.monotonic()
        body = {"name": unique(), "image": "nobody/no-such-image:1", "autostart": True}
        item = c.post("/v1/instances", json={**body, "timeout_s": 10}).json()
        item = item["data"]["instances"][0]
        # as UKC answers a create whose boot stopped: an error item in state stopped
        assert (item["status"], item["state"]) == ("error", "stopped")
        assert time.monotonic() - started < 1.0
        inst = get(c, item["uuid"])
        assert (inst["state"], inst["stop_reason"], inst["stop_code"]) == ("stopped", 4, 1)
        assert inst["start_count"] == 0
        assert create(c, unique(), image="ukc/local-minimal:latest")


def test_a_knob_the_metro_does_not_know_is_refused(inproc: InProcessMetro) -> None:
    with inproc.client() as c:
        answer = c.post("/_local/behaviour", json={"delete_hold": 1})
        assert answer.status_code == 400 and "delete_hold" in answer.text
        assert c.post("/_local/behaviour", json={"ssh_delay_s": -1}).status_code == 400
        assert c.post("/_local/behaviour", json={"preset": "cruel"}).status_code == 400


def test_the_environment_names_a_preset_or_overrides_knobs() -> None:
    assert behaviour.from_env({"UKC_LOCAL_BEHAVIOUR": "kind"}) == behaviour.PRESETS["kind"]
    tuned = behaviour.from_env({"UKC_LOCAL_BEHAVIOUR": '{"preset": "realistic", "ssh_delay_s": 2}'})
    assert tuned.ssh_delay_s == 2.0 and tuned.known_images_only
    with pytest.raises(ApiError, match="UKC_LOCAL_BEHAVIOUR"):
        behaviour.from_env({"UKC_LOCAL_BEHAVIOUR": "cruel"})
