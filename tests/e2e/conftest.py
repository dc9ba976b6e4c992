"""End-to-end fixtures: a real local metro daemon and `ukc` run as a real process.

Every test gets its own project directory (its own `.ukc/`, so its own project id and
instance names) and talks to one metro daemon shared by the test session.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.cli import warm
from reconciler.cloud.metros import MetroRegistry
from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from tests.support.ukc import Ukc


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


@pytest.fixture
def env(metro: MetroInfo) -> dict[str, str]:
    """The environment of an apply run in this process against the test metro."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    environ["UKC_LOCAL_STATE_DIR"] = str(metro.state_dir)
    return environ


@pytest.fixture
def metros(env: dict[str, str], metro: MetroInfo) -> Iterator[MetroRegistry]:
    """The metros such an apply reaches (`env`'s)."""
    registry = MetroRegistry(env, local_state_dir=metro.state_dir)
    yield registry
    registry.close()


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
