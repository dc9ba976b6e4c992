"""Fixtures for the security suite: attacks run as an attacker would run them.

* `canaries`: a fake cloud token and a fake secret value (fresh per session) that must appear
  in no output, file, status, log or exception (`tests.support.canary.assert_nowhere`).
* `metro`: one real local metro daemon for the suite; `ukc`: `ukc` as a real process in a
  fresh project directory against it (instances it created are deleted afterwards).
* Attacks by another local user use `tests.support.users.run_as_other_user` (root only).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from tests.support.canary import Canaries
from tests.support.ukc import Ukc


@pytest.fixture(scope="session")
def canaries() -> Canaries:
    return Canaries.fresh()


@pytest.fixture(scope="session")
def metro(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetroInfo]:
    state_dir = tmp_path_factory.mktemp("security-metro")
    # why: another local user must be able to reach the daemon's sockets and edge the way it
    # would reach a user's real metro; the temp tree is 0700 by default
    for parent in [state_dir, *state_dir.parents]:
        if parent == Path(parent.anchor):
            break
        parent.chmod(parent.stat().st_mode | 0o011)
    info = metro_daemon.ensure_running(state_dir)
    try:
        yield info
    finally:
        metro_daemon.stop(state_dir)


@pytest.fixture
def ukc(metro: MetroInfo, tmp_path: Path) -> Iterator[Ukc]:
    project = tmp_path / "project"
    project.mkdir()
    tool = Ukc(project, metro, {})
    yield tool
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
