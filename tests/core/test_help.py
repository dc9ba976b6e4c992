"""The help texts answer what a new user asks: every option described, whole summaries,
examples, the environment and the exit codes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from reconciler.cli.main import cli

#: the commands a user works with day to day: each shows examples
EVERYDAY = ("apply", "plan", "status", "delete", "validate", "watch", "ssh", "exec", "logs", "ls")


def commands(group: click.Group = cli, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    for name, command in sorted(group.commands.items()):
        yield f"{prefix}{name}", command
        if isinstance(command, click.Group):
            yield from commands(command, f"{prefix}{name} ")


def help_of(*args: str) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize(("name", "command"), list(commands()), ids=lambda v: str(v))
def test_every_option_of_every_command_is_described(name: str, command: click.Command) -> None:
    for param in command.params:
        if isinstance(param, click.Option):
            assert param.help, f"ukc {name} {param.opts[0]} has no help text"


def test_no_summary_in_the_command_lists_is_cut_off() -> None:
    for args in ((), ("local",), ("warm",)):
        listed = help_of(*args).split("Commands:")[1].split("\n\n")[0]
        assert "..." not in listed, listed


def test_the_main_help_lists_examples_the_environment_and_the_exit_codes() -> None:
    text = help_of()
    assert "Examples:" in text and "ukc exec hello -- make test" in text
    for name in ("UKC_TOKEN", "UKC_METRO", "UKC_PROJECT", "UKC_SESSION_SECRET", "UKC_WARM"):
        assert name in text, name
    assert "Exit codes:" in text
    for code in ("0 ", "1 ", "2 ", "3 ", "130 "):
        assert f"\n    {code}" in text, code


@pytest.mark.parametrize("name", EVERYDAY)
def test_everyday_commands_show_examples(name: str) -> None:
    assert "Examples:" in help_of(name)


@pytest.mark.parametrize(("name", "command"), list(commands()), ids=lambda v: str(v))
def test_o_is_short_for_output_wherever_there_is_an_output(
    name: str, command: click.Command
) -> None:
    for param in command.params:
        if isinstance(param, click.Option) and "--output" in param.opts:
            assert "-o" in param.opts, name


def test_the_readme_shows_the_help_texts_ukc_prints() -> None:
    root = Path(__file__).resolve().parents[2]
    check = subprocess.run(
        [sys.executable, str(root / "scripts" / "readme_help.py"), "--check"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, (
        "README.md's help texts are stale: run .venv/bin/python scripts/readme_help.py\n"
        + check.stderr
    )


def test_the_readme_and_the_help_of_ukc_ls_and_ukc_status_name_the_columns_they_print() -> None:
    from reconciler.cli.main import LS_COLUMNS
    from reconciler.cli.render import STATUS_COLUMNS

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    for command, columns in (("ls", LS_COLUMNS), ("status", STATUS_COLUMNS)):
        assert f"`{' '.join(columns)}`" in readme, (command, columns)
        shown = " ".join(help_of(command).split())
        assert all(c in shown for c in columns), (command, shown)
        order = [shown.index(c) for c in columns]
        assert order == sorted(order), (command, "columns out of order in --help")
