"""The `ukc` entry point: hand short commands to the warm process, or run them here.

Imports nothing but `warmclient` until it knows it must run the command in this process: the
point of the warm process (`warm`) is that a command does not pay ~0.25 s of imports, and this
module is what every command imports first.

A command runs here when the user opted out (`UKC_WARM=0`), when it is not one of the short
commands (`watch`, `local`, help and version run here), or when no warm process took it; in
the last case a warm process is started in the background for the next command.
"""

from __future__ import annotations

import os
import sys

from reconciler.cli import warmclient

TYPE_CHECKING = False  # why not typing's: see warmclient
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if warmclient.worthy(args):
        path, warning = warmclient.locate_socket()
        if warning:
            sys.stderr.write(warning + "\n")
        if path is not None:
            code = warmclient.run(args, path)
            if code is not None:
                # why not sys.exit: the interpreter's teardown was ~3.5 ms of every warm
                # command; nothing of this process is left to do but its streams' buffers
                # (the command wrote to the same fds itself)
                for stream in (sys.stdout, sys.stderr):
                    stream.flush()
                os._exit(code)
            from pathlib import Path

            from reconciler.cli import warm

            warm.spawn(Path(path))
    from reconciler.cli.main import main as run_here

    run_here(args)
