"""Per-command `inputs` and `shell`, end to end on the local metro: an edit re-runs only the
commands that depend on it (and the ones after them), and `shell: bash` gives bash."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: app
directory: ./work
commands:
  - name: test
    run: mkdir -p out && cat src/app.py >> out/test.log
    inputs: ["src/**/*.py"]
  - name: docs
    run: mkdir -p out && cat docs/index.md >> out/docs.log
    inputs: ["docs/"]
sync:
  back: ["out/"]
"""


def _commands(ukc: Ukc) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in ukc.status()["sessions"]["app"]["commands"]}


def test_an_edit_re_runs_only_the_commands_whose_inputs_it_touched(ukc: Ukc) -> None:
    work = ukc.project / "work"
    for rel, text in {
        "src/app.py": "v1\n",
        "docs/index.md": "d1\n",
        "README": "r1\n",
    }.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
    ukc.write_spec(SPEC)
    ukc.run("apply", "session.yaml", check=0)
    first = _commands(ukc)
    assert (work / "out" / "test.log").read_text() == "v1\n"
    assert first["test"]["inputs_digest"] and first["docs"]["inputs_digest"]

    # a file no command depends on: sent, nothing re-runs
    (work / "README").write_text("r2\n")
    plan = ukc.run("plan", "session.yaml", check=0)
    assert "run command" not in plan.stdout, plan.stdout
    ukc.run("apply", "session.yaml", check=0)
    assert _commands(ukc)["test"]["finished_at"] == first["test"]["finished_at"]
    assert _commands(ukc)["docs"]["finished_at"] == first["docs"]["finished_at"]

    # the later command's input: it alone re-runs
    (work / "docs" / "index.md").write_text("d2\n")
    plan = ukc.run("plan", "session.yaml", check=0)
    assert "run command 'docs' (inputs changed: docs/index.md)" in plan.stdout, plan.stdout
    assert "run command 'test'" not in plan.stdout, plan.stdout
    ukc.run("apply", "session.yaml", check=0)
    assert (work / "out" / "docs.log").read_text() == "d1\nd2\n"
    assert (work / "out" / "test.log").read_text() == "v1\n"

    # the first command's input: it re-runs, and so does every command after it
    (work / "src" / "app.py").write_text("v2\n")
    plan = ukc.run("plan", "session.yaml", check=0)
    assert "run command 'test' (inputs changed: src/app.py)" in plan.stdout, plan.stdout
    assert "run command 'docs' (an earlier command re-ran)" in plan.stdout, plan.stdout
    ukc.run("apply", "session.yaml", check=0)
    assert (work / "out" / "test.log").read_text() == "v1\nv2\n"
    assert (work / "out" / "docs.log").read_text() == "d1\nd2\nd2\n"
    assert _commands(ukc)["test"]["inputs_digest"] != first["test"]["inputs_digest"]
    assert _commands(ukc)["docs"]["inputs_digest"] != first["docs"]["inputs_digest"]


def test_shell_bash_runs_commands_under_bash_and_sh_is_the_default(ukc: Ukc) -> None:
    work = ukc.project / "work"
    work.mkdir()
    ukc.write_spec(
        """\
        name: app
        directory: ./work
        shell: bash
        commands:
          - name: pipe
            run: 'false | true; echo "status=${PIPESTATUS[0]}" > out.txt'
          - name: posix
            shell: sh
            run: 'echo "${BASH_VERSION:-none}" > sh.txt'
        sync:
          back: ["out.txt", "sh.txt"]
        """
    )
    ukc.run("apply", "session.yaml", check=0)
    assert (work / "out.txt").read_text() == "status=1\n"
    # the command's own shell wins over the session's
    if os.path.realpath("/bin/sh").endswith("dash"):
        assert (work / "sh.txt").read_text() == "none\n"
    assert _commands(ukc)["pipe"]["shell"] == "bash"
    assert _commands(ukc)["posix"]["shell"] == "sh"
