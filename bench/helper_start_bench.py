#!/usr/bin/env python3
"""CPU of one sync helper start in the sandbox, by how it gets its code object.

    .venv/bin/python bench/helper_start_bench.py [--starts 40] [--python /usr/bin/python3]

Starts the real bootstrap (`remote.helper_command`) under `--python` through `sh -c`, as a
sandbox does, sends the payload and closes stdin (the helper ends at once), `--starts` times
per way, and prints the CPU per start (sh + python, from RUSAGE_CHILDREN): a fresh sandbox
that compiles the source (no code shipped: as before), one with the compiled code cached in
its state dir, one with the shipped code object (a fresh sandbox today), and the floor
(`python -E -S -c pass`). Ratios to the floor side by side: the machine may be shared.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from reconciler.sync import remote
from reconciler.sync.options import SyncOptions


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(cmd: str, payload: bytes) -> None:
    out = subprocess.run(["sh", "-c", cmd], input=payload, capture_output=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"helper start failed: {out.stderr[-300:]!r}")


def _per_start_ms(starts: int, make: Callable[[int], tuple[str, bytes]]) -> float:
    _run(*make(-1))  # page cache
    t0 = _cpu()
    for i in range(starts):
        _run(*make(i))
    return (_cpu() - t0) / starts * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--starts", type=int, default=40)
    ap.add_argument("--python", default="/usr/bin/python3")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="ukc-helper-start-"))

    def opts(state: str) -> SyncOptions:
        return SyncOptions(
            local_root=base,
            state_dir=base / "local-state",
            remote_root=str(base / "root"),
            remote_state_dir=str(base / state),
            remote_python=args.python,
        )

    shipped = remote.program()
    source_only = remote.Program(shipped.source)

    def way(
        prog: remote.Program, state: Callable[[int], str]
    ) -> Callable[[int], tuple[str, bytes]]:
        return lambda i: (remote.helper_command(opts(state(i)), prog=prog), prog.payload)

    floor = _per_start_ms(args.starts, lambda i: (f"exec {args.python} -E -S -c pass", b""))
    rows = {
        "compile (fresh sandbox, before)": way(source_only, lambda i: f"fresh{i}"),
        "cached in the sandbox's state dir": way(source_only, lambda i: "warm"),
        "shipped code (fresh sandbox, now)": way(shipped, lambda i: f"shipped{i}"),
    }
    print(f"# helper_start_bench python={args.python} starts={args.starts} tag={shipped.tag}")
    print(f"floor (python -E -S -c pass): {floor:.2f} ms CPU/start")
    for name, make in rows.items():
        ms = _per_start_ms(args.starts, make)
        print(f"{name}: {ms:.2f} ms CPU/start, {ms / floor:.2f}x floor, +{ms - floor:.2f} ms")


if __name__ == "__main__":
    main()
