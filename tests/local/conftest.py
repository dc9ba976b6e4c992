"""Fixtures for the local metro tests.

* `daemon`: one real metro daemon per test session (ensure_running in a tmp state dir, real
  bubblewrap sandboxes), stopped at the end. Tests delete what they create.
* `api`: an httpx client with the daemon's bearer token.
* `inproc`: the API app over a `LocalMetro` with a fake runtime (`tests/support/inproc_metro`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from tests.support.inproc_metro import InProcessMetro


@pytest.fixture(scope="session")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetroInfo]:
    state_dir = tmp_path_factory.mktemp("metro")
    info = metro_daemon.ensure_running(state_dir)
    try:
        yield info
    finally:
        metro_daemon.stop(state_dir)


@pytest.fixture
def api(daemon: MetroInfo) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=daemon.api_url,
        headers={"Authorization": f"Bearer {daemon.token}"},
        timeout=60.0,
    ) as client:
        yield client


@pytest.fixture
def inproc(tmp_path: Path) -> Iterator[InProcessMetro]:
    m = InProcessMetro(tmp_path)
    try:
        yield m
    finally:
        m.close()
