"""The local metro's platform API over raw HTTP: envelopes, errors, faults, waits, lists.

Most tests talk to the session's real daemon (`api`); the restart-policy tests use the
in-process metro with an injected runtime, because a real sandbox cannot be told to crash.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

import httpx
import pytest

from tests.support.inproc_metro import InProcessMetro, unique

SSH_GROUP = {"services": [{"port": 2222, "destination_port": 2222, "handlers": ["tls"]}]}


def create(api: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("name", unique())
    body.setdefault("image", "ukc/local-sandbox:latest")
    body.setdefault("autostart", False)
    r = api.post("/v1/instances", json=body)
    assert r.status_code == 200, r.text
    item: dict[str, Any] = r.json()["data"]["instances"][0]
    return item


def delete(api: httpx.Client, *names: str) -> None:
    api.request("DELETE", "/v1/instances", json=[{"name": n} for n in names])


def get(api: httpx.Client, name: str) -> dict[str, Any]:
    r = api.get("/v1/instances", params={"name": name})
    item: dict[str, Any] = r.json()["data"]["instances"][0]
    return item


def poll_state(api: httpx.Client, name: str, want: str, timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        item = get(api, name)
        if item.get("state") == want or time.monotonic() > deadline:
            return item
        time.sleep(0.05)


class TestAuthAndEnvelope:
    def test_a_missing_token_is_answered_with_401(self, daemon: Any) -> None:
        r = httpx.get(daemon.api_url + "/v1/instances")
        assert r.status_code == 401
        assert r.json()["status"] == "error"
        assert "op_time_us" in r.json()

    def test_a_wrong_token_is_answered_with_401_without_echoing_it(self, daemon: Any) -> None:
        r = httpx.get(
            daemon.api_url + "/v1/instances", headers={"Authorization": "Bearer nope-secret"}
        )
        assert r.status_code == 401
        assert "nope-secret" not in r.text

    def test_an_unknown_route_is_a_404_envelope(self, api: httpx.Client) -> None:
        r = api.get("/v1/nothing-here")
        assert r.status_code == 404
        assert r.json()["status"] == "error"
        assert r.json()["errors"] == [{"status": 404}]

    def test_a_missing_name_is_item_code_8_inside_a_200(self, api: httpx.Client) -> None:
        r = api.get("/v1/instances", params={"name": "no-such-instance"})
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "error"
        assert body["data"]["instances"][0]["error"] == 8
        assert body["data"]["instances"][0]["name"] == "no-such-instance"

    def test_a_taken_name_is_item_code_23(self, api: httpx.Client) -> None:
        item = create(api)
        try:
            r = api.post(
                "/v1/instances", json={"name": item["name"], "image": "ukc/local-sandbox:latest"}
            )
            assert r.status_code == 200
            assert r.json()["data"]["instances"][0]["error"] == 23
        finally:
            delete(api, item["name"])

    def test_a_batch_with_one_missing_item_is_partial_success(self, api: httpx.Client) -> None:
        item = create(api)
        r = api.request(
            "DELETE", "/v1/instances", json=[{"name": item["name"]}, {"name": "ghost-x1"}]
        )
        body = r.json()
        assert body["status"] == "partial_success"
        assert [i["status"] for i in body["data"]["instances"]] == ["success", "error"]
        assert body["data"]["instances"][1]["error"] == 8


class TestCreateValidation:
    @pytest.mark.parametrize(
        "services",
        [
            [{"port": 2222, "destination_port": 2222, "handlers": ["http"]}],
            [{"port": 443, "destination_port": 8080, "handlers": ["tls"]}],
            [{"port": 80, "destination_port": 8080, "handlers": ["tls", "http"]}],
            [{"port": 2222, "destination_port": 2222, "handlers": ["tls", "redirect"]}],
        ],
    )
    def test_a_handler_rule_violation_is_a_400_envelope(
        self, api: httpx.Client, services: list[dict[str, Any]]
    ) -> None:
        r = api.post(
            "/v1/instances",
            json={
                "name": unique(),
                "image": "ukc/local-sandbox:latest",
                "service_group": {"services": services},
            },
        )
        assert r.status_code == 400
        assert r.json()["status"] == "error"
        assert r.json()["message"]

    def test_timeout_without_autostart_is_refused_with_400(self, api: httpx.Client) -> None:
        r = api.post(
            "/v1/instances",
            json={
                "name": unique(),
                "image": "ukc/local-sandbox:latest",
                "autostart": False,
                "timeout_s": 5,
            },
        )
        assert r.status_code == 400

    def test_delete_on_stop_needs_restart_policy_never(self, api: httpx.Client) -> None:
        r = api.post(
            "/v1/instances",
            json={
                "name": unique(),
                "image": "ukc/local-sandbox:latest",
                "features": ["delete-on-stop"],
                "restart_policy": "always",
            },
        )
        assert r.status_code == 400

    def test_scale_to_zero_needs_a_service_group(self, api: httpx.Client) -> None:
        r = api.post(
            "/v1/instances",
            json={
                "name": unique(),
                "image": "ukc/local-sandbox:latest",
                "scale_to_zero": {"policy": "on"},
            },
        )
        assert r.status_code == 400

    def test_notify_time_must_be_below_cooldown(self, api: httpx.Client) -> None:
        r = api.post(
            "/v1/instances",
            json={
                "name": unique(),
                "image": "ukc/local-sandbox:latest",
                "service_group": SSH_GROUP,
                "scale_to_zero": {"policy": "on", "cooldown_time_ms": 500, "notify_time_ms": 800},
            },
        )
        assert r.status_code == 400

    @pytest.mark.parametrize("memory_mb", [8, 9000])
    def test_memory_outside_the_quota_is_item_code_19(
        self, api: httpx.Client, memory_mb: int
    ) -> None:
        r = api.post(
            "/v1/instances",
            json={"name": unique(), "image": "ukc/local-sandbox:latest", "memory_mb": memory_mb},
        )
        body = r.json()
        assert r.status_code == 200
        assert body["status"] == "error"
        assert body["data"]["instances"][0]["error"] == 19
        assert "8192" in body["data"]["instances"][0]["message"]


class TestReads:
    def test_a_created_instance_reports_its_fqdn_and_defaults(self, api: httpx.Client) -> None:
        name = unique()
        item = create(api, name=name, service_group=SSH_GROUP, tags=["a", "k=v"])
        try:
            assert item["state"] == "stopped"
            assert item["service_group"]["domains"][0]["fqdn"] == f"{name}.local.ukc.localhost"
            full = get(api, name)
            assert full["memory_mb"] == 128
            assert full["private_fqdn"] == f"{name}.internal"
            assert full["private_ip"].startswith("10.0.")
            assert full["tags"] == ["a", "k=v"]
            assert full["created_at"].endswith("Z")
            by_uuid = api.get(f"/v1/instances/{item['uuid']}").json()["data"]["instances"][0]
            assert by_uuid["name"] == name
        finally:
            delete(api, name)

    def test_an_instance_without_service_group_has_no_fqdn(self, api: httpx.Client) -> None:
        item = create(api)
        try:
            assert "service_group" not in get(api, item["name"])
        finally:
            delete(api, item["name"])

    def test_details_false_gives_identity_fields_only(self, api: httpx.Client) -> None:
        item = create(api)
        try:
            r = api.get("/v1/instances", params={"name": item["name"], "details": "false"})
            got = r.json()["data"]["instances"][0]
            assert set(got) <= {"uuid", "name", "status"}
        finally:
            delete(api, item["name"])

    def test_a_tag_filter_keeps_instances_carrying_all_tags(self, api: httpx.Client) -> None:
        mark = unique("tag")
        a = create(api, tags=[mark, "x"])
        b = create(api, tags=[mark])
        try:
            r = api.get(f"/v1/instances?tags={mark},x")
            names = [i["name"] for i in r.json()["data"]["instances"]]
            assert names == [a["name"]]
            r = api.get(f"/v1/instances?tags={mark}")
            assert [i["name"] for i in r.json()["data"]["instances"]] == [a["name"], b["name"]]
        finally:
            delete(api, a["name"], b["name"])

    def test_pages_with_an_inclusive_cursor_cover_every_instance_once(
        self, api: httpx.Client
    ) -> None:
        mark = unique("page")
        made = [create(api, tags=[mark])["uuid"] for _ in range(7)]
        try:
            seen: list[str] = []
            r = api.get(f"/v1/instances?tags={mark}&count=3")
            page = r.json()["data"]["instances"]
            seen += [i["uuid"] for i in page]
            while len(page) == 3:
                r = api.get(f"/v1/instances?tags={mark}&count=4&from={page[-1]['uuid']}")
                page = r.json()["data"]["instances"]
                assert page[0]["uuid"] == seen[-1]
                page = page[1:]
                seen += [i["uuid"] for i in page]
            assert seen == made
        finally:
            api.request("DELETE", "/v1/instances", json=[{"uuid": u} for u in made])

    def test_the_log_carries_lifecycle_lines_in_base64(self, api: httpx.Client) -> None:
        item = create(api)
        try:
            r = api.request("GET", "/v1/instances/log", json=[{"name": item["name"], "offset": 0}])
            got = r.json()["data"]["instances"][0]
            assert b"created" in base64.b64decode(got["output"])
            assert got["available"]["end"] >= len(base64.b64decode(got["output"]))
            r2 = api.request("GET", f"/v1/instances/{item['uuid']}/logs", json={"offset": -5})
            assert len(base64.b64decode(r2.json()["data"]["instances"][0]["output"])) == 5
        finally:
            delete(api, item["name"])

    def test_a_patch_adds_and_removes_tags(self, api: httpx.Client) -> None:
        item = create(api, tags=["one"])
        try:
            r = api.patch(
                "/v1/instances",
                json=[
                    {"name": item["name"], "prop": "tags", "op": "add", "value": ["two"]},
                    {"name": item["name"], "prop": "tags", "op": "del", "value": ["one"]},
                ],
            )
            assert r.json()["status"] == "success"
            assert get(api, item["name"])["tags"] == ["two"]
        finally:
            delete(api, item["name"])


class TestWaitsAndDeletes:
    def test_a_wait_that_lapses_answers_timed_out_with_the_current_state(
        self, api: httpx.Client
    ) -> None:
        item = create(api)
        try:
            t0 = time.monotonic()
            r = api.request(
                "GET",
                "/v1/instances/wait",
                json=[{"name": item["name"], "state": "running", "timeout_s": 0.3}],
            )
            assert time.monotonic() - t0 >= 0.25
            body = r.json()
            assert r.status_code == 200
            assert body["status"] == "error"
            assert "timed out" in body["message"].lower()
            assert body["data"]["instances"][0]["error"] == 12
            assert body["data"]["instances"][0]["state"] == "stopped"
        finally:
            delete(api, item["name"])

    def test_a_wait_with_timeout_zero_answers_at_once(self, api: httpx.Client) -> None:
        item = create(api)
        try:
            r = api.request(
                "GET",
                f"/v1/instances/{item['uuid']}/wait",
                json={"state": "stopped", "timeout_s": 0},
            )
            assert r.json()["status"] == "success"
            assert r.json()["data"]["instances"][0]["state"] == "stopped"
        finally:
            delete(api, item["name"])

    def test_deleting_a_missing_instance_is_item_code_8(self, api: httpx.Client) -> None:
        r = api.request("DELETE", "/v1/instances", json=[{"name": "never-was-here"}])
        assert r.json()["data"]["instances"][0]["error"] == 8
        r = api.delete("/v1/instances/00000000-0000-0000-0000-000000000000")
        assert r.status_code == 200
        assert r.json()["data"]["instances"][0]["error"] == 8

    def test_a_deleted_instance_is_gone_from_reads(self, api: httpx.Client) -> None:
        item = create(api)
        # without retention: a retained one would be listed as `deleted` (test_behaviour.py)
        body = [{"name": item["name"], "timeout_s": 5, "dont_retain": True}]
        r = api.request("DELETE", "/v1/instances", json=body)
        assert r.json()["data"]["instances"][0]["previous_state"] == "stopped"
        assert get(api, item["name"])["error"] == 8


class TestFaults:
    def test_rate_limit_answers_429_with_retry_after_then_recovers(self, api: httpx.Client) -> None:
        api.post("/_local/faults", json={"rate_limit": {"count": 2, "retry_after": 7}})
        try:
            codes = [api.get("/v1/instances?count=1") for _ in range(3)]
            assert [r.status_code for r in codes] == [429, 429, 200]
            assert codes[0].headers["Retry-After"] == "7"
            assert codes[0].json()["status"] == "error"
        finally:
            api.post("/_local/faults", json={"reset": True})

    def test_server_error_answers_the_given_5xx(self, api: httpx.Client) -> None:
        api.post("/_local/faults", json={"server_error": {"count": 1, "status": 502}})
        try:
            assert api.get("/v1/instances?count=1").status_code == 502
            assert api.get("/v1/instances?count=1").status_code == 200
        finally:
            api.post("/_local/faults", json={"reset": True})

    def test_faults_do_not_touch_admin_routes(self, api: httpx.Client) -> None:
        api.post("/_local/faults", json={"rate_limit": {"count": 5}})
        try:
            assert api.get("/_local/status").status_code == 200
        finally:
            api.post("/_local/faults", json={"reset": True})

    def test_latency_is_added_to_api_requests(self, api: httpx.Client) -> None:
        api.post("/_local/faults", json={"latency_ms": 200})
        try:
            t0 = time.monotonic()
            api.get("/v1/instances?count=1")
            assert time.monotonic() - t0 >= 0.2
        finally:
            api.post("/_local/faults", json={"reset": True})

    def test_an_unknown_knob_is_refused(self, api: httpx.Client) -> None:
        r = api.post("/_local/faults", json={"explode": True})
        assert r.status_code == 400

    def test_list_lag_hides_new_instances_from_the_next_lists(self, api: httpx.Client) -> None:
        mark = unique("lag")
        api.post("/_local/faults", json={"list_lag": {"count": 2}})
        item = create(api, tags=[mark])
        try:

            def listed() -> list[str]:
                r = api.get(f"/v1/instances?tags={mark}")
                return [i["name"] for i in r.json()["data"]["instances"]]

            assert [listed(), listed(), listed()] == [[], [], [item["name"]]]
            # a read by name is not a list: it sees the instance at once
            assert get(api, item["name"])["name"] == item["name"]
        finally:
            api.post("/_local/faults", json={"reset": True})
            delete(api, item["name"])

    def test_deleting_live_shows_an_instance_being_deleted_as_stopping_to_the_next_reads(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as api:
            # held `deleted` (name taken) for a while after the DELETE answers
            api.post("/_local/behaviour", json={"delete_hold_s": 5.0}).raise_for_status()
            mark = unique("dying")
            item = create(api, tags=[mark])
            delete(api, item["name"])
            assert get(api, item["name"])["state"] == "deleted"
            api.post("/_local/faults", json={"deleting_live": {"count": 2}}).raise_for_status()

            def listed() -> list[str]:
                r = api.get(f"/v1/instances?tags={mark}")
                return [i["state"] for i in r.json()["data"]["instances"]]

            assert get(api, item["name"])["state"] == "stopping"
            assert listed() == ["stopping"]
            assert listed() == ["deleted"]  # the knob counted down


class TestRestartPolicy:
    """A sandbox that exits by itself (injected runtime)."""

    def _running(self, m: InProcessMetro, c: httpx.Client, **body: Any) -> dict[str, Any]:
        item = create(c, autostart=True, timeout_s=10, **body)
        assert item["state"] == "running", item
        return item

    def test_restart_policy_always_boots_it_again(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            item = self._running(inproc, c, restart_policy="always")
            inproc.crash(item["uuid"], 0)
            got = poll_state(c, item["name"], "running", 5)
            assert got["restart_count"] == 1
            assert got["start_count"] == 2

    def test_restart_policy_never_leaves_it_stopped_with_the_exit_code(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            item = self._running(inproc, c)
            inproc.crash(item["uuid"], 3)
            got = poll_state(c, item["name"], "stopped", 5)
            assert got["exit_code"] == 3
            assert got["stop_reason"] == 3

    def test_out_of_memory_stops_it_with_the_kernel_bit_and_the_oom_stop_code(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            item = self._running(inproc, c)
            inproc.crash(item["uuid"], -9, out_of_memory=True)
            got = poll_state(c, item["name"], "stopped", 5)
            assert (got["stop_reason"], got["stop_code"]) == (1, 0x000C7F04)
            assert "exit_code" not in got
            # a user start clears the stop code with the rest of the stop record
            c.put(f"/v1/instances/{item['uuid']}/start")
            got = poll_state(c, item["name"], "running", 5)
            assert "stop_code" not in got and "stop_reason" not in got

    def test_on_failure_restarts_an_instance_that_ran_out_of_memory(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            item = self._running(inproc, c, restart_policy="on-failure")
            inproc.crash(item["uuid"], -9, out_of_memory=True)
            got = poll_state(c, item["name"], "running", 5)
            assert got["restart_count"] == 1

    def test_on_failure_does_not_restart_a_clean_exit(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            item = self._running(inproc, c, restart_policy="on-failure")
            inproc.crash(item["uuid"], 0)
            got = poll_state(c, item["name"], "stopped", 5)
            assert got["restart_count"] == 0

    def test_delete_on_stop_instances_vanish_when_they_exit(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            item = self._running(inproc, c, features=["delete-on-stop"])
            inproc.crash(item["uuid"], 0)
            deadline = time.monotonic() + 5
            while get(c, item["name"]).get("error") != 8 and time.monotonic() < deadline:
                time.sleep(0.02)
            assert get(c, item["name"])["error"] == 8
            assert item["uuid"] in inproc.runtime.destroyed

    def test_a_boot_failure_ends_stopped_and_a_waiting_create_says_so(
        self, inproc: InProcessMetro
    ) -> None:
        inproc.runtime.fail_next_start = True
        with inproc.client() as c:
            r = c.post(
                "/v1/instances",
                json={
                    "name": unique(),
                    "image": "ukc/local-sandbox:latest",
                    "autostart": True,
                    "timeout_s": 5,
                },
            )
            item = r.json()["data"]["instances"][0]
            assert item["status"] == "error"
            assert item["state"] == "stopped"
            assert get(c, item["name"])["stop_reason"] == 7

    def test_instances_json_is_written_with_mode_0600(self, inproc: InProcessMetro) -> None:
        with inproc.client() as c:
            create(c, env={"SECRET": "x"})
        inproc.call(_save(inproc))
        path = inproc.state_dir / "instances.json"
        assert path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text())["instances"][0]["env"] == {"SECRET": "x"}


async def _save(m: InProcessMetro) -> None:
    m.metro.store.save_now()


SANDBOX_PLUGIN = [{"name": "sandbox", "image": "plugins/sandbox:latest"}]


class TestPluginRoute:
    def test_an_unknown_uuid_is_a_404_envelope(self, api: httpx.Client) -> None:
        r = api.get("/v1/instances/00000000-0000-0000-0000-000000000000/plugins/sandbox/commands")
        assert r.status_code == 404
        assert r.json()["status"] == "error"

    def test_an_instance_without_the_plugin_is_a_404(self, api: httpx.Client) -> None:
        item = create(api)
        try:
            r = api.get(f"/v1/instances/{item['uuid']}/plugins/sandbox/commands")
            assert r.status_code == 404
        finally:
            delete(api, item["name"])

    def test_a_stopped_instance_answers_503(self, api: httpx.Client) -> None:
        item = create(api, plugins=SANDBOX_PLUGIN)
        try:
            r = api.get(f"/v1/instances/{item['uuid']}/plugins/sandbox/commands")
            assert r.status_code == 503
            assert r.json()["status"] == "error"
        finally:
            delete(api, item["name"])

    def test_a_running_instance_relays_status_type_and_body(self, api: httpx.Client) -> None:
        item = create(api, plugins=SANDBOX_PLUGIN, autostart=True, timeout_s=30)
        try:
            base = f"/v1/instances/{item['uuid']}/plugins/sandbox"
            r = api.post(
                base + "/fs/write",
                json={
                    "path": "/workspace/x.txt",
                    "append": False,
                    "encoding": "utf-8",
                    "data": "0123456789",
                },
            )
            assert r.status_code == 200, r.text
            r = api.post(base + "/fs/read_raw", json={"path": "/workspace/x.txt"})
            assert r.headers["content-type"].startswith("application/octet-stream")
            assert r.content == b"0123456789"
            r = api.post(
                base + "/fs/write",
                json={"path": "/workspace", "append": False, "encoding": "utf-8", "data": "x"},
            )
            assert r.status_code == 500
            assert "is a directory" in r.json()["message"].lower()
        finally:
            delete(api, item["name"])


class TestScaleToZero:
    def test_an_idle_instance_goes_to_standby_and_a_plugin_request_wakes_it(
        self, api: httpx.Client
    ) -> None:
        item = create(
            api,
            autostart=True,
            timeout_s=30,
            plugins=SANDBOX_PLUGIN,
            service_group=SSH_GROUP,
            scale_to_zero={"policy": "on", "cooldown_time_ms": 300, "stateful": True},
        )
        try:
            assert item["state"] == "running"
            idle = poll_state(api, item["name"], "standby", 10)
            assert idle["state"] == "standby"
            assert idle["stop_reason"] == 39
            r = api.get(f"/v1/instances/{item['uuid']}/plugins/sandbox/commands")
            assert r.status_code == 200, r.text
            assert get(api, item["name"])["state"] in ("running", "standby")
            assert (
                "scale-to-zero"
                in base64.b64decode(
                    api.request("GET", "/v1/instances/log", json=[{"name": item["name"]}]).json()[
                        "data"
                    ]["instances"][0]["output"]
                ).decode()
            )
        finally:
            delete(api, item["name"])

    def test_a_stateless_standby_boots_cold_on_wake(self, api: httpx.Client) -> None:
        item = create(
            api,
            autostart=True,
            timeout_s=30,
            plugins=SANDBOX_PLUGIN,
            service_group=SSH_GROUP,
            scale_to_zero={"policy": "on", "cooldown_time_ms": 300, "stateful": False},
        )
        try:
            before = poll_state(api, item["name"], "standby", 10)
            r = api.get(f"/v1/instances/{item['uuid']}/plugins/sandbox/commands")
            assert r.status_code == 200, r.text
            after = get(api, item["name"])
            assert after["start_count"] == before["start_count"] + 1
        finally:
            delete(api, item["name"])


def ssh_banner(daemon: Any, fqdn: str, timeout: float = 20.0) -> bytes:
    """One TLS connection through the edge to public port 2222; what sshd says first."""
    import socket
    import ssl

    ctx = ssl.create_default_context(cafile=str(daemon.ca_path))
    with (
        socket.create_connection(
            (daemon.edge_host, daemon.edge_ports[2222]), timeout=timeout
        ) as raw,
        ctx.wrap_socket(raw, server_hostname=fqdn) as tls,
    ):
        tls.settimeout(timeout)
        try:
            return tls.recv(64)
        except (ssl.SSLError, OSError):
            return b""


def banner_within(daemon: Any, fqdn: str, deadline_s: float) -> bytes:
    deadline = time.monotonic() + deadline_s
    got = b""
    while time.monotonic() < deadline:
        try:
            got = ssh_banner(daemon, fqdn)
        except (OSError, ValueError):
            got = b""
        if got.startswith(b"SSH-"):
            return got
        time.sleep(0.05)
    return got


class TestEdge:
    def test_sshd_answers_through_the_edge_by_sni(self, api: httpx.Client, daemon: Any) -> None:
        item = create(api, autostart=True, timeout_s=30, service_group=SSH_GROUP)
        try:
            fqdn = item["service_group"]["domains"][0]["fqdn"]
            assert banner_within(daemon, fqdn, 10).startswith(b"SSH-")
        finally:
            delete(api, item["name"])

    def test_drop_edge_closes_the_next_connection_then_recovers(
        self, api: httpx.Client, daemon: Any
    ) -> None:
        item = create(api, autostart=True, timeout_s=30, service_group=SSH_GROUP)
        try:
            fqdn = item["service_group"]["domains"][0]["fqdn"]
            assert banner_within(daemon, fqdn, 10).startswith(b"SSH-")
            api.post("/_local/faults", json={"drop_edge": {"count": 1}})
            try:
                first = ssh_banner(daemon, fqdn, 5)
            except (OSError, ValueError):
                first = b""
            assert not first.startswith(b"SSH-")
            assert api.get("/_local/status").json()["data"]["faults"]["drop_edge"]["count"] == 0
            assert ssh_banner(daemon, fqdn).startswith(b"SSH-")
        finally:
            api.post("/_local/faults", json={"reset": True})
            delete(api, item["name"])

    def test_edge_traffic_wakes_a_standby_instance(self, api: httpx.Client, daemon: Any) -> None:
        item = create(
            api,
            autostart=True,
            timeout_s=30,
            service_group=SSH_GROUP,
            scale_to_zero={"policy": "on", "cooldown_time_ms": 300, "stateful": True},
        )
        try:
            assert poll_state(api, item["name"], "standby", 10)["state"] == "standby"
            fqdn = item["service_group"]["domains"][0]["fqdn"]
            assert banner_within(daemon, fqdn, 15).startswith(b"SSH-")
        finally:
            delete(api, item["name"])


class TestInstanceQuota:
    def test_creating_beyond_max_instances_is_item_code_19(self, tmp_path: Any) -> None:
        from reconciler.local.state.validation import MetroLimits

        m = InProcessMetro(tmp_path, MetroLimits(max_instances=2))
        try:
            with m.client() as c:
                create(c)
                create(c)
                r = c.post(
                    "/v1/instances", json={"name": unique(), "image": "ukc/local-sandbox:latest"}
                )
                item = r.json()["data"]["instances"][0]
                assert item["error"] == 19
                assert "2 of 2" in item["message"]
        finally:
            m.close()


class TestEdgeRouting:
    """What the edge asks the metro for each connection (`LocalMetro.route_for`)."""

    def test_a_standby_instance_is_woken_and_routed_to_its_destination_port(
        self, inproc: InProcessMetro
    ) -> None:
        group = {"services": [{"port": 2222, "destination_port": 22, "handlers": ["tls"]}]}
        with inproc.client() as c:
            item = create(
                c,
                autostart=True,
                timeout_s=10,
                service_group=group,
                scale_to_zero={"policy": "on", "cooldown_time_ms": 100, "stateful": True},
            )
            assert poll_state(c, item["name"], "standby", 5)["state"] == "standby"
            fqdn = item["service_group"]["domains"][0]["fqdn"]
            route = inproc.call(inproc.metro.route_for(fqdn.upper() + ".", 2222))
            assert route == (item["uuid"], 22)
            assert get(c, item["name"])["state"] == "running"

    def test_unknown_names_undeclared_ports_and_stopped_instances_get_no_route(
        self, inproc: InProcessMetro
    ) -> None:
        with inproc.client() as c:
            item = create(c, service_group=SSH_GROUP)
            fqdn = item["service_group"]["domains"][0]["fqdn"]
            metro = inproc.metro
            assert inproc.call(metro.route_for("nobody.local.ukc.localhost", 2222)) is None
            assert inproc.call(metro.route_for(fqdn, 443)) is None
            assert inproc.call(metro.route_for(fqdn, 2222, 0.5)) is None


def bwrap_pids(daemon: Any, uuid: str) -> list[int]:
    """Host pids of the bwrap processes (monitor and pid 1) of this instance's sandbox."""
    from tests.support.sandboxes import cmdline, sandbox_pids

    workspace = daemon.state_dir / "workspaces" / uuid
    return [p for p in sandbox_pids(workspace) if cmdline(p)[:1] == ["/usr/bin/bwrap"]]


