#!/usr/bin/env python3
"""Sync-back over find+tar (an image without python3) beside the python helper and rsync.

    .venv/bin/python bench/tarpull_bench.py [--runs 3]

One local metro (realistic behaviour), the baseline tree (bench/treegen.py: 2,000 small
files + 5 × 8 MiB, 59.5 MB, seeded) put in the sandbox's `/workspace/out` (untimed). Per run,
three fresh sandboxes reached through the TLS edge on 2222, as on UKC:

* python: `ukc/local-sandbox:latest` (python3 in the image): ukc's pull, the python helper;
* tar: `ukc/local-minimal:latest` (no python3): ukc's pull over the sandbox's find and tar
  (the path its push recorded for the instance, as in an apply);
* rsync: `ukc/local-minimal:latest`, the original workflow's sync-from-sandbox
  (`rsync -az` over an `openssl s_client` ProxyCommand, a fresh process per call).

Phases: initial (connect + sync-back of the whole tree into an empty local directory), no
change (connect + sync-back, nothing changed), modified (treegen.modify_tree in the sandbox's
copy: 8 edited, 1 touched, 1 big file patched, pushed untimed; then connect + sync-back).
Prints medians and the ratios tar/python and tar/rsync; the sides alternate their order.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_bench import Metro, rsync_cmd, timed, wait_engine_ready, wait_rsync_ready
from threeway import report, rotated_run
from treegen import gen_tree, modify_tree

from reconciler.local import daemon
from reconciler.local.behaviour import MINIMAL_IMAGE
from reconciler.spec.models import DEFAULT_LOCAL_IMAGE
from reconciler.sync import engine
from reconciler.sync.capability import recorded_tools
from reconciler.sync.options import SyncOptions
from reconciler.transport import sshclient as ssh_backend
from reconciler.transport.keys import generate_keypair

PHASES = ("initial", "nochange", "modified")


def engine_side(
    metro: Metro, work: Path, image: str, label: str, cleanup: list[Any]
) -> dict[str, float]:
    up = work / "up"
    gen_tree(up / "out")
    down = work / "down"
    down.mkdir(parents=True)
    key = work / "key"
    pub = generate_keypair(key)
    name = f"tarpull-{label}-{work.name}-{os.getpid()}"
    inst = metro.create(name, pub, image)
    cleanup.append(lambda: metro.delete(name))
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    uuid = inst["uuid"]
    # one session: the push and the pull share its state dir (the recorded sync path)
    state = work / "state"
    push_opts = SyncOptions(local_root=up, state_dir=state, session=label)
    pull_opts = SyncOptions(local_root=down, state_dir=state, session=label, back=("out/",))
    wait_engine_ready(metro, fqdn, key)  # untimed: sshd and the key come after `running`

    def push() -> None:
        shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=key)
        try:
            engine.push(shell, push_opts, instance_uuid=uuid)
        finally:
            shell.close()

    push()
    out: dict[str, float] = {}
    for phase in PHASES:
        if phase == "modified":
            modify_tree(up / "out")
            push()
        os.sync()
        t0 = time.perf_counter()
        shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=key)
        try:
            res = engine.pull(shell, pull_opts, instance_uuid=uuid)
        finally:
            shell.close()
        out[f"{label}_{phase}_s"] = time.perf_counter() - t0
        out[f"{label}_{phase}_files"] = res.files_written
        if res.rejected or res.stopped or res.aborted:
            raise SystemExit(f"the {label} pull failed: {res}")
    path = recorded_tools(pull_opts, uuid)
    want = "python" if label == "python" else "shell"
    if path != want:
        raise SystemExit(f"the {label} side took the {path} path, not {want}")
    return out


def rsync_side(metro: Metro, work: Path, cleanup: list[Any]) -> dict[str, float]:
    src = work / "src"
    gen_tree(src)
    back = work / "back"
    back.mkdir(parents=True)
    key = work / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"tarpull-rsync-{work.name}-{os.getpid()}"
    inst = metro.create(name, key.with_suffix(".pub").read_text().strip(), MINIMAL_IMAGE)
    cleanup.append(lambda: metro.delete(name))
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    remote = f"root@{fqdn}:/workspace/out/"
    wait_rsync_ready(metro, key, fqdn)
    timed(rsync_cmd(metro, key, fqdn, f"{src}/", remote))  # untimed setup
    out = {
        "rsync_initial_s": timed(rsync_cmd(metro, key, fqdn, remote, f"{back}/")),
        "rsync_nochange_s": timed(rsync_cmd(metro, key, fqdn, remote, f"{back}/")),
    }
    modify_tree(src)
    timed(rsync_cmd(metro, key, fqdn, f"{src}/", remote))  # untimed setup
    out["rsync_modified_s"] = timed(rsync_cmd(metro, key, fqdn, remote, f"{back}/"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-tarpull-bench-"))
    state = work / "metro"
    try:
        metro = Metro(state)
        runs: list[dict[str, float]] = []
        for k in range(a.runs):
            sides = [
                lambda c, k=k: engine_side(
                    metro, work / f"py{k}", DEFAULT_LOCAL_IMAGE, "python", c
                ),
                lambda c, k=k: engine_side(metro, work / f"tar{k}", MINIMAL_IMAGE, "tar", c),
                lambda c, k=k: rsync_side(metro, work / f"rs{k}", c),
            ]
            runs.append(rotated_run(sides, k))
        report(
            runs,
            f"# runs={a.runs} nproc={os.cpu_count()} tree=2000x1-16KiB+5x8MiB sync-back",
            PHASES,
        )
    finally:
        daemon.stop(state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
