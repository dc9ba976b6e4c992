"""What the platform offers a controller, emulated as hard as UKC: autokill deletes an instance
that stayed down, a user's suspend keeps memory and waits for a start, and the account's quota
is readable and enforced with the same numbers."""

from __future__ import annotations

import time
from typing import Any

import httpx

from tests.support.inproc_metro import InProcessMetro, unique

IMAGE = "ukc/local-sandbox:latest"


def create(c: httpx.Client, name: str, **extra: Any) -> dict[str, Any]:
    body = {"name": name, "image": IMAGE, "autostart": True, "timeout_s": 10, **extra}
    item: dict[str, Any] = c.post("/v1/instances", json=body).json()["data"]["instances"][0]
    return item


def get(c: httpx.Client, uuid: str) -> dict[str, Any]:
    item: dict[str, Any] = c.get(f"/v1/instances/{uuid}").json()["data"]["instances"][0]
    return item


def gone_within(c: httpx.Client, uuid: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        item = get(c, uuid)
        if item.get("error") == 8 or item.get("state") == "deleted":
            return True
        time.sleep(0.05)
    return False


def behave(c: httpx.Client, body: dict[str, Any]) -> None:
    c.post("/_local/behaviour", json=body).raise_for_status()


S2Z = {"policy": "on", "stateful": True, "cooldown_time_ms": 60000}
SSH = {"services": [{"port": 2222, "destination_port": 2222, "handlers": ["tls"]}]}


class TestAutokill:
    def test_an_instance_stopped_for_its_autokill_time_is_deleted_by_the_platform(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            item = create(c, unique(), autokill={"time_ms": 300})
            uuid = item["uuid"]
            assert get(c, uuid)["autokill"] == {"time_ms": 300}
            time.sleep(0.5)
            assert get(c, uuid)["state"] == "running", "a running instance is never reclaimed"
            c.put("/v1/instances/stop", json=[{"uuid": uuid}]).raise_for_status()
            assert gone_within(c, uuid, 3.0)

    def test_a_suspended_instance_is_reclaimed_too_unless_only_stopped_counts(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            counted = create(c, unique(), autokill={"time_ms": 300})["uuid"]
            c.put("/v1/instances/suspend", json=[{"uuid": counted}]).raise_for_status()
            assert gone_within(c, counted, 3.0)
            behave(c, {"autokill_counts_standby": False})
            spared = create(c, unique(), autokill={"time_ms": 300})["uuid"]
            c.put("/v1/instances/suspend", json=[{"uuid": spared}]).raise_for_status()
            assert not gone_within(c, spared, 1.0)
            assert get(c, spared)["state"] == "standby"

    def test_autokill_is_changed_by_a_patch_and_zero_turns_it_off(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            uuid = create(c, unique())["uuid"]
            assert get(c, uuid)["autokill"] == {"time_ms": 0}
            patch = [{"uuid": uuid, "prop": "autokill", "op": "set", "value": {"time_ms": 200}}]
            c.patch("/v1/instances", json=patch).raise_for_status()
            assert get(c, uuid)["autokill"] == {"time_ms": 200}
            patch[0]["value"] = {"time_ms": 0}
            c.patch("/v1/instances", json=patch).raise_for_status()
            c.put("/v1/instances/stop", json=[{"uuid": uuid}]).raise_for_status()
            assert not gone_within(c, uuid, 0.8)

    def test_a_malformed_autokill_is_refused(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            body = {"name": unique(), "image": IMAGE, "autokill": {"time_ms": -1}}
            assert c.post("/v1/instances", json=body).status_code == 400
            body["autokill"] = {"time_ms": 10, "num_requests": 5}
            item = c.post("/v1/instances", json=body).json()["data"]["instances"][0]
            assert item["status"] == "error" and item["error"] == 1


class TestSuspend:
    def test_a_suspend_keeps_memory_and_only_a_start_wakes_it(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            uuid = create(c, unique(), service_group=SSH)["uuid"]
            c.put("/v1/instances/suspend", json=[{"uuid": uuid}]).raise_for_status()
            deadline = time.monotonic() + 3
            while get(c, uuid)["state"] != "standby" and time.monotonic() < deadline:
                time.sleep(0.02)
            assert uuid in inproc.runtime.frozen, "a suspend snapshots memory (frozen)"
            rec = inproc.metro.records[uuid]
            assert not inproc.call(inproc.metro.ensure_running(rec, 0.5))
            assert get(c, uuid)["state"] == "standby", "traffic does not wake a suspended one"
            c.put("/v1/instances/start", json=[{"uuid": uuid, "timeout_s": 5}]).raise_for_status()
            assert get(c, uuid)["state"] == "running"
            assert uuid not in inproc.runtime.frozen and inproc.runtime.starts == [uuid], (
                "the start thawed the sandbox; it did not boot it again"
            )

    def test_a_suspend_sent_again_before_the_first_one_froze_keeps_the_memory(
        self, inproc: InProcessMetro
    ) -> None:
        # as a client does when the first request's answer was lost and it retries
        inproc.runtime.freeze_delay_s = 0.3
        with inproc.client() as c:
            uuid = create(c, unique(), service_group=SSH)["uuid"]
            for _ in range(2):
                c.put("/v1/instances/suspend", json=[{"uuid": uuid}]).raise_for_status()
            deadline = time.monotonic() + 3
            while get(c, uuid)["state"] != "standby" and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(0.2)  # the second request's work, had it been started
            assert get(c, uuid)["state"] == "standby"
            assert uuid in inproc.runtime.frozen and uuid in inproc.runtime.running, (
                "the second suspend stopped the frozen sandbox: its memory is gone"
            )
            c.put("/v1/instances/start", json=[{"uuid": uuid, "timeout_s": 5}]).raise_for_status()
            assert inproc.runtime.starts == [uuid], "the start thawed it, not a new boot"

    def test_a_suspend_of_many_instances_is_answered_before_they_are_frozen(
        self, inproc: InProcessMetro
    ) -> None:
        # as on UKC, whose answer does not wait for the snapshot: here each freeze's first
        # pass holds the metro's loop (listing and stopping the sandbox's processes)
        inproc.runtime.freeze_block_s = 0.05
        with inproc.client() as c:
            uuids = [create(c, unique(), service_group=SSH)["uuid"] for _ in range(8)]
            c.put("/v1/instances/suspend", json=[{"uuid": u} for u in uuids]).raise_for_status()
            answered = time.monotonic()
            deadline = answered + 5
            while len(inproc.runtime.frozen) < len(uuids) and time.monotonic() < deadline:
                time.sleep(0.02)
            assert set(uuids) <= inproc.runtime.frozen
            assert answered < max(inproc.runtime.first_passes), (
                "the answer waited until every sandbox's freeze had held the loop"
            )
            while any(get(c, u)["state"] != "standby" for u in uuids):
                assert time.monotonic() < deadline
                time.sleep(0.02)

    def test_traffic_wakes_a_suspended_instance_when_the_behaviour_says_so(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            behave(c, {"suspend_woken_by_traffic": True})
            uuid = create(c, unique(), service_group=SSH, scale_to_zero=S2Z)["uuid"]
            c.put("/v1/instances/suspend", json=[{"uuid": uuid}]).raise_for_status()
            deadline = time.monotonic() + 3
            while get(c, uuid)["state"] != "standby" and time.monotonic() < deadline:
                time.sleep(0.02)
            rec = inproc.metro.records[uuid]
            assert inproc.call(inproc.metro.ensure_running(rec, 3.0))


class TestQuotas:
    def test_the_quota_answer_counts_the_metros_records_against_its_limits(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            c.post(
                "/_local/quotas", json={"instances": 7, "live_memory_mb": 4096}
            ).raise_for_status()
            create(c, unique(), memory_mb=512)
            stopped = create(c, unique(), memory_mb=256)["uuid"]
            c.put("/v1/instances/stop", json=[{"uuid": stopped}]).raise_for_status()
            c.post("/v1/volumes", json={"size_mb": 100}).raise_for_status()
            deadline = time.monotonic() + 3
            while get(c, stopped)["state"] != "stopped" and time.monotonic() < deadline:
                time.sleep(0.02)
            body = c.get("/v1/users/quotas").json()
            (quota,) = body["data"]["quotas"]
            assert quota["hard"] == {"instances": 7, "live_memory_mb": 4096, "volumes": 1000}
            used = quota["used"]
            assert (used["instances"], used["live_instances"], used["live_memory_mb"]) == (
                2,
                1,
                512,
            )
            assert (used["volumes"], used["total_volume_mb"]) == (1, 100)
            assert (
                quota["limits"]["min_memory_mb"] == 16 and quota["limits"]["max_memory_mb"] == 8192
            )

    def test_a_boot_past_the_live_memory_quota_is_refused_with_code_19(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            c.post("/_local/quotas", json={"live_memory_mb": 1000}).raise_for_status()
            first = create(c, unique(), memory_mb=600)
            assert first["status"] == "success"
            second = create(c, unique(), memory_mb=600)
            assert second["status"] == "error" and second["error"] == 19
            assert "1000" in second["message"] and "600" in second["message"]
            parked = c.post(
                "/v1/instances", json={"name": unique(), "image": IMAGE, "memory_mb": 600}
            ).json()["data"]["instances"][0]
            assert parked["status"] == "success", "a stopped instance uses no live memory"
            started = c.put("/v1/instances/start", json=[{"uuid": parked["uuid"]}]).json()
            assert started["data"]["instances"][0]["error"] == 19

    def test_an_unknown_or_negative_quota_setting_is_refused(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            assert c.post("/_local/quotas", json={"cpus": 2}).status_code == 400
            assert c.post("/_local/quotas", json={"instances": -1}).status_code == 400
