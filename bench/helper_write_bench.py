#!/usr/bin/env python3
"""The in-sandbox sync helper creating many small files: inline against a write pool.

    .venv/bin/python bench/helper_write_bench.py [--files 100000] [--size 1024]
                                                 [--threads 4] [--rounds 2] [--dir /dev/shm]
                                                 [--seeded]

Drives `reconciler.sync.helper.Helper` in-process (no SSH, no client) with the byte stream a
push sends: a hello, then `puts` batches of `--files` files of `--size` bytes in 100
directories, then a `sync`. Alternates `threads=0` (inline, the default) and `--threads`
(`SyncOptions.write_threads`) `--rounds` times, each into a fresh directory under `--dir`
(tmpfs by default: the local metro's /workspace is a tmpfs). Prints wall and CPU seconds per
round and the median ratio pool / inline. The machine may be shared: compare the ratio.
`--seeded` puts one file in each root first, as the scale bench's session has: the helper then
writes every file through a temp name and a rename (a root that is not empty at hello).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reconciler.sync import helper
from reconciler.sync.push import BATCH_FILES


def _frame(obj: object) -> bytes:
    data = json.dumps(obj).encode("ascii")
    return struct.pack(">I", len(data)) + data


def _stream(n: int, size: int, root: str, threads: int) -> bytes:
    hello = {
        "op": "hello",
        "root": root,
        "state_dir": root + ".state",
        "boot_paths": [],
        "uuid": "bench",
        "digest": "-",
        "threads": threads,
    }
    out = [_frame(hello)]
    body = os.urandom(size) + b"\x01"
    for start in range(0, n, BATCH_FILES):
        idx = range(start, min(n, start + BATCH_FILES))
        files = [[f"d{i % 100}/f{i}.txt", size, 0o644, 1_700_000_000 * 10**9] for i in idx]
        out += [_frame({"op": "puts", "files": files}), body * len(files)]
    out.append(_frame({"op": "sync"}))
    return b"".join(out)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default="/dev/shm")
    ap.add_argument("--seeded", action="store_true", help="a non-empty root (temp + rename)")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ukc-helper-write-", dir=a.dir))
    walls: dict[int, list[float]] = {0: [], a.threads: []}
    print(
        f"# helper_write_bench files={a.files} size={a.size} seeded={a.seeded} "
        f"load={os.getloadavg()[0]:.2f}"
    )
    try:
        for k in range(a.rounds):
            for threads in (0, a.threads):
                root = str(base / f"r{k}t{threads}")
                if a.seeded:
                    os.mkdir(root)
                    Path(root, "seed.txt").write_bytes(b"seed")
                h = helper.Helper(
                    io.BytesIO(_stream(a.files, a.size, root, threads)), io.BytesIO(), 0o022
                )
                t0, c0 = time.perf_counter(), _cpu()
                h.serve()
                h.drain()
                wall, cpu = time.perf_counter() - t0, _cpu() - c0
                h.stop_pool()
                if h.written != a.files or h.nerr or h.direct == a.seeded:
                    raise SystemExit(f"wrote {h.written} of {a.files} files, {h.nerr} errors")
                walls[threads].append(wall)
                print(f"round={k} threads={threads} wall_s={wall:.2f} cpu_s={cpu:.2f}", flush=True)
                shutil.rmtree(root)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    ratio = statistics.median(walls[a.threads]) / statistics.median(walls[0])
    print(f"ratio_pool_over_inline={ratio:.2f}")


if __name__ == "__main__":
    main()
