#!/usr/bin/env python3
"""Output throughput of a command through `ukc apply`, with and without secrets to redact.

    .venv/bin/python bench/output_bench.py [--mb 100] [--runs 2]

One local-metro session runs `yes LINE | head -c N` (N = --mb megabytes of 80-character lines)
through the real `ukc apply` (stdout to a file, as in CI); the command's duration from the
status file is the figure. With no `secret_env` (redaction has nothing to do), with one secret
value, and with three (one of them 2 characters long), each --runs times, best run shown.
Also prints the redactor alone on the same text (MB/s), per-chunk as before and streaming.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from reconciler.local import daemon

LINE = "2024-01-01 12:00:00 INFO building target 1234 of 5678: src/module/file.py ok"
SECRETS = {"BENCH_S1": "ukcSECRETbench0123456789abcdef", "BENCH_S2": "p@ss w/rd!", "BENCH_S3": "zq"}


def redactor_alone(mb: int) -> None:
    chunk = ((LINE + "\n") * 4000).encode()[: 256 * 1024]
    n = max(1, mb * 1_000_000 // len(chunk))
    values = list(SECRETS.values())

    def per_chunk(data: bytes) -> str:  # the old way: each chunk on its own, raw values only
        text = data.decode("utf-8", "replace")
        for value in values:
            text = text.replace(value, "***")
        return text

    def measure(label: str, feed: Callable[[bytes], object]) -> None:
        started = time.perf_counter()
        for _ in range(n):
            feed(chunk)
        took = time.perf_counter() - started
        print(f"redactor alone, {label}: {n * len(chunk) / took / 1e6:,.0f} MB/s")

    measure("per chunk, raw values only (before)", per_chunk)
    try:
        from reconciler.reconcile.redaction import Redactor
    except ImportError:
        return
    measure("streaming, 1 secret", Redactor(values[:1]).stream().feed)
    measure("streaming, 3 secrets", Redactor(values).stream().feed)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()
    redactor_alone(a.mb)
    work = Path(tempfile.mkdtemp(prefix="ukc-output-bench-"))
    state = work / "metro"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env.update(UKC_LOCAL_STATE_DIR=str(state), UKC_WARM="0", **SECRETS)
    daemon.ensure_running(state)
    command = f"yes '{LINE}' | head -c {a.mb * 1_000_000}"
    try:
        cases = (("no secret_env", ""), ("1 secret", "S1"), ("3 secrets", "S1,S2,S3"))
        for label, secret_env in cases:
            project = work / label.replace(" ", "-")
            (project / "w").mkdir(parents=True)
            lines = [f"name: out{len(secret_env)}", "directory: ./w"]  # one session per case
            if secret_env:
                lines.append("secret_env:")
                lines += [f"  {n}: BENCH_{n}" for n in secret_env.split(",")]
            best = float("inf")
            for run in range(a.runs):
                # a changed command re-runs; the session and its sandbox stay
                cmd = f"{command} # run {run}"
                (project / "s.yaml").write_text("\n".join([*lines, "commands:", f"  - {cmd!r}"]))
                with open(project / "out.log", "wb") as out:
                    subprocess.run(
                        [sys.executable, "-m", "reconciler", "apply", "s.yaml"],
                        cwd=project,
                        env=env,
                        stdout=out,
                        stderr=subprocess.DEVNULL,
                        check=True,
                    )
                status = json.loads((project / ".ukc" / "status.json").read_text())
                (session,) = status["sessions"].values()
                best = min(best, session["commands"][0]["duration_s"])
            print(f"{label}: {a.mb} MB in {best:.2f} s = {a.mb / best:.0f} MB/s (best of {a.runs})")
            subprocess.run(
                [sys.executable, "-m", "reconciler", "delete", "s.yaml"],
                cwd=project,
                env=env,
                capture_output=True,
                check=False,
            )
    finally:
        daemon.stop(state)


if __name__ == "__main__":
    main()