class TestRealSandboxExit:
    def test_a_killed_sandbox_is_restarted_under_restart_policy_always(
        self, api: httpx.Client, daemon: Any
    ) -> None:
        import os
        import signal

        item = create(api, autostart=True, timeout_s=30, restart_policy="always")
        try:
            pids = bwrap_pids(daemon, item["uuid"])
            assert pids
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            got = get(api, item["name"])
            while time.monotonic() < deadline and not (
                got["state"] == "running" and got["restart_count"] == 1
            ):
                time.sleep(0.05)
                got = get(api, item["name"])
            assert got["state"] == "running"
            assert got["restart_count"] == 1
            assert got["start_count"] == 2
        finally:
            delete(api, item["name"])

    def test_a_killed_sandbox_stays_stopped_under_restart_policy_never(
        self, api: httpx.Client, daemon: Any
    ) -> None:
        import os
        import signal

        item = create(api, autostart=True, timeout_s=30)
        try:
            for pid in bwrap_pids(daemon, item["uuid"]):
                os.kill(pid, signal.SIGKILL)
            got = poll_state(api, item["name"], "stopped", 10)
            assert got["state"] == "stopped"
            assert got["stop_reason"] == 3
        finally:
            delete(api, item["name"])


class TestEdgePorts:
    def test_a_new_public_port_is_in_metro_json_when_the_create_answers(
        self, api: httpx.Client, daemon: Any
    ) -> None:
        group = {"services": [{"port": 7001, "destination_port": 7001, "handlers": ["tls"]}]}
        item = create(api, service_group=group)
        try:
            meta = json.loads((daemon.state_dir / "metro.json").read_text())
            assert "7001" in meta["edge_ports"]
            status = api.get("/_local/status").json()["data"]
            assert status["edge_ports"]["7001"] == meta["edge_ports"]["7001"]
        finally:
            delete(api, item["name"])
