"""`ukc plan --output markdown` and `--output json` against the local metro: before an apply,
after it, and after a file changed."""

from __future__ import annotations

import json

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

SPEC = """\
name: site
directory: ./work
commands:
  - name: build
    run: mkdir -p out && cat index.txt > out/built.txt
sync:
  exclude: ["out/"]
  back: ["out/"]
"""


def test_the_plan_comment_and_document_follow_an_apply_and_a_file_change(ukc: Ukc) -> None:
    (ukc.project / "work").mkdir()
    (ukc.project / "work" / "index.txt").write_text("one\n")
    ukc.write_spec(SPEC)

    before = ukc.run("plan", "session.yaml", "--output", "markdown", check=0).stdout
    assert before.startswith("**ukc plan:** 1 to create, 0 to replace, 0 to delete, 1 file(s)")
    assert "| `site` | create | 1 | 1 |" in before
    assert "- `index.txt`" in before and "cat index.txt > out/built.txt" in before

    ukc.run("apply", "session.yaml", check=0)
    doc = json.loads(ukc.run("plan", "session.yaml", "--output", "json", check=0).stdout)
    assert (doc["schema_version"], doc["ok"], doc["changes_pending"]) == (1, True, False)
    assert doc["groups"][0]["sessions"][0]["verdict"] == "up_to_date"
    quiet = ukc.run("plan", "session.yaml", "--output", "markdown", check=0).stdout
    assert quiet.startswith("**ukc plan:** no changes, sessions match their specs.")

    (ukc.project / "work" / "index.txt").write_text("two\n")
    changed = ukc.run("plan", "session.yaml", "--output", "markdown", "--detailed-exitcode")
    assert changed.returncode == 2, changed.stderr
    assert "| `site` | update | 1 | 1 |" in changed.stdout
    assert "run command `build` — inputs changed (files, env or image)" in changed.stdout


def test_a_spec_that_does_not_load_gives_a_comment_that_says_why(ukc: Ukc) -> None:
    ukc.write_spec("name: site\nimgae: typo\n")
    out = ukc.run("plan", "session.yaml", "--output", "markdown", check=2)
    assert out.stdout.startswith("**ukc plan: failed**, no plan was made: ")
    assert "imgae" in out.stdout and "unknown field" in out.stdout
    assert "imgae" in out.stderr
