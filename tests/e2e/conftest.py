"""End-to-end fixtures: a real local metro daemon and `ukc` run as a real process.

Every test gets its own project directory (its own `.ukc/`, so its own project id and
instance names) and talks to one metro daemon shared by the test session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from reconciler import warm
from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo


@pytest.fixture(scope="session")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetroInfo]:
    state_dir = tmp_path_factory.mktemp("e2e-metro")
    info = metro_daemon.ensure_running(state_dir)
    try:
        yield info
    finally:
        metro_daemon.stop(state_dir)


@pytest.fixture(scope="session", autouse=True)
def warm_process(warm_dir: Path) -> Path:
    """The suite's warm process, up before the first test: every `ukc` run is a warm one (the
    way a user's second command runs), so timings measured in one test hold in the next."""
    path = warm.start()
    assert path.parent == warm_dir
    return path


@dataclass
class Ukc:
    """Runs `ukc` in a project directory against the test metro."""

    project: Path
    metro: MetroInfo
    extra_env: dict[str, str]

    def env(self) -> dict[str, str]:
        # the suite's own warm process (tests/conftest.py) is kept; every other UKC_ is not
        env = {
            k: v for k, v in os.environ.items() if not k.startswith("UKC_") or k == "UKC_WARM_DIR"
        }
        env["UKC_LOCAL_STATE_DIR"] = str(self.metro.state_dir)
        env.update(self.extra_env)
        return env

    def run(
        self, *args: str, check: int | None = None, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "reconciler", *args],
            cwd=self.project,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check is not None:
            assert proc.returncode == check, (
                f"ukc {' '.join(args)} exited {proc.returncode}\n"
                f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
            )
        return proc

    def write_spec(self, text: str, name: str = "session.yaml") -> Path:
        path = self.project / name
        path.write_text(textwrap.dedent(text))
        return path

    def status(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.project / ".ukc" / "status.json").read_text())
        return data

    def api(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.metro.api_url,
            headers={"Authorization": f"Bearer {self.metro.token}"},
            timeout=30,
        )

    def instances(self) -> list[dict[str, Any]]:
        with self.api() as client:
            body = client.get("/v1/instances", params={"details": "true"}).json()
        return list(body["data"]["instances"])

    def workspace(self, uuid: str) -> Path:
        return self.metro.state_dir / "workspaces" / uuid


@pytest.fixture
def ukc(metro: MetroInfo, tmp_path: Path) -> Iterator[Ukc]:
    project = tmp_path / "project"
    project.mkdir()
    tool = Ukc(project, metro, {})
    yield tool
    # Leave nothing running behind a test: delete every instance this project created.
    status_file = project / ".ukc" / "status.json"
    if status_file.exists():
        names = [
            s["instance"]["name"]
            for s in json.loads(status_file.read_text())["sessions"].values()
            if s.get("instance")
        ]
        if names:
            with tool.api() as client:
                client.request("DELETE", "/v1/instances", json=[{"name": n} for n in names])
