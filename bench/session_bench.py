#!/usr/bin/env python3
"""One whole session, end to end: the original workflow's scripts against `ukc apply` +
`ukc delete`, on the same tree and command, side by side on the local metro.

    .venv/bin/python bench/session_bench.py [--runs 4] [--tree baseline|small|scale]
                                            [--command 'CMD']

The original workflow (docs/PLATFORM.md, "The original workflow"), each step with its real
client tool, as `tests/local/test_original_workflow.py` runs it against the local metro:
  create   `GET /v1/instances` (is the name free?), `ssh-keygen`, `POST /v1/instances` with
           the workflow's body (env.PUBKEY, 2222/tls and 443/tls+http, scale-to-zero) — curl
  wait     `GET /v1/instances/wait` until running — curl (the scripts themselves retry the
           rsync; the API's wait is the fastest honest form of that retry)
  sync     `rsync -az --delete DIR/ root@FQDN:/workspace/` over `ssh` with
           `ProxyCommand=openssl s_client` (retried at once while sshd is not up yet)
  exec     `POST https://FQDN/exec {"cmd": "cd /workspace && CMD"}` — curl, no auth
  back     `rsync -az root@FQDN:/workspace/ DIR/` (no --delete)
  delete   `DELETE /v1/instances [{"name": ...}]` — curl
ukc: a spec with the same directory and command, and `sync.back: [out/]` (the command writes
its results to out/); `ukc apply` then `ukc delete`, each a fresh process forked by the warm
process. `exec: http` is not needed on this side (commands go over SSH).

Trees: `baseline` (treegen.gen_tree: 2,000 files of 1-16 KiB + 5 x 8 MiB, 59.5 MB), `small`
(20 files), `scale` (treegen.gen_scale_tree with --files). Each run copies the tree for each
side (`cp -a`), so both start from the same bytes; runs alternate which side goes first.
Prints medians: each step, the totals, ratio_session = ukc / original, and the ukc
process tree's peak RSS and CPU for the apply (`ukc_other_s`: the apply's time outside its
journaled phases).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sync_bench import EVEN_RUNS
from treegen import gen_scale_tree, gen_tree
from ukcenv import UkcEnv, session_status

from tests.support.workflow import curl_api, curl_argv, rsync_argv

DEFAULT_COMMAND = "mkdir -p out && find . -path ./out -prune -o -type f -print | wc -l > out/n"


def original_side(env: UkcEnv, tree: Path, k: int, command: str) -> dict[str, float]:
    info = env.metro.info
    out: dict[str, float] = {}
    name = f"sandbox-bench{k}-{int(time.time())}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{name}."))
    t_start = time.perf_counter()

    def step(label: str, t0: float) -> float:
        now = time.perf_counter()
        out[f"orig_{label}_s"] = now - t0
        return now

    # create-sandbox.sh
    t = time.perf_counter()
    listed = curl_api(info, "GET", "/v1/instances")
    if name in [i["name"] for i in listed["data"]["instances"]]:
        raise SystemExit(f"{name} exists")
    key = tmp / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    body = {
        "name": name,
        "image": "ukc/local-minimal:latest",
        "memory_mb": 4096,
        "env": {"PUBKEY": key.with_suffix(".pub").read_text().strip()},
        "service_group": {
            "services": [
                {"port": 2222, "destination_port": 2222, "handlers": ["tls"]},
                {"port": 443, "destination_port": 8080, "handlers": ["tls", "http"]},
            ]
        },
        "scale_to_zero": {"policy": "on", "stateful": True, "cooldown_time_ms": 5000},
        "autostart": True,
    }
    created = curl_api(info, "POST", "/v1/instances", body)
    if created["status"] != "success":
        raise SystemExit(f"create failed: {created}")
    fqdn = created["data"]["instances"][0]["service_group"]["domains"][0]["fqdn"]
    t = step("create", t)
    # wait
    curl_api(
        info, "GET", "/v1/instances/wait", [{"name": name, "state": "running", "timeout_s": 60}]
    )
    t = step("wait", t)
    # sync-to-sandbox.sh (retried while sshd is not accepting yet)
    ca, p2222, p443 = info.ca_path, info.edge_ports[2222], info.edge_ports[443]
    argv = rsync_argv(key, p2222, fqdn, ca, f"{tree}/", f"root@{fqdn}:/workspace/")
    for _ in range(50):
        proc = subprocess.run(argv, capture_output=True, text=True)
        if proc.returncode == 0:
            break
    else:
        raise SystemExit(f"rsync in failed: {proc.stderr}")
    t = step("sync", t)
    # exec-sandbox.js
    got = subprocess.run(
        curl_argv(ca, p443, fqdn, "/exec", "-X", "POST", "-H", "Content-Type: application/json",
                  "--data", json.dumps({"cmd": f"cd /workspace && {command}"})),
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    answer, _, code = got.rpartition("\n")
    if code != "200" or json.loads(answer).get("code") != 0:
        raise SystemExit(f"exec failed: HTTP {code}: {answer[:300]}")
    t = step("exec", t)
    # sync-from-sandbox.sh
    pull = rsync_argv(key, p2222, fqdn, ca, f"root@{fqdn}:/workspace/", f"{tree}/")
    pull.remove("--delete")
    subprocess.run(pull, check=True, capture_output=True)
    t = step("back", t)
    # delete-sandbox.sh
    curl_api(info, "DELETE", "/v1/instances", [{"name": name}])
    shutil.rmtree(tmp)
    step("delete", t)
    out["orig_total_s"] = time.perf_counter() - t_start
    if not (tree / "out" / "n").exists():
        raise SystemExit("the original workflow brought no out/n back")
    return out


def ukc_side(env: UkcEnv, proj: Path, command: str) -> dict[str, float]:
    out: dict[str, float] = {}
    spec = {
        "name": "e2e",
        "directory": "./tree",
        "commands": [command],
        "sync": {"back": ["out/"]},
    }
    (proj / "s.yaml").write_text(json.dumps(spec) + "\n")  # JSON is YAML
    m = env.ukc(["apply", "s.yaml"], proj)
    out["ukc_apply_s"] = m.elapsed_s
    out["ukc_apply_rss_mb"] = m.rss_peak_mb
    out["ukc_apply_cpu_s"] = m.cpu_s
    timings = session_status(proj, "e2e").get("timings", {})
    for phase in ("create_s", "ready_s", "sync_s", "commands_s", "syncback_s"):
        out[f"ukc_{phase.removesuffix('_s')}_s"] = float(timings.get(phase, 0.0))
    # what the phases do not account for: process start, observe (list + scan), plan, the
    # converged round, suspend, the status file
    out["ukc_other_s"] = m.elapsed_s - sum(float(v) for v in timings.values())
    d = env.ukc(["delete", "s.yaml"], proj)
    out["ukc_delete_s"] = d.elapsed_s
    out["ukc_total_s"] = m.elapsed_s + d.elapsed_s
    if not (proj / "tree" / "out" / "n").exists():
        raise SystemExit("ukc brought no out/n back")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=4, help=EVEN_RUNS)
    ap.add_argument("--tree", choices=("baseline", "small", "scale"), default="baseline")
    ap.add_argument("--files", type=int, default=100_000, help="for --tree scale")
    ap.add_argument("--command", default=DEFAULT_COMMAND)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-session-bench-"))
    env = UkcEnv(work)
    try:
        master = work / "master"
        master.mkdir()
        if a.tree == "baseline":
            gen_tree(master)
        elif a.tree == "small":
            gen_tree(master, n_small=20, n_big=0)
        else:
            gen_scale_tree(master, a.files, max(1, a.files // 100))
        runs: list[dict[str, float]] = []
        for k in range(a.runs):
            got: dict[str, float] = {}
            order = ["orig", "ukc"] if k % 2 == 0 else ["ukc", "orig"]
            for side in order:
                base = work / f"{side}{k}"
                base.mkdir()
                subprocess.run(["cp", "-a", str(master), str(base / "tree")], check=True)
                os.sync()
                if side == "orig":
                    got.update(original_side(env, base / "tree", k, a.command))
                else:
                    got.update(ukc_side(env, base, a.command))
            runs.append(got)
            print(f"# run {k}: " + " ".join(f"{key}={v:.3f}" for key, v in got.items()))
            sys.stdout.flush()
        med: dict[str, Any] = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"# session_bench runs={a.runs} tree={a.tree} nproc={os.cpu_count()}")
        print(f"# command={a.command!r}")
        for key in sorted(med):
            print(f"{key}={med[key]:.3f}")
        print(f"ratio_session={med['ukc_total_s'] / med['orig_total_s']:.2f}")
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
