"""Daemon lifecycle: start once, find it again, stop it cleanly, persist across restarts.

Each test runs its own daemon in its own state dir (the session daemon stays untouched).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler.errors import LocalMetroError
from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from reconciler.local.sandbox.pidns import proc_state
from tests.support.inproc_metro import unique
from tests.support.sandboxes import proc_ids
from tests.support.sandboxes import sandbox_pids as processes_of

IMAGE = "ukc/local-sandbox:latest"


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    sd = tmp_path / "metro"
    try:
        yield sd
    finally:
        metro_daemon.stop(sd)


def client(info: MetroInfo) -> httpx.Client:
    return httpx.Client(
        base_url=info.api_url, headers={"Authorization": f"Bearer {info.token}"}, timeout=60
    )


def sandbox_pids(state_dir: Path) -> list[int]:
    """Host processes of every sandbox of this state dir (nothing names it on a command line)."""
    workspaces = state_dir / "workspaces"
    if not workspaces.is_dir():
        return []
    return sorted({p for ws in workspaces.iterdir() for p in processes_of(ws)})


class TestStartAndFind:
    def test_ensure_running_starts_one_daemon_and_then_finds_it(self, state_dir: Path) -> None:
        first = metro_daemon.ensure_running(state_dir)
        again = metro_daemon.ensure_running(state_dir)
        assert again.pid == first.pid
        assert metro_daemon.status(state_dir) == first
        meta = json.loads((state_dir / "metro.json").read_text())
        assert meta["pid"] == first.pid
        assert set(meta["edge_ports"]) >= {"2222", "443"}
        assert Path(meta["ca"]).exists()
        assert first.token not in (state_dir / "metro.json").read_text()
        assert (state_dir / "token").stat().st_mode & 0o777 == 0o600

    def test_two_concurrent_callers_start_a_single_daemon(self, state_dir: Path) -> None:
        got: list[MetroInfo] = []

        def call() -> None:
            got.append(metro_daemon.ensure_running(state_dir))

        threads = [threading.Thread(target=call) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len({i.pid for i in got}) == 1
        assert len(got) == 3

    def test_the_token_survives_a_restart(self, state_dir: Path) -> None:
        first = metro_daemon.ensure_running(state_dir)
        assert metro_daemon.stop(state_dir)
        second = metro_daemon.ensure_running(state_dir)
        assert second.token == first.token
        assert second.pid != first.pid

    def test_a_missing_bwrap_is_reported_with_the_package_to_install(
        self, state_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        monkeypatch.setenv("PATH", "/nonexistent")
        with pytest.raises(LocalMetroError, match="apt-get install -y bubblewrap"):
            metro_daemon.ensure_running(state_dir)

    def test_status_is_none_when_nothing_runs(self, state_dir: Path) -> None:
        assert metro_daemon.status(state_dir) is None
        assert metro_daemon.stop(state_dir) is False

    def test_default_state_dir_follows_the_environment(
        self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
    ) -> None:
        monkeypatch.setenv("UKC_LOCAL_STATE_DIR", str(tmp_path / "x"))
        assert metro_daemon.default_state_dir() == tmp_path / "x"
        monkeypatch.delenv("UKC_LOCAL_STATE_DIR")
        monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
        assert metro_daemon.default_state_dir() == tmp_path / "xdg" / "ukc" / "local"


def _wait_state(c: httpx.Client, name: str, want: str, timeout: float = 30) -> dict[str, Any]:
    r = c.request(
        "GET", "/v1/instances/wait", json=[{"name": name, "state": want, "timeout_s": timeout}]
    )
    assert r.json()["status"] == "success", r.text
    got = c.get("/v1/instances", params={"name": name}).json()["data"]["instances"][0]
    assert isinstance(got, dict)
    return got


class TestStopAndPersistence:
    def test_stop_leaves_no_sandbox_process_behind(self, state_dir: Path) -> None:
        info = metro_daemon.ensure_running(state_dir)
        with client(info) as c:
            r = c.post(
                "/v1/instances",
                json={
                    "name": unique(),
                    "image": "ukc/local-sandbox:latest",
                    "autostart": True,
                    "timeout_s": 30,
                },
            )
            assert r.json()["data"]["instances"][0]["state"] == "running"
        assert sandbox_pids(state_dir)
        assert metro_daemon.stop(state_dir)
        deadline = time.monotonic() + 5
        while sandbox_pids(state_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sandbox_pids(state_dir) == []
        assert metro_daemon.status(state_dir) is None
        with pytest.raises(ProcessLookupError):
            os.kill(info.pid, 0)

    def test_instances_and_workspace_files_survive_a_restart_and_running_ones_run_again(
        self, state_dir: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        # kind: files kept on disk across a metro restart are that preset's promise; the
        # realistic metro keeps /workspace in memory (test_behaviour.py checks it is lost)
        monkeypatch.setenv("UKC_LOCAL_BEHAVIOUR", "kind")
        info = metro_daemon.ensure_running(state_dir)
        runner, idle = unique("run"), unique("idle")
        with client(info) as c:
            r = c.post(
                "/v1/instances",
                json={
                    "name": runner,
                    "image": "ukc/local-sandbox:latest",
                    "autostart": True,
                    "timeout_s": 30,
                },
            )
            uid = r.json()["data"]["instances"][0]["uuid"]
            c.post(
                "/v1/instances",
                json={"name": idle, "image": "ukc/local-sandbox:latest", "autostart": False},
            )
            sleeper = unique("sleep")
            c.post(
                "/v1/instances",
                json={
                    "name": sleeper,
                    "image": "ukc/local-sandbox:latest",
                    "autostart": True,
                    "timeout_s": 30,
                    "service_group": {
                        "services": [{"port": 2222, "destination_port": 2222, "handlers": ["tls"]}]
                    },
                    "scale_to_zero": {"policy": "on", "cooldown_time_ms": 200, "stateful": True},
                },
            )
            _wait_state(c, sleeper, "standby")
            before = _wait_state(c, runner, "running")
        (state_dir / "workspaces" / uid / "kept.txt").write_text("still here")
        assert metro_daemon.stop(state_dir)
        info2 = metro_daemon.ensure_running(state_dir)
        with client(info2) as c:
            after = _wait_state(c, runner, "running")
            assert after["uuid"] == uid
            assert after["start_count"] == before["start_count"] + 1
            idle_now = c.get("/v1/instances", params={"name": idle}).json()["data"]["instances"]
            assert idle_now[0]["state"] == "stopped"
            asleep = c.get("/v1/instances", params={"name": sleeper}).json()["data"]["instances"]
            assert asleep[0]["state"] == "standby"
            c.put("/v1/instances/start", json=[{"name": sleeper}])
            assert _wait_state(c, sleeper, "running")["state"] == "running"
        assert (state_dir / "workspaces" / uid / "kept.txt").read_text() == "still here"


class TestLeftovers:
    def test_files_of_an_instance_no_record_names_are_removed_when_the_metro_starts(
        self, state_dir: Path
    ) -> None:
        # what a delete whose teardown was cut short by a killed daemon leaves behind
        orphan = "0b7d1f3e-5c1a-4e8e-9a53-2f1c0d9e8b7a"
        for sub in ("workspaces", "sandboxes"):
            (state_dir / sub / orphan).mkdir(parents=True)
            (state_dir / sub / orphan / "left.txt").write_text("orphaned")
        info = metro_daemon.ensure_running(state_dir)
        with client(info) as c:
            body = {"name": unique(), "image": IMAGE, "autostart": True, "timeout_s": 30}
            r = c.post("/v1/instances", json=body)
            kept = r.json()["data"]["instances"][0]["uuid"]
        assert not (state_dir / "workspaces" / orphan).exists()
        assert not (state_dir / "sandboxes" / orphan).exists()
        assert metro_daemon.stop(state_dir)
        assert (state_dir / "workspaces" / kept).is_dir()  # a stopped instance keeps its files

    def test_local_status_says_how_sandboxes_are_isolated_and_limited(
        self, state_dir: Path
    ) -> None:
        metro_daemon.ensure_running(state_dir)
        env = {**os.environ, "UKC_LOCAL_STATE_DIR": str(state_dir)}
        out = subprocess.run(
            [sys.executable, "-m", "reconciler", "local", "status"],
            capture_output=True, text=True, env=env, timeout=60, check=True,
        ).stdout  # fmt: skip
        line = next(ln for ln in out.splitlines() if ln.startswith("sandboxes: "))
        assert "user namespace" in line
        assert any(m in line for m in ("cgroup v2", "cgroup v1", "rlimit"))
        assert "at most 512 tasks" in line
        images = [ln.split(":", 1)[0] for ln in out.splitlines() if ln.startswith("image ")]
        assert images == ["image ukc/local-sandbox", "image ukc/local-minimal"]
        assert any(ln.startswith("behaviour (docs/local-metro.md): ") for ln in out.splitlines())

    def test_local_status_behind_a_proxy_sends_the_proxy_nothing(self, state_dir: Path) -> None:
        # the proxy a shell profile or a CI image names would get the request whole, the
        # local metro's bearer token included (it is plain HTTP on this machine's loopback)
        from tests.support.listener import RecordingMetro

        metro_daemon.ensure_running(state_dir)
        proxy = RecordingMetro()
        try:
            env = {**os.environ, "UKC_LOCAL_STATE_DIR": str(state_dir)}
            env.update({"HTTP_PROXY": proxy.url, "http_proxy": proxy.url, "ALL_PROXY": proxy.url})
            out = subprocess.run(
                [sys.executable, "-m", "reconciler", "local", "status"],
                capture_output=True, text=True, env=env, timeout=60, check=True,
            ).stdout  # fmt: skip
            assert proxy.requests == [], [r.path for r in proxy.requests]
            assert any(ln.startswith("image ukc/local-sandbox") for ln in out.splitlines()), out
        finally:
            proxy.close()


class TestSignals:
    def test_sigterm_shuts_down_gracefully_and_persists(self, state_dir: Path) -> None:
        import signal

        info = metro_daemon.ensure_running(state_dir)
        name = unique()
        with client(info) as c:
            c.post(
                "/v1/instances",
                json={"name": name, "image": "ukc/local-sandbox:latest", "autostart": False},
            )
        os.kill(info.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        # metro.json goes last, after instances.json was written and the sandboxes stopped
        while (state_dir / "metro.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not (state_dir / "metro.json").exists()
        assert metro_daemon.status(state_dir) is None
        saved = json.loads((state_dir / "instances.json").read_text())
        assert [i["name"] for i in saved["instances"]] == [name]


def zombie_children(pid: int) -> list[int]:
    """Children of `pid` that exited and were never reaped."""
    return [
        int(e)
        for e in os.listdir("/proc")
        if e.isdigit() and proc_ids(int(e)).get("PPid", [0])[0] == pid and proc_state(int(e)) == "Z"
    ]


class TestReaping:
    def test_deleted_sandboxes_leave_no_zombie_in_the_daemon(self, state_dir: Path) -> None:
        # why: the daemon is a child subreaper, so the pid 1 of a sandbox whose bwrap died
        # first becomes its child; nothing else would ever reap it
        info = metro_daemon.ensure_running(state_dir)
        names = [unique() for _ in range(6)]
        with client(info) as c:
            for name in names:
                body = {"name": name, "image": IMAGE, "autostart": True, "timeout_s": 60}
                r = c.post("/v1/instances", json=body)
                assert r.json()["data"]["instances"][0]["state"] == "running", r.text
            r = c.request(
                "DELETE", "/v1/instances", json=[{"name": n, "timeout_s": 60} for n in names]
            )
            assert r.json()["status"] == "success", r.text
        deadline = time.monotonic() + 10
        while zombie_children(info.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert zombie_children(info.pid) == []
        assert sandbox_pids(state_dir) == []
