"""A session without an instance gets it created while its tree is scanned: the boot, sshd's
start and the key's install overlap the scan (an apply in this process, against the test
metro; the scan is held by a keeper with a fault knob, so the order is forced, not timed)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from reconciler.cloud.metros import MetroConnection, MetroRegistry
from reconciler.reconcile import identity
from reconciler.reconcile.desired import Group, load_groups
from reconciler.reconcile.events import Event, RecordingReporter
from reconciler.reconcile.loop import ApplyResult, apply_group, delete_group
from reconciler.sync import feed as sync_feed
from reconciler.sync import remote
from tests.support.ukc import Ukc
from tests.support.waiting import eventually

#: how long a held scan waits for the instance to be listed before it goes on regardless
HOLD_S = 20.0


class HeldScans:
    """A keeper (what a scan asks what changed) that holds each scan until the metro lists
    `instance`, then says "walk"; `listed` records, per scan, whether it was listed by then."""

    def __init__(self, ukc: Ukc, instance: str) -> None:
        self.ukc = ukc
        self.instance = instance
        self.listed: list[bool] = []

    def _present(self) -> bool:
        return any(i["name"] == self.instance for i in self.ukc.instances())

    def take(
        self, state_dir: str, root: str, ident: list[int] | None, skip: Sequence[str] = ()
    ) -> tuple[int, set[str] | None]:
        self.listed.append(eventually(self._present, HOLD_S, interval_s=0.05))
        return 0, None

    def done(self, state_dir: str, token: int, ident: list[int] | None) -> None:
        return None


def _group(ukc: Ukc, env: dict[str, str], then: str = "") -> Group:
    """`then`: shell text the command runs after its work."""
    tree = ukc.project / "work"
    (tree / "src").mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (tree / "src" / f"f{i}.txt").write_text(f"file {i}\n" * 50)
    spec = ukc.write_spec(
        f"""\
        name: early
        directory: ./work
        commands: ["mkdir -p out && ls src | wc -l > out/n{then}"]
        sync:
          back: [out/]
        """
    )
    (tree / "out").mkdir(exist_ok=True)
    return load_groups([spec], env)[0]


def _apply(
    group: Group,
    metros: MetroRegistry,
    env: dict[str, str],
    keeper: HeldScans,
    reporter: RecordingReporter | None = None,
) -> ApplyResult:
    sync_feed.use_keeper(keeper)
    try:
        return apply_group(
            group, metros=metros, reporter=reporter or RecordingReporter(), environ=env
        )
    finally:
        sync_feed.use_keeper(None)


def _instance_name(group: Group, env: dict[str, str]) -> str:
    return identity.instance_name(identity.project_id(group.base_dir, env), "early")


def test_the_create_request_reaches_the_metro_before_the_scan_of_the_tree_ends(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    group = _group(ukc, env)
    keeper = HeldScans(ukc, _instance_name(group, env))
    reporter = RecordingReporter()
    result = _apply(group, metros, env, keeper, reporter)
    try:
        assert result.ok, result.failed
        assert keeper.listed[0], "the first scan of the tree ended before the create was sent"
        # the user reads one wait for the instance, not one per pass
        said = [e.text for e in reporter.events if e.kind == "action"]
        assert sum(t.startswith("wait until") for t in said) == 1, said
        assert (ukc.project / "work" / "out" / "n").read_text().strip() == "20"
        rec = ukc.status()["sessions"]["early"]
        assert rec["phase"] == "Ready"
        # the apply's record covers its whole work, the create made ahead included
        assert {"create_s", "ready_s", "sync_s", "commands_s", "syncback_s"} <= set(rec["timings"])
        # what apply reports it did: made, waited for once, synced, run, brought back
        kinds = [type(a).__name__ for a in result.plan.sessions[0].actions]
        assert kinds == ["CreateInstance", "WaitReady", "SyncUp", "RunCommand", "SyncBack"]
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)


class HelperSeen(HeldScans):
    """Also records, per scan, whether a sync helper of session `early` is already running
    (parked over its connection, waiting for the push)."""

    def __init__(self, ukc: Ukc, instance: str) -> None:
        super().__init__(ukc, instance)
        self.helper_running: list[bool] = []
        self._before = self._parked()  # an earlier test's, over a connection now closed

    @staticmethod
    def _parked() -> set[int]:
        with remote._PARKED_LOCK:
            return {id(s) for s in remote._PARKED.values() if s.opts.session == "early"}

    def take(
        self, state_dir: str, root: str, ident: list[int] | None, skip: Sequence[str] = ()
    ) -> tuple[int, set[str] | None]:
        self.helper_running.append(bool(self._parked() - self._before))
        return super().take(state_dir, root, ident, skip)


def test_the_sync_helper_of_an_instance_made_ahead_runs_before_the_round_that_pushes_plans(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """Its interpreter starts in the sandbox as soon as the key is accepted, while the boot
    is marked and the first round observes and plans; the push finds it running."""
    group = _group(ukc, env)
    keeper = HelperSeen(ukc, _instance_name(group, env))
    result = _apply(group, metros, env, keeper)
    try:
        assert result.ok, result.failed
        # the scan made ahead (the instance booting), then the round's: the helper runs by then
        assert keeper.helper_running[:2] == [False, True], keeper.helper_running
        assert (ukc.project / "work" / "out" / "n").read_text().strip() == "20"
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)


class PullHelperSeen(RecordingReporter):
    """Records, at the command's first output (the command still running), whether a
    read-only helper of session `early` is parked for the sync-back, waiting for it a while."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bool] = []
        self._before = self._parked()  # an earlier test's, over a connection now closed

    @staticmethod
    def _parked() -> set[int]:
        with remote._PARKED_LOCK:
            return {id(s) for s in remote._PARKED_PULL.values() if s.opts.session == "early"}

    def event(self, event: Event) -> None:
        if event.kind == "output" and event.session == "early" and not self.seen:
            self.seen.append(eventually(lambda: bool(self._parked() - self._before), 10.0))
        super().event(event)


