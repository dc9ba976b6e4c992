#!/usr/bin/env python3
"""The shell+tar sync path (an image without python3) beside the python helper and rsync.

    .venv/bin/python bench/tarpath_bench.py [--runs 3]

One local metro (realistic behaviour), the baseline tree (bench/treegen.py: 2,000 small
files + 5 × 8 MiB, 59.5 MB, seeded). Per run, three fresh sandboxes reached through the TLS
edge on 2222, as on UKC:

* python: `ukc/local-sandbox:latest` (python3 in the image), ukc's engine: the python helper;
* tar: `ukc/local-minimal:latest` (no python3), ukc's engine: its first push learns that from
  the helper's failed start, records it and goes on over shell+tar; every later push starts
  there;
* rsync: `ukc/local-minimal:latest`, the original workflow's `rsync -az --delete` over an
  `openssl s_client` ProxyCommand, a fresh process per call.

Phases: initial (connect + full push into the empty sandbox), no change (connect + push of
the unchanged tree), modified (treegen.modify_tree: 8 edited, 1 touched, 1 big file patched,
then connect + push). The engine's sides include the SSH connection, as an apply's sync does
(no process start: `sync_bench.py` measures `ukc apply` as a whole). Prints medians and the
ratios tar/python and tar/rsync; the sides alternate their order from run to run.
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
    tree = work / "tree"
    tree.mkdir(parents=True)
    gen_tree(tree)
    key = work / "key"
    pub = generate_keypair(key)
    name = f"tarpath-{label}-{work.name}-{os.getpid()}"
    inst = metro.create(name, pub, image)
    cleanup.append(lambda: metro.delete(name))
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    opts = SyncOptions(local_root=tree, state_dir=work / "state", session=label)
    wait_engine_ready(metro, fqdn, key)  # untimed: sshd and the key come after `running`
    out: dict[str, float] = {}
    for phase in PHASES:
        if phase == "modified":
            modify_tree(tree)
        os.sync()
        t0 = time.perf_counter()
        shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=key)
        try:
            res = engine.push(shell, opts, instance_uuid=inst["uuid"])
        finally:
            shell.close()
        out[f"{label}_{phase}_s"] = time.perf_counter() - t0
        if phase == "nochange":
            out[f"{label}_nochange_bytes_sent"] = res.bytes_sent
            out[f"{label}_nochange_remote_scanned"] = int(res.remote_scanned)
        if phase == "modified":
            out[f"{label}_modified_files_sent"] = res.files_sent
    path = recorded_tools(opts, inst["uuid"])
    want = "python" if label == "python" else "shell"
    if path != want:
        raise SystemExit(f"the {label} side took the {path} path, not {want}")
    return out


def rsync_side(metro: Metro, work: Path, cleanup: list[Any]) -> dict[str, float]:
    src = work / "src"
    src.mkdir(parents=True)
    gen_tree(src)
    key = work / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"tarpath-rsync-{work.name}-{os.getpid()}"
    inst = metro.create(name, key.with_suffix(".pub").read_text().strip(), MINIMAL_IMAGE)
    cleanup.append(lambda: metro.delete(name))
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    dst = f"root@{fqdn}:/workspace/"
    wait_rsync_ready(metro, key, fqdn)
    out = {
        "rsync_initial_s": timed(rsync_cmd(metro, key, fqdn, f"{src}/", dst)),
        "rsync_nochange_s": timed(rsync_cmd(metro, key, fqdn, f"{src}/", dst)),
    }
    modify_tree(src)
    out["rsync_modified_s"] = timed(rsync_cmd(metro, key, fqdn, f"{src}/", dst))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-tarpath-bench-"))
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
        report(runs, f"# runs={a.runs} nproc={os.cpu_count()} tree=2000x1-16KiB+5x8MiB", PHASES)
    finally:
        daemon.stop(state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
