"""The `ukc` entry point: hand short commands to the warm process, or run them here.

Kept to standard-library imports until it knows it must run the command in this process: the
point of the warm process (`warm`) is that a command does not pay ~0.25 s of imports, and this
module is what every command imports first.

A command runs here when the user opted out (`UKC_WARM=0`), when it is not one of the short
commands (`watch`, `local`, help and version run here), or when no warm process took it; in
the last case a warm process is started in the background for the next command.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

__all__ = ["main"]


def _warm_worthy(argv: Sequence[str]) -> bool:
    from reconciler.warm import WARM_COMMANDS

    if os.environ.get("UKC_WARM", "1") == "0" or not argv or argv[0] not in WARM_COMMANDS:
        return False
    return not any(a in ("-h", "--help") for a in argv[1:])


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if _warm_worthy(args):
        from reconciler import warm

        path = warm.socket_path()
        if path is not None:
            code = warm.run(args, path)
            if code is not None:
                sys.exit(code)
            warm.spawn(path)
    from reconciler.cli import main as run_here

    run_here(args)
