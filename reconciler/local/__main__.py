"""Command line of the local metro daemon: `python -m reconciler.local serve --state-dir DIR`.

Runs `serve.serve()` until shutdown. A failure prints one line on stderr (daemon.log, which
`daemon.ensure_running` reads back).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from reconciler.errors import UkcError
from reconciler.local.daemon import default_state_dir
from reconciler.local.sandbox.runtime import DEFAULT_MAX_PIDS
from reconciler.local.serve import serve
from reconciler.local.state.records import DEFAULT_APP_DOMAIN
from reconciler.local.state.validation import MetroLimits

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reconciler.local")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the local metro in the foreground")
    s.add_argument("--state-dir", type=Path, default=None)
    s.add_argument("--port", type=int, default=0, help="API port (0 = pick a free one)")
    s.add_argument("--app-domain", default=DEFAULT_APP_DOMAIN)
    s.add_argument("--max-instances", type=int, default=MetroLimits().max_instances)
    s.add_argument(
        "--max-pids",
        type=int,
        default=int(os.environ.get("UKC_LOCAL_MAX_PIDS") or DEFAULT_MAX_PIDS),
        help="tasks (processes and threads) one sandbox may have (env UKC_LOCAL_MAX_PIDS)",
    )
    args = parser.parse_args(argv)
    state_dir: Path = args.state_dir or default_state_dir()
    try:
        asyncio.run(
            serve(
                state_dir,
                port=args.port,
                app_domain=args.app_domain,
                limits=MetroLimits(max_instances=args.max_instances),
                max_pids=args.max_pids,
            )
        )
    except UkcError as exc:
        print(f"ukc local metro: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
