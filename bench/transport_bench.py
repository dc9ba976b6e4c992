#!/usr/bin/env python3
"""`exec: plugin` against `exec: ssh`: the same session through each transport, side by side
on the local metro, as ratios plugin / ssh.

    .venv/bin/python bench/transport_bench.py [--runs 3] [--tree baseline|small]
                                              [--output-mb 50]

Each run makes one project per transport from the same tree (`treegen.gen_tree`; `baseline`
is 2,000 files of 1-16 KiB + 5 x 8 MiB, `small` 200 files + 1 x 8 MiB) and runs `ukc` as a
user does (a fresh process forked by the warm process); runs alternate which transport goes
first. Figures, from the wall clock and the status file's phase timings:
  apply       the first `ukc apply`: create, ready, full sync, the commands, sync-back
  ready       its `ready_s` (until the transport accepts)
  full sync   its `sync_s` (the whole tree to a new instance)
  exec        the median `duration_s` of 10 commands `true`
  sync-back   its `syncback_s` (a command wrote 40 files x 512 KiB into out/)
  output      the `duration_s` of a command printing OUTPUT_MB through `ukc apply`
  edit sync   `sync_s` of an apply after one file changed
Prints the medians and ratio = plugin / ssh (below 1: the plugin transport is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treegen import gen_tree
from ukcenv import UkcEnv, session_status

TRANSPORTS = ("ssh", "plugin")
FIGURES = ("apply", "ready", "full sync", "exec", "sync-back", "output", "edit sync")
BACK = "mkdir -p out && for i in $(seq 40); do head -c 524288 /dev/urandom > out/f$i; done"


def spec(transport: str, extra: list[dict[str, str]] | None = None) -> str:
    commands = [{"name": f"t{i}", "run": "true"} for i in range(10)]
    commands.append({"name": "back", "run": BACK})
    body = {
        "name": "tb",
        "directory": "./tree",
        "exec": transport,
        "commands": commands + (extra or []),
        "sync": {"back": ["out/"]},
    }
    return json.dumps(body) + "\n"  # JSON is YAML


def one_side(
    env: UkcEnv, tree: Path, work: Path, transport: str, output_mb: int
) -> dict[str, float]:
    proj = work / transport
    shutil.copytree(tree, proj / "tree", symlinks=True)
    (proj / "s.yaml").write_text(spec(transport))
    out: dict[str, float] = {}
    try:
        first = env.ukc(["apply", "s.yaml"], proj)
        rec: dict[str, Any] = session_status(proj, "tb")
        timings = rec.get("timings", {})
        out["apply"] = first.elapsed_s
        out["ready"] = float(timings.get("ready_s", 0.0))
        out["full sync"] = float(timings.get("sync_s", 0.0))
        out["sync-back"] = float(timings.get("syncback_s", 0.0))
        durations = [c["duration_s"] for c in rec["commands"] if c["name"].startswith("t")]
        out["exec"] = statistics.median(durations)

        loud = {"name": "loud", "run": f"head -c {output_mb * 1_000_000} /dev/zero | tr '\\0' x"}
        (proj / "s.yaml").write_text(spec(transport, [loud]))
        env.ukc(["apply", "s.yaml"], proj)
        rec = session_status(proj, "tb")
        (dur,) = [c["duration_s"] for c in rec["commands"] if c["name"] == "loud"]
        out["output"] = dur

        edited = next(p for p in sorted((proj / "tree").rglob("*")) if p.is_file())
        edited.write_bytes(edited.read_bytes() + b"edit\n")
        env.ukc(["apply", "s.yaml"], proj)
        out["edit sync"] = float(session_status(proj, "tb").get("timings", {}).get("sync_s", 0.0))
    finally:
        env.ukc(["delete", "s.yaml"], proj, check=False)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tree", choices=("baseline", "small"), default="baseline")
    parser.add_argument("--output-mb", type=int, default=50)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="transport-bench."))
    env = UkcEnv(work)
    try:
        tree = work / "tree"
        tree.mkdir()
        small = args.tree == "small"
        size = gen_tree(tree, n_small=200, n_big=1) if small else gen_tree(tree)
        print(f"tree: {args.tree}, {size / 1e6:.1f} MB; {args.runs} run(s); ", end="")
        print(f"output {args.output_mb} MB")
        results: dict[str, list[dict[str, float]]] = {t: [] for t in TRANSPORTS}
        for k in range(args.runs):
            order = TRANSPORTS if k % 2 == 0 else TRANSPORTS[::-1]
            for transport in order:
                run_dir = work / f"run{k}"
                run_dir.mkdir(exist_ok=True)
                results[transport].append(one_side(env, tree, run_dir, transport, args.output_mb))
        print(f"{'figure':<11} {'ssh':>10} {'plugin':>10} {'plugin/ssh':>11}")
        for figure in FIGURES:
            ssh = statistics.median(r[figure] for r in results["ssh"])
            plug = statistics.median(r[figure] for r in results["plugin"])
            ratio = plug / ssh if ssh else float("nan")
            print(f"{figure:<11} {ssh:>9.3f}s {plug:>9.3f}s {ratio:>10.2f}x")
    finally:
        env.close()
        if not os.environ.get("BENCH_KEEP"):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
