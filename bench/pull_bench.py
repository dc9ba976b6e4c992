#!/usr/bin/env python3
"""Sync-back at scale, locally: `sync.pull` through `LocalShell` beside `rsync -a`, with the
pull's peak RSS.

    .venv/bin/python bench/pull_bench.py [--files 100000] [--dirs 1000] [--workdir DIR]

No network: both tools copy a "sandbox" tree on this machine into an empty local directory,
so the figures are the pull's own cost (helper walk, framing, checks, writes, the pull record)
against rsync's. Phases, each in a fresh child process (its VmHWM is the pull's peak RSS,
the interpreter and imports included):

  fresh      the whole tree into an empty directory (rsync: `rsync -a src/ empty/`)
  unchanged  the same pull again: nothing is sent (rsync: the same command again)
  onefile    one sandbox file changed, then pulled (rsync: the same)

Prints key=value lines: `rsync_<phase>_s`, `ukc_<phase>_s`, `ratio_<phase>`,
`ukc_<phase>_rss_mb`, the pull record's size on disk, and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from treegen import gen_scale_tree


def child(work: Path) -> None:
    """One pull of `work/remote/out/` into `work/local/`, then its figures as JSON."""
    from reconciler.sync.options import SyncOptions
    from reconciler.sync.pull import pull
    from reconciler.transport.local_shell import LocalShell

    remote_python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    opts = SyncOptions(
        local_root=work / "local",
        state_dir=work / "state",
        remote_root=str(work / "remote"),
        remote_state_dir=str(work / "rstate"),
        boot_id_paths=(str(work / "boot"),),
        remote_python=remote_python,
        back=("out/",),
        back_max_files=1_000_000,
        back_max_bytes=1 << 34,
        timeout_s=3600.0,
    )
    t0 = time.perf_counter()
    res = pull(LocalShell(), opts, instance_uuid="bench-uuid")
    elapsed = time.perf_counter() - t0
    with open("/proc/self/status", encoding="ascii") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(
        json.dumps(
            {
                "s": elapsed,
                "rss_mb": hwm / 1024,
                "written": res.files_written,
                "unchanged": res.unchanged,
                "stopped": res.stopped,
                "aborted": res.aborted,
            }
        )
    )


def run_child(work: Path) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(work)],
        check=True,
        capture_output=True,
        text=True,
    )
    got: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return got


def rsync(src: Path, dst: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run(["rsync", "-a", f"{src}/", f"{dst}/"], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--child", type=Path, default=None)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child)
        return
    work = Path(tempfile.mkdtemp(prefix="ukc-pull-bench-", dir=a.workdir))
    try:
        (work / "boot").write_text("boot-1\n")
        out_dir = work / "remote" / "out"
        gen_scale_tree(out_dir, a.files, a.dirs)
        (work / "local").mkdir()
        (work / "rsync").mkdir()
        print(f"# files={a.files} dirs={a.dirs} workdir={work}")
        print(f"# load_before={os.getloadavg()[0]:.2f}")
        figures: dict[str, float] = {}

        def phase(name: str) -> None:
            os.sync()
            figures[f"rsync_{name}_s"] = rsync(out_dir, work / "rsync" / "out")
            os.sync()
            got = run_child(work)
            if got["stopped"] or got["aborted"]:
                raise SystemExit(f"{name}: the pull stopped: {got}")
            figures[f"ukc_{name}_s"] = float(str(got["s"]))
            figures[f"ukc_{name}_rss_mb"] = float(str(got["rss_mb"]))
            figures[f"ukc_{name}_written"] = float(str(got["written"]))

        phase("fresh")
        if figures["ukc_fresh_written"] != a.files:
            raise SystemExit(f"the pull wrote {figures['ukc_fresh_written']:.0f} of {a.files}")
        phase("unchanged")
        victim = next(iter(sorted((out_dir / "d000").iterdir())))
        victim.write_bytes(b"changed in the sandbox\n")
        phase("onefile")
        record = sum(p.stat().st_size for p in (work / "state").iterdir() if p.is_file())
        for k in sorted(figures):
            v = figures[k]
            print(f"{k}={v:.0f}" if k.endswith("_written") else f"{k}={v:.3f}")
        for name in ("fresh", "unchanged", "onefile"):
            print(f"ratio_{name}={figures[f'ukc_{name}_s'] / figures[f'rsync_{name}_s']:.2f}")
        print(f"pull_record_bytes={record}")
        print(f"# load_after={os.getloadavg()[0]:.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
