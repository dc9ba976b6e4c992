#!/usr/bin/env python3
"""Reaching a session: `ukc exec NAME -- true` and `ukc ssh NAME -- true` against the
hand-assembled way the README used to show (`ssh` with the session's key and
`ProxyCommand=openssl s_client` through the edge), side by side on a private local metro.

    .venv/bin/python bench/reach_bench.py [--runs 10]

Each run starts a fresh process per side (as a user does), the sides in alternating order;
prints the median wall time of each and ratio = ukc / hand-assembled ssh. ukc's side also
checks the ownership proof and the pinned host key (one API read), which the hand-assembled
one does not do (it trusts any host key).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from ukcenv import UkcEnv, session_status

from tests.support.workflow import ssh_argv

SPEC = "name: reach\ndirectory: ./work\ncommands: ['true']\n"


def timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True, timeout=120)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="reach-bench.") as tmp:
        env = UkcEnv(Path(tmp))
        try:
            project = Path(tmp) / "project"
            (project / "work").mkdir(parents=True)
            (project / "session.yaml").write_text(SPEC)
            env.ukc(["apply", "session.yaml"], project)
            inst = session_status(project, "reach")["instance"]
            info = env.metro.info
            by_hand = ssh_argv(
                project / ".ukc" / "keys" / "reach",
                info.edge_ports[2222],
                inst["fqdn"],
                info.ca_path,
                "true",
            )
            sides = {
                "ukc_exec_s": [sys.executable, "-m", "reconciler", "exec", "reach", "--", "true"],
                "ukc_ssh_s": [sys.executable, "-m", "reconciler", "ssh", "reach", "--", "true"],
                "by_hand_ssh_s": by_hand,
            }
            times: dict[str, list[float]] = {k: [] for k in sides}
            for run in range(args.runs):
                order = list(sides) if run % 2 == 0 else list(reversed(sides))
                for key in order:
                    times[key].append(timed(sides[key], project, env.env))
            result: dict[str, float] = {k: round(statistics.median(v), 3) for k, v in times.items()}
            result["ratio_exec"] = round(result["ukc_exec_s"] / result["by_hand_ssh_s"], 2)
            result["ratio_ssh"] = round(result["ukc_ssh_s"] / result["by_hand_ssh_s"], 2)
            print(json.dumps({"runs": args.runs, **result}, indent=2))
        finally:
            env.close()


if __name__ == "__main__":
    main()
