"""`inputs` and `shell`: accepted forms, refusals at their file, line and field, and a spec
hash that does not move for specs that do not set them."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.spec.models import spec_hash
from tests.support.specfiles import load_one, spec_error


def test_inputs_and_shell_are_read_as_written(tmp_path: Path) -> None:
    text = (
        "name: a\nshell: bash\ncommands:\n"
        "  - name: test\n    run: pytest\n    inputs: ['src/**/*.py', '!src/gen/']\n"
        "  - name: lint\n    run: ruff\n    shell: /usr/bin/zsh\n"
        "  - name: once\n    run: make setup\n    inputs: []\n"
    )
    (session,) = load_one(tmp_path, text)
    test, lint, once = session.spec.commands
    assert test.inputs == ("src/**/*.py", "!src/gen/") and test.shell is None
    assert lint.inputs is None and lint.shell == "/usr/bin/zsh"
    assert once.inputs == ()
    assert session.spec.shell == "bash"


def test_without_them_every_file_is_an_input_and_the_shell_is_sh(tmp_path: Path) -> None:
    (session,) = load_one(tmp_path, "name: a\ncommands: [make]\n")
    assert session.spec.commands[0].inputs is None and session.spec.shell == "sh"


@pytest.mark.parametrize(
    ("line", "field", "fragment"),
    [
        ("shell: 'bash -e'", "shell", "without spaces or arguments"),
        ("shell: 'bash;rm -rf ~'", "shell", "a shell's name"),
        ("shell: '$(id)'", "shell", "a shell's name"),
        ("shell: bin/bash", "shell", "absolute path"),
        ("shell: /bin/../tmp/x", "shell", "absolute path"),
        ("shell: ''", "shell", "a shell's name"),
    ],
)
def test_a_session_shell_that_is_not_a_plain_name_or_path_is_refused_at_its_line(
    tmp_path: Path, line: str, field: str, fragment: str
) -> None:
    err = spec_error(tmp_path, f"name: ok\ncommands: [make]\n{line}\n")
    file = str(tmp_path / "s.yaml")
    assert (err.file, err.line, err.field) == (file, 3, field)
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("entry", "field", "fragment"),
    [
        ("shell: 'sh -x'", "commands[0].shell", "without spaces"),
        ("inputs: ['']", "commands[0].inputs[0]", "empty"),
        ("inputs: ['../secrets']", "commands[0].inputs[0]", "'..'"),
        ("inputs: src/", "commands[0].inputs", "expected a list"),
        ("inputs: [1]", "commands[0].inputs[0]", "string"),
    ],
)
def test_a_bad_command_shell_or_input_pattern_is_refused_at_its_line(
    tmp_path: Path, entry: str, field: str, fragment: str
) -> None:
    err = spec_error(tmp_path, f"name: ok\ncommands:\n  - run: make\n    {entry}\n")
    assert (err.line, err.field) == (4, field), str(err)
    assert fragment in str(err), str(err)


def test_a_spec_without_inputs_or_shell_keeps_its_hash(tmp_path: Path) -> None:
    (plain,) = load_one(tmp_path, "name: a\ncommands: [make]\n")
    (written,) = load_one(tmp_path, "name: a\nshell: sh\ncommands: [make]\n")
    (bash,) = load_one(tmp_path, "name: a\nshell: bash\ncommands: [make]\n")
    (inputs,) = load_one(tmp_path, "name: a\ncommands: [{run: make, inputs: [src/]}]\n")
    assert spec_hash(plain.spec) == spec_hash(written.spec)
    assert len({spec_hash(s.spec) for s in (plain, bash, inputs)}) == 3
