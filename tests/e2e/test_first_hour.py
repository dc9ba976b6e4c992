"""A new user's first hour, end to end on the local metro: reports come home when tests fail,
plan tells the truth before apply is run, and a missing secret blocks only what needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

#: a test run that writes its report, then fails when input.txt says so
REPORT_SPEC = """\
name: tests
directory: ./work
commands:
  - name: test
    run: >-
      mkdir -p reports &&
      if grep -q broken input.txt; then echo FAILED > reports/test-report.txt; exit 1; fi;
      echo OK > reports/test-report.txt
sync:
  back: ["reports/"]
"""


def session(ukc: Ukc, name: str) -> dict[str, Any]:
    return ukc.status()["sessions"][name]  # type: ignore[no-any-return]


def test_a_failing_command_still_brings_its_report_home_and_says_from_which_run(
    ukc: Ukc,
) -> None:
    work = ukc.project / "work"
    work.mkdir()
    (work / "input.txt").write_text("fine\n")
    ukc.write_spec(REPORT_SPEC)
    ukc.run("apply", "session.yaml", check=0)
    report = work / "reports" / "test-report.txt"
    assert report.read_text() == "OK\n"

    (work / "input.txt").write_text("broken\n")
    proc = ukc.run("apply", "session.yaml", check=1)
    assert "exited 1" in proc.stderr
    assert report.read_text() == "FAILED\n", "the report of the failed run must come home"
    back = session(ukc, "tests")["sync"]["back_from"]
    assert back["command"] == "test" and back["exit_code"] == 1 and not back["timed_out"]
    assert session(ukc, "tests")["sync"]["back_pending"] is False


def test_a_timed_out_command_still_brings_back_what_it_wrote(ukc: Ukc) -> None:
    work = ukc.project / "work"
    work.mkdir()
    ukc.write_spec(
        """\
        name: slow
        directory: ./work
        commands:
          - name: test
            run: mkdir -p reports && echo PARTIAL > reports/test-report.txt && sleep 60
            timeout: 2s
        sync:
          back: ["reports/"]
        """
    )
    proc = ukc.run("apply", "session.yaml", check=1)
    assert "timed out" in proc.stderr
    assert (work / "reports" / "test-report.txt").read_text() == "PARTIAL\n"
    back = session(ukc, "slow")["sync"]["back_from"]
    assert back["command"] == "test" and back["timed_out"] and back["exit_code"] is None

    # and the next plan gives the real reason for the re-run
    plan = ukc.run("plan", "session.yaml")
    assert "last run timed out" in plan.stdout, plan.stdout
    assert "never ran on this instance" not in plan.stdout


def test_plan_reports_a_missing_directory_as_an_error_that_apply_would_hit(ukc: Ukc) -> None:
    ukc.write_spec("name: lost\ndirectory: ./nowhere\ncommands: [echo hi]\n")
    plan = ukc.run("plan", "--detailed-exitcode", "session.yaml")
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert "No changes" not in plan.stdout
    assert "nowhere" in plan.stdout + plan.stderr
    apply = ukc.run("apply", "session.yaml")
    assert apply.returncode == 1
    assert "nowhere" in apply.stderr


def test_plan_with_detailed_exitcode_reports_an_invalid_spec_as_1_not_changes_pending(
    ukc: Ukc,
) -> None:
    ukc.write_spec("name: bad\ndirectory: .\nmemory_mb: lots\n")
    plan = ukc.run("plan", "--detailed-exitcode", "session.yaml")
    assert plan.returncode == 1, plan.stderr
    assert "session.yaml:3" in plan.stderr


def test_plan_lists_sessions_no_spec_declares_without_prune(ukc: Ukc) -> None:
    (ukc.project / "work").mkdir()
    two = "name: keep\ndirectory: ./work\n---\nname: gone\ndirectory: ./work\n"
    ukc.write_spec(two)
    ukc.run("apply", "session.yaml", check=0)
    ukc.write_spec("name: keep\ndirectory: ./work\n")
    plan = ukc.run("plan", "--detailed-exitcode", "session.yaml")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "session gone: not declared (use --prune to delete)" in plan.stdout, plan.stdout
    data = json.loads(ukc.run("plan", "--output", "json", "session.yaml", check=0).stdout)
    (group,) = data["groups"]
    assert [o["session"] for o in group["orphans"]] == ["gone"]
    pruned = ukc.run("plan", "--prune", "session.yaml", check=0)
    assert "not declared" not in pruned.stdout and "prune" in pruned.stdout


def test_plan_and_apply_of_one_spec_file_do_not_call_its_neighbours_sessions_undeclared(
    ukc: Ukc,
) -> None:
    (ukc.project / "work").mkdir()
    ukc.write_spec("name: calc\ndirectory: ./work\n", "calc.yaml")
    ukc.write_spec("name: web\ndirectory: ./work\n---\nname: gone\ndirectory: ./work\n", "web.yaml")
    ukc.run("apply", "calc.yaml", check=0)
    ukc.run("apply", "web.yaml", check=0)
    ukc.write_spec("name: web\ndirectory: ./work\n", "web.yaml")

    plan = ukc.run("plan", "web.yaml", check=0)
    assert "session calc: not declared" not in plan.stdout, plan.stdout
    assert "session gone: not declared (use --prune to delete)" in plan.stdout, plan.stdout
    apply = ukc.run("apply", "calc.yaml", check=0)
    assert "not declared" not in apply.stderr, apply.stderr
    # the directory given whole: every session its spec files do not declare
    whole = ukc.run("plan", check=0)
    assert "session gone: not declared" in whole.stdout, whole.stdout
    assert "session calc: not declared" not in whole.stdout, whole.stdout


SECRET_SPEC = """\
name: keyed
directory: ./work
secret_env:
  API_KEY: H11_TEST_SECRET
