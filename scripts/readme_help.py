"""Rewrite the README's "Help texts" section from what `ukc --help`, `ukc apply --help` and
`ukc ssh --help` print (at 100 columns); `--check` only says whether it is current."""

from __future__ import annotations

import sys
from pathlib import Path

from click.testing import CliRunner

from reconciler.cli.main import cli

README = Path(__file__).resolve().parent.parent / "README.md"
SHOWN = ((), ("apply",), ("ssh",))
HEADING = "## Help texts\n"


def help_text(args: tuple[str, ...]) -> str:
    result = CliRunner().invoke(cli, [*args, "--help"], prog_name="ukc", terminal_width=100)
    return result.output.rstrip()


def section() -> str:
    parts = [HEADING]
    for args in SHOWN:
        parts.append(f"\n`{' '.join(('ukc', *args, '--help'))}`:\n\n```\n{help_text(args)}\n```\n")
    return "".join(parts)


def rewritten(text: str) -> str:
    head, found, _ = text.partition(HEADING)
    if not found:
        return text.rstrip() + "\n\n" + section()
    return head + section()


def main(argv: list[str]) -> int:
    text = README.read_text()
    fresh = rewritten(text)
    if "--check" in argv:
        return 0 if fresh == text else 1
    README.write_text(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
