"""`ukc doctor` against a real local metro: every assumption holds on it, and each one fails
clearly when a metro knob (or a small fake in front of the API) breaks it; the shared report
never names the token, an FQDN or a uuid."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.cloud.api import UkcApi
from reconciler.cloud.metros import MetroConnection, MetroRegistry
from reconciler.cloud.model import CloudApi, CreateRequest, Instance
from reconciler.cloud.quotas import Quota
from reconciler.cloud.trust import Reach
from reconciler.errors import ApiError, SandboxNotReadyError
from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from reconciler.reconcile.doctor import CHECKS, Budgets, Probe
from reconciler.reconcile.doctor_report import Result

IMAGE = "ukc/local-sandbox:latest"
#: short waits, and no wake (its idle wait is the session's cooldown, seconds)
FAST = Budgets(boot_s=20.0, ssh_s=10.0, name_free_s=10.0, edge_s=2.0, wake_s=0.0)


@pytest.fixture(scope="module")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetroInfo]:
    state_dir = tmp_path_factory.mktemp("doctor-metro")
    info = metro_daemon.ensure_running(state_dir)
    try:
        yield info
    finally:
        metro_daemon.stop(state_dir)


@pytest.fixture
def conn(metro: MetroInfo) -> Iterator[MetroConnection]:
    knobs(metro, "/_local/behaviour", {"preset": "realistic"})
    knobs(metro, "/_local/faults", {"reset": True})
    registry = MetroRegistry(os.environ, local_state_dir=metro.state_dir)
    try:
        yield registry.get("local")
    finally:
        registry.close()
        knobs(metro, "/_local/faults", {"reset": True})
        knobs(metro, "/_local/behaviour", {"preset": "realistic"})


def knobs(metro: MetroInfo, path: str, body: dict[str, Any]) -> None:
    with httpx.Client(
        base_url=metro.api_url, headers={"Authorization": f"Bearer {metro.token}"}
    ) as client:
        client.post(path, json=body).raise_for_status()


def probe(
    api: CloudApi,
    reach: Reach,
    *,
    image: str = "ukc/local-sandbox:latest",
    budgets: Budgets = FAST,
) -> dict[str, Result]:
    results = Probe(api, reach, image=image, budgets=budgets).execute()
    assert [r.name for r in results] == list(CHECKS)
    return {r.name: r for r in results}


def outcomes(found: dict[str, Result]) -> dict[str, str]:
    return {name: r.outcome for name, r in found.items()}


def assert_clean(metro: MetroInfo) -> None:
    """The probe left no instance of its own behind."""
    with httpx.Client(
        base_url=metro.api_url, headers={"Authorization": f"Bearer {metro.token}"}
    ) as client:
        listed = client.get("/v1/instances?tags=ukc.project%3Ddoctor").json()["data"]
    live = [i for i in listed.get("instances", []) if i.get("state") != "deleted"]
    assert live == []


class Wrapped:
    """A `CloudApi` in front of the real one; subclasses change one answer (a fault knob)."""

    def __init__(self, api: UkcApi) -> None:
        self.inner = api
        self.metro = api.metro

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_every_assumption_holds_on_the_local_metro(metro: MetroInfo, conn: MetroConnection) -> None:
    found = probe(conn.api, conn.reach, budgets=replace(FAST, wake_s=30.0))
    assert outcomes(found) == {n: "PASS" for n in CHECKS}, {
        n: (r.summary, r.error) for n, r in found.items()
    }
    assert isinstance(found["quotas"].figures["instances_left"], int)
    assert found["states"].figures["states"] in ("starting > running", "running")
    assert found["edge_tls"].figures["trust_store"] == "local metro CA"
    assert isinstance(found["ssh"].figures["after_running_s"], float)
    assert found["wake"].figures["idle_state"] == "standby"
    # the realistic metro moves start_count on a stateful wake; memory (the marker) is kept
    assert found["wake"].figures["start_count_moved"] is True
    assert found["wake"].figures["memory_kept"] is True
    assert "start_count 1 -> 2" in found["wake"].summary
    assert_clean(metro)


def test_the_wake_check_reports_a_start_count_that_a_wake_leaves_alone(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    knobs(metro, "/_local/behaviour", {"preset": "realistic", "wake_moves_start_count": False})
    try:
        found = probe(conn.api, conn.reach, budgets=replace(FAST, wake_s=30.0))
    finally:
        knobs(metro, "/_local/behaviour", {"preset": "realistic"})
    wake = found["wake"]
    assert wake.outcome == "PASS", wake
    assert wake.figures["start_count_moved"] is False
    assert "start_count kept (1)" in wake.summary
    assert_clean(metro)


def test_the_command_prints_a_line_per_check_and_writes_a_report_without_identities(
    metro: MetroInfo, tmp_path: Path
) -> None:
    knobs(metro, "/_local/behaviour", {"preset": "realistic"})
    report = tmp_path / "doctor.json"
    env = {**os.environ, "UKC_LOCAL_STATE_DIR": str(metro.state_dir), "UKC_WARM": "0"}
    env.pop("UKC_METRO", None)
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "doctor", "--report", str(report)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines[: len(CHECKS)]] == list(CHECKS)
    document = json.loads(report.read_text())
    assert document["failed"] == 0 and document["about"]["metro"] == "local"
    assert metro.token not in report.read_text() + done.stdout


def test_the_command_exits_1_on_a_failed_check_and_its_report_says_which(
    metro: MetroInfo, tmp_path: Path
) -> None:
    knobs(metro, "/_local/behaviour", {"preset": "realistic"})
    report = tmp_path / "doctor.json"
    env = {**os.environ, "UKC_LOCAL_STATE_DIR": str(metro.state_dir), "UKC_WARM": "0"}
    env.pop("UKC_METRO", None)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "reconciler",
            "doctor",
            "--image",
            "nobody/no-such-image:1",
            "--report",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "FAIL  states" in done.stdout, done.stdout
    document = json.loads(report.read_text())
    assert document["failed"] == 1
    assert [c["name"] for c in document["checks"] if c["result"] == "FAIL"] == ["states"]


def test_on_a_remote_metro_the_image_must_be_named_before_anything_is_created() -> None:
    env = {k: v for k, v in os.environ.items() if k != "UKC_SANDBOX_IMAGE"}
    env |= {"UKC_WARM": "0", "UKC_TOKEN": "t" * 30}
    done = subprocess.run(
        [sys.executable, "-m", "reconciler", "doctor", "--metro", "fra"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--image or $UKC_SANDBOX_IMAGE" in done.stderr and "t" * 30 not in done.stderr


def test_a_refused_token_fails_auth_and_probes_nothing_else(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    with UkcApi(metro.api_url, "not-the-token", metro="local") as api:
        found = probe(api, conn.reach)
    assert found["auth"].outcome == "FAIL"
    assert found["auth"].figures["error_kind"] == "AuthError"
    assert {r.outcome for n, r in found.items() if n != "auth"} == {"SKIP"}


def test_a_missing_image_fails_the_states_check_with_its_stop_code(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    found = probe(conn.api, conn.reach, image="nobody/no-such-image:1")
    states = found["states"]
    assert states.outcome == "FAIL", states
    assert states.figures["stop_reason"] == 4 and states.figures["stop_code"] == 1
    assert found["ssh"].outcome == "SKIP"
    assert_clean(metro)


def test_a_key_installed_later_than_the_budget_fails_ssh(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    knobs(metro, "/_local/behaviour", {"key_delay_s": 4.0})
    found = probe(conn.api, conn.reach, budgets=Budgets(boot_s=20.0, ssh_s=1.5, edge_s=2.0))
    assert found["ssh"].outcome == "FAIL", found["ssh"]
    assert found["ssh"].figures["error_kind"] in ("KeyRejectedError", "SandboxNotReadyError")
    assert found["tools"].outcome == "SKIP"
    assert found["edge_tls"].outcome == "PASS"
    assert_clean(metro)


def test_an_edge_that_drops_connections_fails_edge_tls(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    knobs(metro, "/_local/behaviour", {"ssh_delay_s": 0.0, "key_delay_s": 0.0})
    knobs(metro, "/_local/faults", {"drop_edge": {"count": 10_000}})
    found = probe(conn.api, conn.reach, budgets=Budgets(boot_s=20.0, ssh_s=1.0, edge_s=1.0))
    assert found["edge_tls"].outcome == "FAIL", found["edge_tls"]
    assert found["edge_tls"].figures["attempts"] > 1
    knobs(metro, "/_local/faults", {"reset": True})
    assert_clean(metro)


def test_a_certificate_the_chosen_trust_store_does_not_vouch_for_fails_edge_tls(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    import certifi

    certifi_only = Reach(
        ssl.create_default_context(cafile=certifi.where()), conn.reach.address, "certifi"
    )
    found = probe(conn.api, certifi_only, budgets=Budgets(boot_s=20.0, ssh_s=1.0, edge_s=1.0))
    edge = found["edge_tls"]
    assert edge.outcome == "FAIL" and edge.figures["attempts"] == 1
    assert "certificate rejected" in (edge.error or "")
    assert "certifi" in edge.summary


def test_a_list_that_lags_behind_a_create_fails_the_tag_filter(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    # auth's list, then the two lists of the tag filter do not show the new instance yet
    knobs(metro, "/_local/faults", {"list_lag": {"count": 3}})
    found = probe(conn.api, conn.reach)
    assert found["auth"].outcome == "PASS"
    assert found["tag_filter"].outcome == "FAIL", found["tag_filter"]
    assert found["tag_filter"].figures["listed"] == 0
    assert found["pagination"].outcome == "PASS"
    assert_clean(metro)


class ImpatientWait(Wrapped):
    """A platform whose wait answers "not reached" at once, whatever its timeout."""

    def wait_instance(self, name: str, state: str, timeout_s: float) -> Instance:
        current = self.inner.get_instance(name)
        if current is not None and current.state == state:
            return current
        raise SandboxNotReadyError(f"instance {name} not {state}")


def test_a_wait_that_does_not_wait_fails_the_wait_check(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(ImpatientWait(conn.api), conn.reach)
    assert found["wait"].outcome == "FAIL", found["wait"]
    assert found["wait"].figures["lapse_s"] < 0.5
    assert_clean(metro)


class NoFqdn(Wrapped):
    """A platform whose instance reads lack `service_group.domains[0].fqdn`."""

    def get_instance(self, name: str) -> Instance | None:
        found = self.inner.get_instance(name)
        if found is None:
            return None
        return Instance(**{**found.__dict__, "fqdn": None})


def test_an_instance_read_without_an_fqdn_fails_the_fqdn_check(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(NoFqdn(conn.api), conn.reach)
    assert found["fqdn"].outcome == "FAIL"
    assert found["ssh"].outcome == "SKIP" and found["edge_tls"].outcome == "SKIP"
    assert found["delete"].outcome == "PASS"
    assert_clean(metro)


class Doubled(Wrapped):
    """A platform whose cursor pages repeat what the client already has (seen as a second
    copy: what an exclusive `from` read as inclusive would do to a careless client)."""

    def paged(self, page_size: int) -> CloudApi:
        inner = self.inner.paged(page_size)

        class Twice(Wrapped):
            def list_instances(self, tags: Sequence[str]) -> list[Instance]:
                found = self.inner.list_instances(tags)
                return found + found

        return Twice(inner)  # type: ignore[return-value]


def test_pages_that_repeat_an_instance_fail_the_pagination_check(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(Doubled(conn.api), conn.reach)
    assert found["pagination"].outcome == "FAIL"
    assert found["pagination"].figures["listed"] == 2
    assert_clean(metro)


class Echoing(Wrapped):
    """A metro whose error texts repeat the token, the instance's FQDN and uuid."""

    def __init__(self, api: UkcApi, token: str) -> None:
        super().__init__(api)
        self.token = token

    def list_instances(self, tags: Sequence[str]) -> list[Instance]:
        if any(t.startswith("ukc.doctor=") for t in tags) and len(tags) > 1:
            inst = next(iter(self.inner.list_instances(tags[:1])))
            raise ApiError(
                f"bad filter for {inst.uuid} at {inst.fqdn} (Authorization: Bearer "
                f"{self.token}) name {inst.name} token={self.token}"
            )
        return self.inner.list_instances(tags)