commands:
  - name: check
    run: test -n "$API_KEY"
"""


def test_a_missing_secret_blocks_only_the_commands_that_need_it(ukc: Ukc) -> None:
    work = ukc.project / "work"
    work.mkdir()
    (work / "a.txt").write_text("one\n")
    ukc.write_spec(SECRET_SPEC)
    ukc.extra_env["H11_TEST_SECRET"] = "a-secret-value-for-the-test"
    ukc.run("apply", "session.yaml", check=0)

    del ukc.extra_env["H11_TEST_SECRET"]
    validate = ukc.run("validate", "session.yaml", check=0)
    assert "session.yaml:4: secret_env.API_KEY" in validate.stderr, validate.stderr
    assert "H11_TEST_SECRET" in validate.stderr and "not set" in validate.stderr
    # nothing to run: plan and status need no secret
    plan = ukc.run("plan", "--detailed-exitcode", "session.yaml")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    ukc.run("status", "session.yaml", check=0)
    # a command to run needs it: plan says so, at the line, as apply would fail
    (work / "a.txt").write_text("two\n")
    plan = ukc.run("plan", "--detailed-exitcode", "session.yaml")
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert "session.yaml:4" in plan.stdout + plan.stderr
    apply = ukc.run("apply", "session.yaml")
    assert apply.returncode == 1 and "H11_TEST_SECRET" in apply.stderr
    assert "session.yaml:4" in apply.stderr
    # and the session can be deleted without it
    ukc.run("delete", "session.yaml", check=0)
    assert session(ukc, "keyed")["phase"] == "Deleted"
    assert not [i for i in ukc.instances() if i["name"].endswith("-keyed")]


def test_plan_refuses_a_prune_of_an_empty_spec_set_as_apply_does(ukc: Ukc) -> None:
    (ukc.project / "specs").mkdir()
    apply = ukc.run("apply", "--prune", "specs")
    plan = ukc.run("plan", "--prune", "--detailed-exitcode", "specs")
    assert apply.returncode == 2 and "refusing to prune" in apply.stderr
    assert plan.returncode == 1, plan.stdout + plan.stderr
    assert "refusing to prune" in plan.stderr


def test_output_piped_into_a_reader_that_stops_early_ends_quietly(ukc: Ukc) -> None:
    # `ukc validate . | head -1`: the reader went away, which is no internal error
    ukc.write_spec("name: hello\nimage: me/box:1\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "validate", "session.yaml"],
        cwd=ukc.project,
        env=ukc.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # the reader is gone before ukc writes its first line
    _, err = proc.communicate(timeout=60)
    assert (proc.returncode, err.decode()) == (141, "")
