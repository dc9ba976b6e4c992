"""A `reconciler` package in the directory ukc runs from is never what the metro daemon runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.local import daemon as metro_daemon
from tests.support.sandbox_harness import needs_metro_tools

pytestmark = [needs_metro_tools, pytest.mark.metro]

PLANTED = """\
import os, pathlib, sys
pathlib.Path(os.environ["PLANTED_MARK"]).write_text(f"ran as uid {os.getuid()} from {sys.argv}")
"""


def test_a_reconciler_package_planted_in_the_working_directory_is_not_run_by_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the attacker: a repository the user cloned and runs `ukc apply` in
    repo = tmp_path / "cloned-repo"
    pkg = repo / "reconciler" / "local"
    pkg.mkdir(parents=True)
    (repo / "reconciler" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text(PLANTED)
    mark = tmp_path / "planted-code-ran"
    monkeypatch.setenv("PLANTED_MARK", str(mark))
    monkeypatch.chdir(repo)
    state = tmp_path / "state"
    try:
        info = metro_daemon.ensure_running(state)
        assert not mark.exists(), mark.read_text()
        # the real daemon answers, and it does not hold the user's directory
        assert metro_daemon.status(state) is not None
        assert os.readlink(f"/proc/{info.pid}/cwd") == "/"
    finally:
        metro_daemon.stop(state)
