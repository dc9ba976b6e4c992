#!/usr/bin/env python3
"""Stateless runners on the local metro: what a fresh clone's apply costs, and the lease.

    .venv/bin/python bench/stateless_bench.py [--runs 5]

Prints key=value lines, side by side:
  first_apply_s          the first apply of a session (create, push 50 files, 2 commands):
                         what a fresh runner did before it could derive keys and read the
                         journal (it replaced the instance and did everything again)
  fresh_plan_s           `ukc plan` in a fresh clone (no .ukc/): reads the sandbox's journal
  fresh_apply_s          `ukc apply` in a fresh clone: a no-op rebuilt from the journal
  fresh_apply_requests   its platform API requests (list, lease create + delete)
  fresh_vs_first         fresh_apply_s / first_apply_s
  noop_apply_s           median no-op apply without UKC_PROJECT (no lease)
  noop_apply_requests    its API requests
  noop_apply_lease_s     median no-op apply with UKC_PROJECT (the lease: create + delete)
  noop_apply_lease_requests
  lease_ratio            noop_apply_lease_s / noop_apply_s
Uses its own metro state dir and warm process and cleans up after itself.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import secrets
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

SPEC = """\
name: bench
directory: ./work
commands:
  - wc -l f1.txt > /dev/null
  - cat f*.txt | wc -c > /dev/null
"""


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
    if proc.returncode != 0:
        raise SystemExit(f"ukc {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
    data: dict[str, object] = json.loads(proc.stdout) if "--output" in args else {}
    return elapsed, data


def project(root: Path) -> Path:
    (root / "work").mkdir(parents=True)
    for i in range(50):
        (root / "work" / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    (root / "s.yaml").write_text(SPEC)
    return root


def noop(root: Path, env: dict[str, str], runs: int) -> tuple[float, int]:
    times, requests = [], []
    for _ in range(runs):
        t, data = run(["apply", "s.yaml", "--output", "json"], root, env)
        times.append(t)
        requests.append(int(data["api_requests"]))  # type: ignore[call-overload]
    return statistics.median(times), max(requests)


def main() -> None:
    compileall.compile_dir(str(Path(reconciler_pkg.__file__).parent), quiet=1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-stateless-bench-"))
    state = work / "metro"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env["UKC_LOCAL_STATE_DIR"] = str(state)
    env["UKC_WARM_DIR"] = str(work / "warm")
    warm_socket = warm.start(env)
    ci = dict(env, UKC_PROJECT="bench-" + secrets.token_hex(4))
    ci["UKC_SESSION_SECRET"] = secrets.token_hex(16)
    try:
        daemon.ensure_running(state)
        first = project(work / "a")
        first_s, _ = run(["apply", "s.yaml"], first, ci)
        fresh = work / "b"
        shutil.copytree(first, fresh, ignore=shutil.ignore_patterns(".ukc"))
        fresh_plan_s, _ = run(["plan", "--detailed-exitcode", "s.yaml"], fresh, ci)
        fresh_s, data = run(["apply", "s.yaml", "--output", "json"], fresh, ci)
        print(f"first_apply_s={first_s:.3f}")
        print(f"fresh_plan_s={fresh_plan_s:.3f}")
        print(f"fresh_apply_s={fresh_s:.3f}")
        print(f"fresh_apply_requests={data['api_requests']}")
        print(f"fresh_vs_first={fresh_s / first_s:.2f}")
        plain = project(work / "plain")
        run(["apply", "s.yaml"], plain, env)
        noop_s, noop_req = noop(plain, env, a.runs)
        lease_s, lease_req = noop(first, ci, a.runs)
        print(f"noop_apply_s={noop_s:.3f}")
        print(f"noop_apply_requests={noop_req}")
        print(f"noop_apply_lease_s={lease_s:.3f}")
        print(f"noop_apply_lease_requests={lease_req}")
        print(f"lease_ratio={lease_s / noop_s:.2f}")
        for root, environ in ((first, ci), (plain, env)):
            run(["delete", "s.yaml"], root, environ)
    finally:
        daemon.stop(state)
        warm.request_stop(warm_socket)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
