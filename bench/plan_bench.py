#!/usr/bin/env python3
"""`ukc plan` beside `ukc apply` on a big tree: no change, and one file changed.

    .venv/bin/python bench/plan_bench.py [--files 100000] [--rounds 3]

One session on a private local metro (as `scale_bench.py`), its tree made by
`treegen.gen_scale_tree` and synced once (untimed). Then, `--rounds` times: `ukc plan` and
`ukc apply` with nothing changed, then one file edited and `ukc plan` followed by the
`ukc apply` that sends it. Every command is forked by the warm process, as a user runs them.
Prints key=value lines: medians of wall time and peak RSS per command and case, and
`ratio_plan_<case>` = plan / apply.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treegen import edit_one, gen_scale_tree, scale_files
from ukcenv import UkcEnv


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="ukc-plan-bench-"))
    env = UkcEnv(work)
    proj = work / "p"
    tree = proj / "tree"
    print(f"# files={a.files} rounds={a.rounds} load_before={os.getloadavg()[0]:.2f}")
    try:
        gen_scale_tree(tree, a.files, a.dirs)
        files = scale_files(tree)
        (proj / "s.yaml").write_text("name: plan-bench\ndirectory: ./tree\n")
        env.ukc(["apply", "s.yaml"], proj, timeout_s=1800)
        env.ukc(["apply", "s.yaml"], proj, timeout_s=600)
        got: dict[str, list[float]] = {}

        def run(key: str, args: list[str], ok: tuple[int, ...]) -> None:
            m = env.ukc(args, proj, check=False, timeout_s=600)
            if m.returncode not in ok:
                raise SystemExit(f"{' '.join(args)} exited {m.returncode}")
            got.setdefault(f"{key}_s", []).append(m.elapsed_s)
            got.setdefault(f"{key}_rss_mb", []).append(m.rss_peak_mb)

        for r in range(a.rounds):
            run("plan_nochange", ["plan", "s.yaml", "--detailed-exitcode"], (0,))
            run("apply_nochange", ["apply", "s.yaml"], (0,))
            edit_one(tree, files, r, "plan-bench")
            run("plan_onefile", ["plan", "s.yaml", "--detailed-exitcode"], (2,))
            run("apply_onefile", ["apply", "s.yaml"], (0,))
        med = {k: statistics.median(v) for k, v in got.items()}
        for k in sorted(med):
            print(f"{k}={med[k]:.3f}")
        for case in ("nochange", "onefile"):
            print(f"ratio_plan_{case}={med[f'plan_{case}_s'] / med[f'apply_{case}_s']:.2f}")
    finally:
        env.ukc(["delete", "s.yaml"], proj, check=False, timeout_s=600)
        env.close()
        print(f"# load_after={os.getloadavg()[0]:.2f}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
