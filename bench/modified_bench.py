#!/usr/bin/env python3
"""The baseline tree's small phases, repeated and interleaved with rsync: 10 files changed
(`ukc apply`) and sync-back of the whole tree, as medians of `--rounds` pairs.

    .venv/bin/python bench/modified_bench.py [--rounds 9] [--no-back]

`sync_bench.py` takes one sample of each phase per run (a fresh pair of sandboxes each), and
on this shared machine one sample of a 0.2 s phase moves by 2x. Here one rsync sandbox and one
ukc session live for the whole run; each round edits both trees the same way
(`treegen.modify_tree` with the round's seed: 8 small files edited, 1 touched, 1 big file
patched 64 KiB), then times rsync and `ukc apply` one right after the other (alternating which
goes first). Sync-back: each round pulls the sandbox's tree into a new empty directory with
`rsync -az` and with the engine's pull (connection included, as `sync_bench`'s `ukc_from_s`);
the copies are removed only after the last round (deleting thousands of files slows the next
creations on a journal-less ext4).

Prints key=value lines: per phase the rsync and ukc medians, their ratio, the ratio of each
round's pair (min/median/max), and the load average before and after.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_bench import rsync_cmd, timed, wait_rsync_ready
from treegen import gen_tree, modify_tree
from ukcenv import UkcEnv

from reconciler.sync import engine
from reconciler.sync.options import SyncOptions
from reconciler.transport import sshclient as ssh_backend


def pairs(
    name: str,
    rounds: int,
    prep: Callable[[int], None],
    a: Callable[[int], float],
    b: Callable[[int], float],
) -> None:
    ra: list[float] = []
    rb: list[float] = []
    for r in range(rounds):
        prep(r)
        if r % 2:
            tb = b(r)
            ta = a(r)
        else:
            ta = a(r)
            tb = b(r)
        ra.append(ta)
        rb.append(tb)
    per = sorted(y / x for x, y in zip(ra, rb, strict=True))
    ma, mb = statistics.median(ra), statistics.median(rb)
    print(f"rsync_{name}_s={ma:.3f}")
    print(f"ukc_{name}_s={mb:.3f}")
    print(f"ratio_{name}={mb / ma:.2f}")
    print(
        f"ratio_{name}_pairs=min {per[0]:.2f} median {statistics.median(per):.2f} max {per[-1]:.2f}"
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--no-back", action="store_true")
    a = ap.parse_args()
    # a TERM (a bench stopped by hand) still deletes the sandboxes and stops the metro
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="ukc-modified-bench-"))
    env = UkcEnv(work)
    print(f"# rounds={a.rounds} load_before={os.getloadavg()[0]:.2f}")
    cleanup: list[Callable[[], object]] = []
    try:
        metro = env.metro
        rs_tree = work / "rsync-tree"
        gen_tree(rs_tree)
        key = work / "rsync-key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
        inst = metro.create(f"modified-bench-{os.getpid()}", key.with_suffix(".pub").read_text())
        cleanup.append(lambda: metro.delete(f"modified-bench-{os.getpid()}"))
        fqdn = inst["service_group"]["domains"][0]["fqdn"]
        dst = f"root@{fqdn}:/workspace/"
        wait_rsync_ready(metro, key, fqdn)
        timed(rsync_cmd(metro, key, fqdn, f"{rs_tree}/", dst))

        proj = work / "ukc"
        tree = proj / "tree"
        gen_tree(tree)
        # suspend: false: the bench reaches the sandbox over ssh between applies, and it
        # measures the sync, not a wake (rsync's sandbox is up throughout)
        (proj / "s.yaml").write_text("name: bench\ndirectory: ./tree\nsuspend: false\n")
        env.ukc(["apply", "s.yaml"], proj)
        cleanup.append(lambda: env.ukc(["delete", "s.yaml"], proj, check=False))
        env.ukc(["apply", "s.yaml"], proj)

        def edit(r: int) -> None:
            modify_tree(rs_tree, seed=5000 + r)
            modify_tree(tree, seed=5000 + r)

        pairs(
            "modified",
            a.rounds,
            edit,
            lambda r: timed(rsync_cmd(metro, key, fqdn, f"{rs_tree}/", dst)),
            lambda r: env.ukc(["apply", "s.yaml"], proj).elapsed_s,
        )
        if not a.no_back:
            status = json.loads((proj / ".ukc" / "status.json").read_text())
            ukc_fqdn = status["sessions"]["bench"]["instance"]["fqdn"]
            keyp = proj / ".ukc" / "keys" / "bench"
            top = tuple(sorted(p.name + ("/" if p.is_dir() else "") for p in tree.iterdir()))
            backs = work / "backs"
            backs.mkdir()

            def ukc_back(r: int) -> float:
                dest = backs / f"ukc{r}"
                dest.mkdir(parents=True)
                opts = SyncOptions(local_root=dest, state_dir=backs / f"ukc{r}.state", back=top)
                os.sync()
                t0 = time.perf_counter()
                shell = ssh_backend.SshShell.connect(metro.dialer(), ukc_fqdn, key_path=keyp)
                try:
                    got = engine.pull(shell, opts)
                finally:
                    shell.close()
                took = time.perf_counter() - t0
                if got.files_written < 2005:
                    raise SystemExit(f"sync-back brought {got.files_written} files")
                return took

            pairs(
                "back",
                a.rounds,
                lambda r: None,
                lambda r: timed(rsync_cmd(metro, key, fqdn, dst, f"{backs / f'rsync{r}'}/")),
                ukc_back,
            )
    finally:
        for c in reversed(cleanup):
            try:
                c()
            except Exception as exc:  # the figures are printed; say what was left behind
                print(f"# cleanup: {exc}")
        env.close()
        print(f"# load_after={os.getloadavg()[0]:.2f}")
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
