"""`ukc schema`: the session spec's JSON Schema for editors, generated from the models, and
the committed copies in docs/ kept current."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from reconciler.cli.apply_output import apply_schema
from reconciler.cli.plan_output import plan_schema
from reconciler.spec.schema import session_schema
from tests.support.specfiles import load_one, spec_error

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = (
    "regenerate: ukc schema > docs/session.schema.json; ukc schema plan > docs/plan.schema.json;"
    " ukc schema apply > docs/apply.schema.json"
)


def validator() -> jsonschema.Draft202012Validator:
    schema = json.loads((ROOT / "docs" / "session.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def problems(document: Any) -> list[str]:
    return [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in validator().iter_errors(document)
    ]


def test_the_committed_schemas_are_the_ones_the_models_generate() -> None:
    committed = json.loads((ROOT / "docs" / "session.schema.json").read_text())
    assert committed == session_schema(), REGENERATE
    committed_plan = json.loads((ROOT / "docs" / "plan.schema.json").read_text())
    assert committed_plan == plan_schema(), REGENERATE
    committed_apply = json.loads((ROOT / "docs" / "apply.schema.json").read_text())
    assert committed_apply == apply_schema(), REGENERATE


def test_ukc_schema_prints_the_committed_files() -> None:
    for args, name in (
        ((), "session.schema.json"),
        (("plan",), "plan.schema.json"),
        (("apply",), "apply.schema.json"),
    ):
        out = subprocess.run(
            [sys.executable, "-m", "reconciler", "schema", *args],
            capture_output=True,
            text=True,
            check=True,
            env={"UKC_WARM": "0", "PATH": "/usr/bin:/bin"},
        ).stdout
        assert json.loads(out) == json.loads((ROOT / "docs" / name).read_text())


def _example_documents() -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for path in sorted((ROOT / "specs").glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text())]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## A session spec", 1)[1]
    block = re.search(r"```yaml\n(.*?)```", section, re.S)
    assert block is not None
    found.append(("README.md", yaml.safe_load(block.group(1))))
    return found


@pytest.mark.parametrize(("where", "document"), _example_documents())
def test_the_example_specs_and_the_readmes_spec_satisfy_the_schema(
    where: str, document: Any
) -> None:
    assert problems(document) == [], where


def test_what_the_loader_fills_in_or_reads_as_empty_is_allowed_by_the_schema(
    tmp_path: Path,
) -> None:
    text = "name: plain\ncommands:\n  - make\n  - run: make test\nenv:\nsync:\n  back:\n"
    assert problems(yaml.safe_load(text)) == []
    (loaded,) = load_one(tmp_path, text).sessions  # and ukc reads it so too
    assert [c.name for c in loaded.spec.commands] == ["cmd-1", "cmd-2"]


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: a\nimgae: x\n", "imgae"),
        ("name: a\nexec: telnet\n", "exec"),
        ("name: Not_A_Label\n", "name"),
        ("name: a\ncommands:\n  - name: x\n", "commands"),
        ("name: a\nsync:\n  bakc: [out/]\n", "bakc"),
        ("name: a\nmemory_mb: lots\n", "memory_mb"),
        ("image: x\n", "name"),
    ],
)
def test_mistakes_ukc_refuses_are_flagged_by_the_schema_too(
    tmp_path: Path, text: str, field: str
) -> None:
    found = problems(yaml.safe_load(text))
    assert found and any(field in p for p in found), found
    assert spec_error(tmp_path, text)


def test_shell_completion_offers_the_commands_and_the_plan_outputs() -> None:
    def complete(words: str, cword: int) -> list[str]:
        out = subprocess.run(
            [sys.executable, "-m", "reconciler"],
            capture_output=True,
            text=True,
            check=True,
            env={
                "PATH": "/usr/bin:/bin",
                "UKC_WARM": "0",
                "_UKC_COMPLETE": "bash_complete",
                "COMP_WORDS": words,
                "COMP_CWORD": str(cword),
            },
        ).stdout
        return [line.split(",", 1)[1] for line in out.splitlines()]

    assert "schema" in complete("ukc s", 1)
    assert complete("ukc plan --output ", 3) == ["text", "json", "markdown"]
