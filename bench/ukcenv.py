"""A private local metro, warm process and environment in which benches run `ukc` as a user
does: the CLI (`python -m reconciler ...`) in a fresh process, forked by the warm process.

Everything lives under one work dir and is stopped by `close()`: the metro daemon
(`UKC_LOCAL_STATE_DIR`), the warm process (`UKC_WARM_DIR`). `ukc()` runs one command and
measures it (`procmeter.run_measured`: wall time, peak RSS and CPU of the process tree,
warm child included).
"""

from __future__ import annotations

import compileall
import json
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmeter import Measured, run_measured
from sync_bench import Metro

import reconciler as reconciler_pkg
from reconciler.cli import warm
from reconciler.local import daemon

UKC = [sys.executable, "-m", "reconciler"]


class UkcEnv:
    def __init__(self, work: Path) -> None:
        # Byte-compile ukc as `pip install` would: with PYTHONDONTWRITEBYTECODE set (as on
        # these machines) every fresh `ukc` process would otherwise recompile its modules.
        compileall.compile_dir(str(Path(reconciler_pkg.__file__).parent), quiet=1)
        self.work = work
        self.state = work / "metro"
        env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
        env["UKC_LOCAL_STATE_DIR"] = str(self.state)
        env["UKC_WARM_DIR"] = str(work / "warm")
        self.env = env
        self.warm_socket = warm.start(env)
        info = warm.status(self.warm_socket) or {}
        self.warm_pid = int(info.get("pid", 0)) or None
        self.metro = Metro(self.state)

    @property
    def metro_pid(self) -> int:
        return self.metro.info.pid

    def ukc(
        self,
        args: list[str],
        cwd: Path,
        *,
        check: bool = True,
        cold: bool = False,
        extra_env: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> Measured:
        """`ukc ARGS` in `cwd` (forked by the warm process unless `cold`), measured."""
        env = dict(self.env, **(extra_env or {}))
        if cold:
            env["UKC_WARM"] = "0"
        else:
            # why asked each time: a warm process whose code changed (any edit of the tree it
            # runs from) is replaced by a new one, whose children the old pid would miss
            info = warm.status(self.warm_socket) or {}
            self.warm_pid = int(info.get("pid", 0)) or self.warm_pid
        return run_measured(
            [*UKC, *args],
            cwd=cwd,
            env=env,
            warm_pid=None if cold else self.warm_pid,
            check=check,
            timeout_s=timeout_s,
        )

    def close(self) -> None:
        warm.request_stop(self.warm_socket)
        daemon.stop(self.state)


def session_status(project: Path, name: str) -> dict[str, Any]:
    """The session's record in `.ukc/status.json` (the status file contract)."""
    doc = json.loads((project / ".ukc" / "status.json").read_text())
    rec: dict[str, Any] = doc["sessions"][name]
    return rec