def test_the_sync_backs_helper_starts_while_the_command_before_it_runs(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """The pull takes a helper whose interpreter started while the last command ran."""
    group = _group(ukc, env, " && echo ran && sleep 1")
    reporter = PullHelperSeen()
    result = apply_group(group, metros=metros, reporter=reporter, environ=env)
    try:
        assert result.ok, result.failed
        assert reporter.seen == [True]
        assert (ukc.project / "work" / "out" / "n").read_text().strip() == "20"
        # the pull took it: none is left parked
        assert not reporter._parked() - reporter._before
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)


def test_an_emptied_tree_gets_no_instance_made_ahead_of_its_scan(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """The scan refuses a root that is empty while the last push had files (it looks like an
    accident); the look before the scan must not make an instance for it meanwhile."""
    group = _group(ukc, env)
    name = _instance_name(group, env)
    assert apply_group(group, metros=metros, reporter=RecordingReporter(), environ=env).ok
    # the instance is gone and so is the status file (a fresh checkout keeps `.ukc/sync`)
    with ukc.api() as client:
        client.request("DELETE", "/v1/instances", json=[{"name": name}]).raise_for_status()
    assert eventually(lambda: all(i["name"] != name for i in ukc.instances()), 30)
    for status in (ukc.project / ".ukc").glob("status.json*"):
        status.unlink()
    for path in sorted((ukc.project / "work").rglob("*"), reverse=True):
        path.rmdir() if path.is_dir() else path.unlink()
    result = apply_group(group, metros=metros, reporter=RecordingReporter(), environ=env)
    assert not result.ok
    assert "is empty but the last push had" in result.failed["early"], result.failed
    assert all(i["name"] != name for i in ukc.instances()), "an instance was made for it"


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ("directory: ./nowhere\n", "nowhere is missing"),
        ("directory: ./work\nsecret_env:\n  TOKEN: E2E_CREATE_AHEAD_NOT_SET\n", "is not set"),
    ],
    ids=["missing directory", "missing secret"],
)
def test_a_session_apply_refuses_before_trying_gets_no_instance_made_ahead(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry, extra: str, why: str
) -> None:
    (ukc.project / "work").mkdir()
    spec = ukc.write_spec("name: early\ncommands: [echo hi]\n" + extra)
    group = load_groups([spec], env)[0]
    result = apply_group(group, metros=metros, reporter=RecordingReporter(), environ=env)
    assert not result.ok
    assert why in result.failed["early"], result.failed
    name = _instance_name(group, env)
    assert all(i["name"] != name for i in ukc.instances()), "an instance was made for it"


