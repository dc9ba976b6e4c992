#!/usr/bin/env python3
"""Sync engine overhead, locally: push/pull through `LocalShell` vs `rsync -a --delete`.

No network, no TLS, no SSH: both sides run on this machine, so the figures show the engine's
own cost (scan, hash, framing, helper) against rsync's on the same tree. The real comparison
on the TLS-SSH path against a local-metro sandbox is the integrated bench's job.

Tree: the baseline generator of /work/shared/bench/rsync_baseline.sh (seed 1234: 2,000 files
of 1-16 KiB in nested dirs + 5 x 8 MiB). Modification: the baseline's (8 small files edited,
1 touched, 1 big file patched 64 KiB).

Usage: python bench/sync_local_bench.py [--runs N] [--rss-gib G] [--workdir DIR] [--no-rsync]
Prints key=value lines (seconds; medians when --runs > 1), e.g.
  engine_initial_s  engine_nochange_s  engine_modified_s  engine_modified_oneshot_s
  engine_pull_s  engine_pull_nochange_s  rsync_initial_s ... ratio_initial=engine/rsync ...
  nochange_bytes_sent=0 nochange_remote_scanned=False
  rss_push_gib=1 rss_client_mib=.. rss_helper_mib=..  (peak RSS of a G GiB push)
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from treegen import gen_tree, modify_tree  # the baseline tree, shared by every bench

from reconciler.sync.engine import SyncOptions, pull, push
from reconciler.transport.local_shell import LocalShell

PY = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def timed(fn: object) -> float:
    t0 = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t0


def opts_for(w: Path, src: Path, name: str) -> SyncOptions:
    (w / "boot_id").write_text("bench-boot\n")
    return SyncOptions(
        local_root=src,
        state_dir=w / f"state_{name}",
        remote_root=str(w / f"remote_{name}" / "tree"),
        remote_state_dir=str(w / f"rstate_{name}"),
        boot_id_paths=(str(w / "boot_id"),),
        remote_python=PY,
    )


ONESHOT = """
import sys
from pathlib import Path
from reconciler.transport.local_shell import LocalShell
from reconciler.sync.engine import SyncOptions, push
o = SyncOptions(local_root=Path(sys.argv[1]), state_dir=Path(sys.argv[2]),
                remote_root=sys.argv[3], remote_state_dir=sys.argv[4],
                boot_id_paths=(sys.argv[5],), remote_python=sys.argv[6])
