#!/usr/bin/env python3
"""Controller figures on the local metro: no-op apply (fresh process) and a 500-session plan.

    .venv/bin/python bench/apply_bench.py [--runs 5] [--sessions 500]

Prints key=value lines:
  noop_apply_s         median wall time of `ukc apply` (a new process) on a converged session,
                       forked by the warm process (as a user's second command is)
  noop_apply_cold_s    the same with UKC_WARM=0 (no warm process: every import paid)
  noop_apply_requests  platform API requests that apply made (from its --output json)
  plan_500_s           median wall time of `ukc plan` over 500 sessions (a new process)
  plan_500_requests    platform API requests that plan made
Uses its own metro state dir and cleans up after itself.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reconciler as reconciler_pkg
from reconciler.cli import warm
from reconciler.local import daemon


def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - t0
    if proc.returncode not in (0, 2):
        raise SystemExit(f"ukc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    data: dict[str, object] = json.loads(proc.stdout) if "--output" in args else {}
    return elapsed, data


def main() -> None:
    # Byte-compile ukc as `pip install` would: with PYTHONDONTWRITEBYTECODE set (as on these
    # machines) every fresh `ukc` process would otherwise recompile its modules from source.
    compileall.compile_dir(str(Path(reconciler_pkg.__file__).parent), quiet=1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=500)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-apply-bench-"))
    state = work / "metro"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env["UKC_LOCAL_STATE_DIR"] = str(state)
    env["UKC_WARM_DIR"] = str(work / "warm")  # the bench's own, stopped at the end
    warm_socket = warm.start(env)
    try:
        daemon.ensure_running(state)
        one = work / "one"
        (one / "work").mkdir(parents=True)
        for i in range(50):
            (one / "work" / f"f{i}.txt").write_text(f"file {i}\n" * 20)
        (one / "s.yaml").write_text("name: bench\ndirectory: ./work\ncommands: ['wc -l f1.txt']\n")
        run(["apply", "s.yaml"], one, env)
        times, requests = [], []
        for _ in range(a.runs):
            t, data = run(["apply", "s.yaml", "--output", "json"], one, env)
            times.append(t)
            requests.append(int(data["api_requests"]))  # type: ignore[call-overload]
        print(f"noop_apply_s={statistics.median(times):.3f}")
        print(f"noop_apply_requests={max(requests)}")
        cold = [run(["apply", "s.yaml"], one, {**env, "UKC_WARM": "0"})[0] for _ in range(a.runs)]
        print(f"noop_apply_cold_s={statistics.median(cold):.3f}")
        run(["delete", "s.yaml"], one, env)

        many = work / "many"
        (many / "work").mkdir(parents=True)
        (many / "work" / "a.txt").write_text("a\n")
        docs = [
            f"name: s{i:04d}\ndirectory: ./work\ncommands: ['true']\n" for i in range(a.sessions)
        ]
        (many / "specs.yaml").write_text("---\n".join(docs))
        times, requests = [], []
        for _ in range(max(1, a.runs // 2)):
            t, data = run(["plan", "specs.yaml", "--output", "json"], many, env)
            times.append(t)
            requests.append(int(data["api_requests"]))  # type: ignore[call-overload]
        print(f"plan_{a.sessions}_s={statistics.median(times):.3f}")
        print(f"plan_{a.sessions}_requests={max(requests)}")
    finally:
        warm.request_stop(warm_socket)
        daemon.stop(state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
