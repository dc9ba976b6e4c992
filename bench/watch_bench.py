#!/usr/bin/env python3
"""Write-to-remote latency of `ukc watch` with the session connection warm.

    .venv/bin/python bench/watch_bench.py [--edits 40] [--files 500]

Starts `ukc watch` (a real process) on one local-metro session whose directory holds `--files`
small files, waits until it converged, then edits one file at a time (0.3 s apart, so each edit
finds the watcher idle) and measures the time from the write until the new content is in the
sandbox's /workspace (read on the host side of the bind mount). Prints p50/p95/max in ms.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import reconciler as reconciler_pkg
from reconciler.local import daemon

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treegen import edit_and_wait, start_watch


def main() -> None:
    # Byte-compile ukc as `pip install` would: with PYTHONDONTWRITEBYTECODE set (as on these
    # machines) every fresh `ukc` process would otherwise recompile its modules from source.
    compileall.compile_dir(str(Path(reconciler_pkg.__file__).parent), quiet=1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--edits", type=int, default=40)
    ap.add_argument("--files", type=int, default=500)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-watch-bench-"))
    state = work / "metro"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env["UKC_LOCAL_STATE_DIR"] = str(state)
    proc = None
    try:
        info = daemon.ensure_running(state)
        tree = work / "tree"
        proc = start_watch(work, a.files, env)
        status = work / ".ukc" / "status.json"
        deadline = time.monotonic() + 60
        uuid = ""
        while time.monotonic() < deadline:
            try:
                rec = json.loads(status.read_text())["sessions"]["live"]
                if rec["phase"] == "Ready":
                    uuid = rec["instance"]["uuid"]
                    break
            except (FileNotFoundError, KeyError, ValueError):
                pass
            time.sleep(0.05)
        if not uuid:
            raise SystemExit("watch did not converge within 60 s")
        remote = info.state_dir / "workspaces" / uuid
        time.sleep(1.0)
        latencies = []
        for k in range(a.edits):
            latencies.append(edit_and_wait(tree, remote, k, a.files))
            time.sleep(0.3)
        latencies.sort()
        p95 = latencies[max(0, round(0.95 * len(latencies)) - 1)]
        print(f"# edits={a.edits} files={a.files}")
        print(f"watch_write_to_remote_p50_ms={statistics.median(latencies):.1f}")
        print(f"watch_write_to_remote_p95_ms={p95:.1f}")
        print(f"watch_write_to_remote_max_ms={latencies[-1]:.1f}")
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        daemon.stop(state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