r = push(LocalShell(), o, instance_uuid="bench")
print(r.files_sent, r.bytes_sent, r.remote_scanned)
"""


def one_run(w: Path, do_rsync: bool) -> dict[str, float | str]:
    out: dict[str, float | str] = {}
    src = w / "src"
    shutil.rmtree(w, ignore_errors=True)
    w.mkdir(parents=True)
    gen_tree(src)
    shell = LocalShell()
    o = opts_for(w, src, "engine")
    r: list[object] = []
    out["engine_initial_s"] = timed(lambda: r.append(push(shell, o, instance_uuid="bench")))
    res = push(shell, o, instance_uuid="bench")
    out["nochange_files_sent"] = str(res.files_sent)
    out["nochange_bytes_sent"] = str(res.bytes_sent)
    out["nochange_remote_scanned"] = str(res.remote_scanned)
    out["engine_nochange_s"] = timed(lambda: push(shell, o, instance_uuid="bench"))
    if do_rsync:
        rdst = w / "rsync_remote"
        cmd = ["rsync", "-a", "--delete", f"{src}/", f"{rdst}/"]
        out["rsync_initial_s"] = timed(lambda: subprocess.run(cmd, check=True))
        out["rsync_nochange_s"] = timed(lambda: subprocess.run(cmd, check=True))
    modify_tree(src)
    res_mod: list[object] = []
    out["engine_modified_s"] = timed(lambda: res_mod.append(push(shell, o, instance_uuid="bench")))
    out["modified_files_sent"] = str(getattr(res_mod[0], "files_sent", "?"))
    if do_rsync:
        out["rsync_modified_s"] = timed(lambda: subprocess.run(cmd, check=True))
    # one-shot: a fresh interpreter (import + scan with the hash cache + push), as `ukc apply`
    o2 = opts_for(w, w / "src", "oneshot")
    push(shell, o2, instance_uuid="bench")
    modify_tree(src)  # a second, different edit to the same tree
    argv = [
        sys.executable,
        "-c",
        ONESHOT,
        str(src),
        str(o2.state_dir),
        o2.remote_root,
        o2.remote_state_dir,
        o2.boot_id_paths[0],
        PY,
    ]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out["engine_modified_oneshot_s"] = timed(
        lambda: subprocess.run(argv, check=True, env=env, stdout=subprocess.DEVNULL)
    )
    if do_rsync:
        out["rsync_modified_oneshot_s"] = timed(lambda: subprocess.run(cmd, check=True))
    # sync-back of the whole tree into a fresh local dir
    back_root = w / "back_engine"
    back_root.mkdir()
    po = SyncOptions(
        local_root=back_root,
        state_dir=w / "state_pull",
        back=("tree/",),
        remote_root=str(w / "remote_engine"),
        remote_state_dir=str(w / "rstate_pull"),
        boot_id_paths=(str(w / "boot_id"),),
        remote_python=PY,
    )
    out["engine_pull_s"] = timed(lambda: pull(shell, po))
    out["engine_pull_nochange_s"] = timed(lambda: pull(shell, po))
    if do_rsync:
        cmd_from = ["rsync", "-a", "--delete", f"{rdst}/", f"{w / 'back_rsync'}/"]
        out["rsync_from_s"] = timed(lambda: subprocess.run(cmd_from, check=True))
        out["rsync_from_nochange_s"] = timed(lambda: subprocess.run(cmd_from, check=True))
    check = subprocess.run(["diff", "-r", str(w / "remote_engine/tree"), str(back_root / "tree")])
    out["pull_round_trip_equal"] = str(check.returncode == 0)
    shell.close()
    return out


def peak_rss_kib() -> int:
    """Peak RSS of this process (VmHWM). why not ru_maxrss: Linux carries the parent's
    high-water mark over fork + exec, so a child of a big bench process would report the
    parent's size. (The helper's figure here, RUSAGE_CHILDREN, still includes this process's
    size at the fork: an overstatement, never an understatement.)"""
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_child(w: Path, gib: float) -> None:
    """Generate a `gib` GiB tree, push it, print the peak RSS of client and helper."""
    src = w / "big_src"
    block = os.urandom(1 << 20)
    n_mib = int(gib * 1024)
    per_file = 64
    for i in range(0, n_mib, per_file):
        p = src / f"d{i // 256}" / f"f{i}.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as f:
            for j in range(per_file):
                f.write(i.to_bytes(8, "big") + j.to_bytes(8, "big") + block[16:])
    before = peak_rss_kib()
    o = opts_for(w, src, "rss")
    shell = LocalShell()
    t = timed(lambda: push(shell, o, instance_uuid="bench"))
    shell.close()
    me = peak_rss_kib()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(f"rss_push_gib={gib}")
    print(f"rss_push_s={t:.3f}")
    print(f"rss_client_before_push_mib={before / 1024:.1f}")
    print(f"rss_client_mib={me / 1024:.1f}")
    print(f"rss_helper_mib={kids / 1024:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--rss-gib", type=float, default=1.0, help="0 to skip the RSS figure")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-rsync", action="store_true")
    ap.add_argument("--rss-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rss_child:
        rss_child(Path(args.rss_child), args.rss_gib)
        return
    base = Path(tempfile.mkdtemp(prefix="sync_bench.", dir=args.workdir))
    try:
        runs = [one_run(base / f"run{k}", not args.no_rsync) for k in range(args.runs)]
        print(f"# sync_local_bench: runs={args.runs} nproc={os.cpu_count()} helper={PY}")
        keys = list(runs[0])
        med: dict[str, float] = {}
        for k in keys:
            vals = [r[k] for r in runs]
            if isinstance(vals[0], float):
                med[k] = statistics.median(float(v) for v in vals)
                print(f"{k}={med[k]:.3f}")
            else:
                print(f"{k}={vals[-1]}")
        for name in ("initial", "nochange", "modified", "modified_oneshot"):
            if f"rsync_{name}_s" in med:
                print(f"ratio_{name}={med[f'engine_{name}_s'] / med[f'rsync_{name}_s']:.2f}")
        if "rsync_from_s" in med:
            print(f"ratio_pull={med['engine_pull_s'] / med['rsync_from_s']:.2f}")
        if args.rss_gib > 0:
            shutil.rmtree(base / "rss", ignore_errors=True)
            (base / "rss").mkdir()
            sys.stdout.flush()
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--rss-child",
                    str(base / "rss"),
                    "--rss-gib",
                    str(args.rss_gib),
                ],
                check=True,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
