#!/usr/bin/env python3
"""`ukc watch` write-to-remote latency of two checkouts, side by side under the same load.

    .venv/bin/python bench/watch_pair.py BEFORE_CHECKOUT AFTER_CHECKOUT [--edits 60] [--files 2005]

Why paired: on a shared machine one `watch_bench.py` run after another sees a different load
(p50 moved 12-17 ms between runs of the same code). Here two `ukc watch` processes run at
once, one per checkout (`PYTHONPATH`), each on its own local metro and tree of `--files` small
files; the edits alternate between them (A,B then B,A), 0.3 s apart, so both see the same
load. Each edit is timed from the write until the new bytes are in that sandbox's /workspace
(read on the host side of its bind mount), as in `watch_bench.py`.

Prints p50/p95/max per side and the ratio of the p50s (after / before).
"""

from __future__ import annotations

import argparse
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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from treegen import edit_and_wait, start_watch

_DAEMON = "from pathlib import Path; from reconciler.local import daemon; "


def _side(label: str, checkout: str, files: int, work: Path) -> dict[str, Any]:
    state = work / f"metro-{label}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env["UKC_LOCAL_STATE_DIR"] = str(state)
    env["PYTHONPATH"] = checkout
    code = _DAEMON + f"print(daemon.ensure_running(Path({str(state)!r})).state_dir)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    home = work / label
    tree = home / "tree"
    proc = start_watch(home, files, env)
    workspaces = Path(out.stdout.strip().splitlines()[-1]) / "workspaces"
    return {
        "label": label,
        "env": env,
        "state": state,
        "home": home,
        "tree": tree,
        "proc": proc,
        "workspaces": workspaces,
        "lat": [],
    }


def _wait_ready(side: dict[str, Any]) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            rec = json.loads((side["home"] / ".ukc" / "status.json").read_text())
            live = rec["sessions"]["live"]
            if live["phase"] == "Ready":
                side["remote"] = side["workspaces"] / live["instance"]["uuid"]
                return
        except (FileNotFoundError, KeyError, ValueError):
            pass
        time.sleep(0.05)
    raise SystemExit(f"side {side['label']}: ukc watch did not converge within 90 s")


def _edit(side: dict[str, Any], k: int, files: int) -> None:
    label = f"side {side['label']}: "
    side["lat"].append(edit_and_wait(side["tree"], side["remote"], k, files, label))


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--edits", type=int, default=60)
    ap.add_argument("--files", type=int, default=2005)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-watch-pair-"))
    sides: list[dict[str, Any]] = []
    try:
        sides = [_side("before", a.before, a.files, work), _side("after", a.after, a.files, work)]
        for side in sides:
            _wait_ready(side)
        time.sleep(1.0)
        for k in range(a.edits):
            for side in sides if k % 2 == 0 else sides[::-1]:
                _edit(side, k, a.files)
                time.sleep(0.3)
        print(f"# edits={a.edits} files={a.files} load={os.getloadavg()[0]:.2f}")
        for side in sides:
            lat = side["lat"]
            print(f"{side['label']}_p50_ms={statistics.median(lat):.1f}")
            print(f"{side['label']}_p95_ms={_p95(lat):.1f}")
            print(f"{side['label']}_max_ms={max(lat):.1f}")
        ratio = statistics.median(sides[1]["lat"]) / statistics.median(sides[0]["lat"])
        print(f"ratio_p50_after_before={ratio:.2f}")
    finally:
        for side in sides:
            proc = side["proc"]
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            stop = _DAEMON + f"daemon.stop(Path({str(side['state'])!r}))"
            subprocess.run([sys.executable, "-c", stop], env=side["env"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
