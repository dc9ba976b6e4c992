"""The example pipeline (docs/examples/github-actions.yml), run step by step against the local
metro with the repository's example specs: the pull-request plan, the apply on main, and the
plan of the next pull request."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.ukc import Ukc

pytestmark = pytest.mark.metro

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "docs" / "examples" / "github-actions.yml"
VENV_BIN = Path(sys.executable).parent  # the `ukc` of this checkout


def workflow() -> dict[Any, Any]:
    data: dict[Any, Any] = yaml.safe_load(WORKFLOW.read_text())
    return data


def runs_ukc(step: dict[str, Any]) -> bool:
    """A step of ours: it runs ukc (installing it, or commenting with gh, is the runner's)."""
    lines = [line.strip() for line in str(step.get("run", "")).splitlines()]
    return any(line.startswith("ukc ") for line in lines)


def test_the_pipeline_plans_on_pull_requests_and_applies_with_prune_on_main() -> None:
    flow = workflow()
    triggers = flow[True]  # YAML 1.1 reads the key `on` as true
    assert set(triggers) == {"pull_request", "push"}
    assert triggers["push"]["branches"] == ["main"]
    assert flow["concurrency"]["cancel-in-progress"] is False and flow["concurrency"]["group"]
    assert {"UKC_TOKEN", "UKC_SESSION_SECRET", "UKC_PROJECT"} <= set(flow["env"])
    plan, apply = flow["jobs"]["plan"], flow["jobs"]["apply"]
    assert "pull_request" in plan["if"] and "refs/heads/main" in apply["if"]
    plan_runs = "\n".join(str(s.get("run", "")) for s in plan["steps"])
    assert "--output markdown > plan.md" in plan_runs and "gh pr comment" in plan_runs
    assert "ukc apply specs/ --prune" in "\n".join(str(s.get("run", "")) for s in apply["steps"])
    artifacts = [s for s in apply["steps"] if str(s.get("uses", "")).startswith("actions/upload")]
    assert artifacts and "specs/.ukc/status.json" in artifacts[0]["with"]["path"]


class Runner:
    """Runs a job's ukc steps as GitHub's runner would: bash -eo pipefail, the workflow's env,
    each job in a fresh checkout of the repository (no `.ukc/` from an earlier job)."""

    def __init__(self, ukc: Ukc) -> None:
        self.root = ukc.project
        flow_env = {k: str(v) for k, v in workflow()["env"].items() if "${{" not in str(v)}
        self.env = {
            **ukc.env(),
            **flow_env,
            "UKC_METRO": "local",
            "UKC_PROJECT": f"ci{os.getpid()}",
            "UKC_SESSION_SECRET": "ci-example-session-secret-0123456789",
            "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        self.env.pop("UKC_TOKEN", None)

    def checkout(self, label: str) -> Path:
        workspace = self.root / label
        shutil.copytree(ROOT / "specs", workspace / "specs")
        return workspace

    def job(self, name: str, workspace: Path) -> dict[str, str]:
        outputs = workspace / "github-output"
        outputs.write_text("")
        ran = 0
        for step in workflow()["jobs"][name]["steps"]:
            if not runs_ukc(step):
                continue
            proc = subprocess.run(
                ["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                cwd=workspace,
                env={**self.env, "GITHUB_OUTPUT": str(outputs)},
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert proc.returncode == 0, f"{step.get('name')}: {proc.stdout}\n{proc.stderr}"
            ran += 1
        assert ran >= 2
        return dict(line.split("=", 1) for line in outputs.read_text().splitlines() if "=" in line)


def test_the_example_pipeline_runs_on_fresh_runners_against_the_local_metro(ukc: Ukc) -> None:
    runner = Runner(ukc)
    plan_schema = json.loads((ROOT / "docs" / "plan.schema.json").read_text())
    first_pr = runner.checkout("pull-request-1")
    main = runner.checkout("main")
    try:
        assert runner.job("plan", first_pr) == {"exit": "0"}
        comment = (first_pr / "plan.md").read_text()
        assert comment.startswith("**ukc plan:** 3 to create, 0 to replace, 0 to delete")
        for name in ("hello", "calc-test", "calc-stats"):
            assert f"| `{name}` | create |" in comment
        doc = json.loads((first_pr / "plan.json").read_text())
        jsonschema.validate(doc, plan_schema, cls=jsonschema.Draft202012Validator)
        assert doc["changes_pending"] and doc["summary"]["create"] == 3

        runner.job("apply", main)
        assert json.loads((main / "apply.json").read_text())["ok"] is True
        status = json.loads((main / "specs" / ".ukc" / "status.json").read_text())
        assert {s["phase"] for s in status["sessions"].values()} == {"Ready"}

        # the next pull request, on another fresh runner, sees the sessions as current
        second_pr = runner.checkout("pull-request-2")
        assert runner.job("plan", second_pr) == {"exit": "0"}
        comment = (second_pr / "plan.md").read_text()
        assert comment.startswith("**ukc plan:** no changes"), comment
        assert json.loads((second_pr / "plan.json").read_text())["changes_pending"] is False
    finally:
        subprocess.run(
            [str(VENV_BIN / "ukc"), "delete", "specs/"],
            cwd=main,
            env=runner.env,
            capture_output=True,
        )