def test_the_report_names_no_token_fqdn_or_uuid_even_when_the_metro_echoes_them(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    doctor = Probe(Echoing(conn.api, metro.token), conn.reach, image=IMAGE, budgets=FAST)
    results = doctor.execute()
    tag_filter = next(r for r in results if r.name == "tag_filter")
    assert tag_filter.outcome == "FAIL" and metro.token in (tag_filter.error or "")
    # the token as the command passes it, and without it (a metro echoing a token ukc was not
    # told of): neither report names it, nor the instance's name, FQDN or uuid
    for secrets in ([metro.token], []):
        text = json.dumps(doctor.report(results, about={"metro": "local"}, secrets=secrets))
        identities = [metro.token, *doctor.identifying()]
        assert len(identities) >= 4
        for value in identities:
            assert value not in text, value
        assert "<redacted>" in text
    assert_clean(metro)


def test_a_delete_that_answers_before_the_name_is_free_fails_name_free(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    knobs(metro, "/_local/behaviour", {"delete_timeout_honoured": False, "delete_hold_s": 2.0})
    found = probe(conn.api, conn.reach, budgets=Budgets(boot_s=20.0, ssh_s=10.0, name_free_s=0.5))
    assert found["delete"].outcome == "PASS"
    name_free = found["name_free"]
    assert name_free.outcome == "FAIL", name_free
    assert name_free.figures["taken_s"] >= 0.5 and name_free.figures["tries"] > 1
    assert_clean(metro)


def test_the_time_the_name_stays_taken_is_measured_when_it_is_within_the_budget(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    knobs(metro, "/_local/behaviour", {"delete_timeout_honoured": False, "delete_hold_s": 1.0})
    found = probe(conn.api, conn.reach)
    name_free = found["name_free"]
    assert name_free.outcome == "PASS", name_free
    assert 0.5 <= name_free.figures["taken_s"] < FAST.name_free_s
    assert_clean(metro)


def test_an_image_without_python3_passes_the_tools_check_over_the_shell_path(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    found = probe(conn.api, conn.reach, image="ukc/local-minimal:latest")
    tools = found["tools"]
    assert tools.outcome == "PASS", tools
    assert "sync path shell+tar" in tools.summary
    assert tools.figures == {
        "python3": False,
        "rsync": True,
        "tar": True,
        "find": True,
        "sha256sum": True,
    }
    assert found["ssh"].outcome == "PASS"
    assert_clean(metro)


class StatelessStandby(Wrapped):
    """A platform that scales to zero without keeping memory, whatever `stateful` says: its
    wake is a cold boot."""

    def create_instance(self, request: CreateRequest) -> Instance:
        if request.scale_to_zero is not None:
            request = replace(request, scale_to_zero={**request.scale_to_zero, "stateful": False})
        return self.inner.create_instance(request)


def test_a_wake_that_is_a_cold_boot_fails_the_wake_check(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(StatelessStandby(conn.api), conn.reach, budgets=replace(FAST, wake_s=30.0))
    wake = found["wake"]
    assert wake.figures["idle_state"] == "standby"
    assert wake.outcome == "FAIL", wake
    assert "host key changed" in wake.summary
    assert_clean(metro)


def test_a_wake_that_loses_memory_but_keeps_the_host_key_fails_the_wake_check(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    knobs(metro, "/_local/behaviour", {"preset": "realistic", "host_keys_per_boot": False})
    try:
        found = probe(StatelessStandby(conn.api), conn.reach, budgets=replace(FAST, wake_s=30.0))
    finally:
        knobs(metro, "/_local/behaviour", {"preset": "realistic"})
    wake = found["wake"]
    assert wake.outcome == "FAIL", wake
    assert wake.figures["memory_kept"] is False
    assert "boot marker left in memory is gone" in wake.summary
    assert_clean(metro)


def test_a_create_the_metro_refuses_fails_create_and_probes_nothing_more(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    # more memory than the metro's quota allows (item code 19)
    results = Probe(conn.api, conn.reach, image=IMAGE, memory_mb=10**7, budgets=FAST).execute()
    found = {r.name: r for r in results}
    assert found["auth"].outcome == "PASS"
    assert found["create"].outcome == "FAIL", found["create"]
    assert "quota" in (found["create"].error or "")
    assert {found[n].outcome for n in CHECKS[CHECKS.index("states") :]} == {"SKIP"}
    assert_clean(metro)


class DeafDelete(Wrapped):
    """A platform whose first DELETE answers success and deletes nothing."""

    ignored = 0

    def delete_instance(self, name: str, *, uuid: str | None = None) -> bool:
        if not self.ignored:
            self.ignored += 1
            return True
        return self.inner.delete_instance(name, uuid=uuid)


def test_a_delete_that_leaves_the_instance_live_fails_delete_and_the_cleanup_still_deletes_it(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(DeafDelete(conn.api), conn.reach)
    assert found["delete"].outcome == "FAIL", found["delete"]
    assert "still reads as live" in found["delete"].summary
    assert found["name_free"].outcome == "SKIP"
    assert_clean(metro)


class SilentQuota(Wrapped):
    """A platform whose quota answer says nothing of what is used."""

    def get_quotas(self) -> Quota:
        return Quota.model_validate({"hard": {"instances": 10, "volumes": 5}})


class NoQuotaRoute(Wrapped):
    """A platform without `GET /v1/users/quotas`."""

    def get_quotas(self) -> Quota:
        raise ApiError("ukc api local: read the account's quota: http 404", status=404)


def test_a_quota_answer_without_the_figures_ukc_checks_fails_the_quotas_check(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(SilentQuota(conn.api), conn.reach)
    assert found["quotas"].outcome == "FAIL"
    assert "used/hard missing for instances, live_memory_mb, volumes" in found["quotas"].summary
    assert found["create"].outcome == "PASS", "the probe goes on"
    assert_clean(metro)


def test_a_metro_without_the_quota_route_fails_the_quotas_check_naming_the_error(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    found = probe(NoQuotaRoute(conn.api), conn.reach)
    assert found["quotas"].outcome == "FAIL" and "404" in (found["quotas"].error or "")
    assert found["delete"].outcome == "PASS"
    assert_clean(metro)


class Recording(Wrapped):
    """The real API, remembering what the probe asked to create."""

    def __init__(self, api: UkcApi) -> None:
        super().__init__(api)
        self.created: list[CreateRequest] = []

    def create_instance(self, request: CreateRequest) -> Instance:
        self.created.append(request)
        return self.inner.create_instance(request)


def test_the_probe_instance_carries_autokill_so_a_killed_doctor_leaves_nothing_for_long(
    metro: MetroInfo, conn: MetroConnection
) -> None:
    assert isinstance(conn.api, UkcApi)
    api = Recording(conn.api)
    found = probe(api, conn.reach)
    assert found["create"].outcome == "PASS"
    assert [r.autokill_ms for r in api.created][:1] == [600_000]
    assert_clean(metro)
