#!/usr/bin/env python3
"""Fan-out: N new sessions in one `ukc apply`, at several concurrencies, on the local metro.

    .venv/bin/python bench/fanout_bench.py [--sessions 1,10,50] [--concurrency 8,32,64]
                                           [--runs 1] [--base-runs 3] [--files 3]

Each session is new (a fresh project dir per measurement, so fresh instance names): its own
directory of `--files` small files and one command (`cat *.txt | wc -c`). One `ukc apply
--concurrency C` (a fresh process forked by the warm process, as a user runs it) creates,
boots, syncs and runs all of them; then `ukc delete` (not timed) and a wait until the metro
has no sandbox left, so measurements do not overlap (`--settle S` waits S seconds more: the
metro keeps reaping a deleted sandbox's namespace for up to 5 s after its processes are gone,
and a reaper still running when the next sandboxes boot can kill one of them; see
bench/PROFILE.md).

Prints one line per (sessions, concurrency): the apply's wall seconds (time to converge),
failures (count, exit code, the first error, and what the metro says of a failed instance:
state, start_count, stop_reason, exit_code, the tail of its log), the ratio to one session at
the same concurrency, the ukc process tree's CPU seconds (user + system, launcher + warm child;
`procmeter`) and the metro's (daemon, sandboxes and every process they ran: `procmeter.TreeCpu`,
a cgroup around the metro's tree where the bench runs as root, named on the first line), the
mean per-session phase timings from the status file (create_s, ready_s, sync_s,
commands_s), and peak RSS. Then `cpu_per_extra_session_s` = (CPU(N) - CPU(1)) / (N - 1) per
concurrency. Medians over `--runs` (the one-session measurement, the ratios' denominator and
~1 s long, over `--base-runs` when that is more: a single run of it swung 1.0-1.7 s on the
shared machine). The machine may be shared: compare ratios.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmeter import TreeCpu, descendants
from ukcenv import UkcEnv

PHASES = ("create_s", "ready_s", "sync_s", "commands_s")


def make_project(root: Path, n: int, files: int) -> Path:
    root.mkdir(parents=True)
    docs = []
    for i in range(n):
        d = root / f"w{i:03d}"
        d.mkdir()
        for j in range(files):
            (d / f"f{j}.txt").write_text(f"session {i} file {j}\n" * (20 + j))
        docs.append(f"name: s{i:03d}\ndirectory: ./w{i:03d}\ncommands: ['cat *.txt | wc -c']\n")
    (root / "specs.yaml").write_text("---\n".join(docs))
    return root


def metro_view(env: UkcEnv, name: str) -> dict[str, Any]:
    """What the metro says about one instance: lifecycle fields and the end of its log."""
    http = env.metro.http
    got = http.get("/v1/instances", params={"name": name}).json()
    inst = (got.get("data", {}).get("instances") or [{}])[0]
    view = {k: inst.get(k) for k in ("state", "start_count", "stop_reason", "exit_code")}
    try:
        logs = http.request("GET", "/v1/instances/log", json=[{"name": name}]).json()
        raw = base64.b64decode(logs["data"]["instances"][0]["output"])
        view["log_tail"] = raw.decode("utf-8", "replace").strip().splitlines()[-4:]
    except (KeyError, IndexError, ValueError):
        view["log_tail"] = []
    return view


def sandbox_processes(metro_pid: int) -> int:
    """The metro's descendants but its sandbox launch server (started at the first boot, it
    stays: counting it, the first measurement's wait for its sandboxes to go timed out)."""
    count = 0
    for pid in descendants(metro_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not (len(argv) > 4 and argv[3].endswith(b"launch.py") and argv[4] == b"--serve"):
            count += 1
    return count


def wait_sandboxes_gone(env: UkcEnv, baseline: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while sandbox_processes(env.metro_pid) > baseline and time.monotonic() < deadline:
        time.sleep(0.2)


def one(
    env: UkcEnv,
    metro: TreeCpu,
    work: Path,
    n: int,
    conc: int,
    files: int,
    tag: str,
    settle_s: float = 0.0,
) -> dict[str, Any]:
    proj = make_project(work / f"p-{tag}", n, files)
    baseline = sandbox_processes(env.metro_pid)
    metro_cpu0 = metro.seconds()
    os.sync()
    m = env.ukc(["apply", "--concurrency", str(conc), "specs.yaml"], proj, check=False)
    metro_cpu = metro.seconds() - metro_cpu0
    doc = json.loads((proj / ".ukc" / "status.json").read_text())
    sessions = doc.get("sessions", {})
    failed = {k: v for k, v in sessions.items() if v.get("phase") != "Ready"}
    failed_n = len(failed) + max(0, n - len(sessions))
    out: dict[str, Any] = {
        "sessions": n,
        "concurrency": conc,
        "wall_s": m.elapsed_s,
        "exit": m.returncode,
        "failed": failed_n,
        "ukc_cpu_s": m.cpu_s,
        "metro_cpu_s": metro_cpu,
        "rss_mb": m.rss_peak_mb,
    }
    for phase in PHASES:
        vals = [float(s.get("timings", {}).get(phase, 0.0)) for s in sessions.values()]
        out[f"mean_{phase}"] = statistics.mean(vals) if vals else 0.0
        out[f"max_{phase}"] = max(vals) if vals else 0.0
    if failed:
        name, rec = sorted(failed.items())[0]
        out["first_error"] = f"{name}: {rec.get('message', '')[:300]}"
        inst = (rec.get("instance") or {}).get("name")
        if inst:
            out["first_failed_instance"] = metro_view(env, inst)
    elif m.returncode != 0:
        out["first_error"] = m.stderr.strip().splitlines()[-1:] or ["?"]
    env.ukc(["delete", "specs.yaml"], proj, check=False, timeout_s=600)
    wait_sandboxes_gone(env, baseline)
    time.sleep(settle_s)
    shutil.rmtree(proj, ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", default="1,10,50")
    ap.add_argument("--concurrency", default="8,32,64")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument(
        "--base-runs",
        type=int,
        default=3,
        help="runs of the one-session measurement (the ratios' denominator; median)",
    )
    ap.add_argument("--files", type=int, default=3, help="small files per session")
    ap.add_argument(
        "--settle",
        type=float,
        default=0.0,
        help="seconds to wait after a measurement's deletes (6 outlasts the metro's reapers)",
    )
    ap.add_argument("--json", default=None, help="also write every measurement to this file")
    a = ap.parse_args()
    counts = [int(x) for x in a.sessions.split(",")]
    concs = [int(x) for x in a.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="ukc-fanout-bench-"))
    env = UkcEnv(work)
    results: list[dict[str, Any]] = []
    # the metro's processes from now on (the sandboxes' launch server, started at the first
    # boot, is born inside)
    metro = TreeCpu(env.metro_pid)
    try:
        # one session first, untimed: the metro's first boot pays one-off costs (CA, ports)
        one(env, metro, work, 1, 8, a.files, "warmup")
        print(
            f"# fanout_bench nproc={os.cpu_count()} files/session={a.files} runs={a.runs} "
            f"base_runs={a.base_runs} metro_cpu_by={metro.method}"
        )
        med: dict[tuple[int, int], dict[str, Any]] = {}
        for conc in concs:
            for n in counts:
                runs = max(a.runs, a.base_runs) if n == 1 else a.runs
                got = [
                    one(env, metro, work, n, conc, a.files, f"{n}-{conc}-{r}", a.settle)
                    for r in range(runs)
                ]
                results.extend(got)
                row = dict(got[0])
                for key in ("wall_s", "ukc_cpu_s", "metro_cpu_s", "rss_mb"):
                    row[key] = statistics.median(g[key] for g in got)
                # why a sum: a failure in any run is a failure
                row["failed"] = sum(g["failed"] for g in got)
                for phase in PHASES:
                    row[f"mean_{phase}"] = statistics.median(g[f"mean_{phase}"] for g in got)
                med[(n, conc)] = row
                base = med.get((1, conc))
                ratio = row["wall_s"] / base["wall_s"] if base else float("nan")
                print(
                    f"sessions={n} concurrency={conc} wall_s={row['wall_s']:.2f} "
                    f"ratio_to_one={ratio:.1f} failed={row['failed']:g} exit={row['exit']} "
                    f"ukc_cpu_s={row['ukc_cpu_s']:.2f} metro_cpu_s={row['metro_cpu_s']:.2f} "
                    f"rss_mb={row['rss_mb']:.1f} "
                    + " ".join(f"mean_{p}={row[f'mean_{p}']:.2f}" for p in PHASES)
                )
                for g in got:
                    if "first_error" in g:
                        print(f"  first_error: {g['first_error']}")
                    if "first_failed_instance" in g:
                        print(f"  metro_says: {json.dumps(g['first_failed_instance'])}")
                sys.stdout.flush()
        for conc in concs:
            ns = [n for n in counts if (n, conc) in med and n > 1]
            if (1, conc) in med and ns:
                top = max(ns)
                extra = (med[(top, conc)]["ukc_cpu_s"] - med[(1, conc)]["ukc_cpu_s"]) / (top - 1)
                extra_m = (med[(top, conc)]["metro_cpu_s"] - med[(1, conc)]["metro_cpu_s"]) / (
                    top - 1
                )
                print(
                    f"concurrency={conc} cpu_per_extra_session_s={extra:.3f} "
                    f"metro_cpu_per_extra_session_s={extra_m:.3f} (from 1 to {top} sessions)"
                )
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1))
    finally:
        env.close()
        metro.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