class _ListAfterCreate:
    """The metro's API, but an instance list answers only once a create was sent (or after
    `HELD_LIST_S`); `overlapped` records, per list, which."""

    def __init__(self, api: Any) -> None:
        self._api = api
        self.created = threading.Event()
        self.overlapped: list[bool] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def create_instance(self, request: Any) -> Any:
        self.created.set()
        return self._api.create_instance(request)

    def list_instances(self, tags: list[str]) -> Any:
        self.overlapped.append(self.created.wait(HELD_LIST_S))
        return self._api.list_instances(tags)


class _HeldLists:
    """A metro registry handing out `_ListAfterCreate` APIs."""

    def __init__(self, inner: MetroRegistry) -> None:
        self.inner = inner
        self.apis: dict[str, _ListAfterCreate] = {}

    def get(self, metro: str) -> MetroConnection:
        conn = self.inner.get(metro)
        api = self.apis.setdefault(conn.label, _ListAfterCreate(conn.api))
        return dataclasses.replace(conn, api=api)


#: how long a held list waits for the create before it answers anyway
HELD_LIST_S = 5.0


def test_the_create_is_sent_before_the_first_list_answers(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """The records say the session has no instance: the create goes out with the apply's
    first list, not after it (the create is the first step of the boot, sshd, key path)."""
    group = _group(ukc, env)
    held = _HeldLists(metros)
    held_metros: Any = held
    result = apply_group(group, metros=held_metros, reporter=RecordingReporter(), environ=env)
    try:
        assert result.ok, result.failed
        assert held.apis["local"].overlapped[0], "the first list answered before the create"
        assert (ukc.project / "work" / "out" / "n").read_text().strip() == "20"
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)


def test_an_instance_of_ours_the_status_file_forgot_is_left_to_the_list_by_the_early_create(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """The records say "no instance" but one of ours exists, stopped: the create made before
    the list finds the name taken and adopts nothing (a stopped instance adopted as a new
    boot would fail the session); the round's list starts it. One instance, and no record
    of a create."""
    group = _group(ukc, env)
    name = _instance_name(group, env)
    assert apply_group(group, metros=metros, reporter=RecordingReporter(), environ=env).ok
    uuid = ukc.status()["sessions"]["early"]["instance"]["uuid"]
    with ukc.api() as client:
        client.put("/v1/instances/stop", json=[{"uuid": uuid}]).raise_for_status()
        client.request(
            "GET",
            "/v1/instances/wait",
            json=[{"uuid": uuid, "state": "stopped", "timeout_s": 30}],
        )
    for status in (ukc.project / ".ukc").glob("status.json*"):
        status.unlink()
    reporter = RecordingReporter()
    result = apply_group(group, metros=metros, reporter=reporter, environ=env)
    try:
        assert result.ok, result.failed
        assert [i["uuid"] for i in ukc.instances() if i["name"] == name] == [uuid]
        said = [e.text for e in reporter.events]
        assert any(t.endswith("exists: left to the list") for t in said), said
        assert not any("adopted" in t for t in said), said
        kinds = [type(a).__name__ for a in result.plan.sessions[0].actions]
        assert "CreateInstance" not in kinds and "StartInstance" in kinds, kinds
        rec = ukc.status()["sessions"]["early"]
        assert rec["phase"] == "Ready" and rec["instance"]["uuid"] == uuid
        assert all(c["type"] != "InstanceCreated" for c in rec["conditions"])
    finally:
        delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)


def test_an_account_at_its_instance_quota_is_not_refused_for_an_instance_that_exists(
    ukc: Ukc, env: dict[str, str], metros: MetroRegistry
) -> None:
    """The records' word ("no instance": the status file was lost) would count a create the
    quota cannot hold; the instance exists, so the list, not that word, decides the refusal."""
    group = _group(ukc, env)
    name = _instance_name(group, env)
    assert apply_group(group, metros=metros, reporter=RecordingReporter(), environ=env).ok
    for status in (ukc.project / ".ukc").glob("status.json*"):
        status.unlink()
    with ukc.api() as client:
        used = client.get("/v1/users/quotas").json()["data"]["quotas"][0]["used"]["instances"]
        client.post("/_local/quotas", json={"instances": used}).raise_for_status()
        try:
            result = apply_group(group, metros=metros, reporter=RecordingReporter(), environ=env)
            assert result.ok, result.failed
            assert len([i for i in ukc.instances() if i["name"] == name]) == 1
        finally:
            client.post("/_local/quotas", json={"instances": 5000}).raise_for_status()
            delete_group(group, metros=metros, reporter=RecordingReporter(), environ=env)
