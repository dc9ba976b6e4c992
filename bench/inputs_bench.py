#!/usr/bin/env python3
"""What per-command `inputs` cost the observer, next to what it does anyway.

    .venv/bin/python bench/inputs_bench.py [--files 100000] [--runs 3]

A manifest of --files entries (two thirds under `pkg*/`, a third under `docs/`) as the scan
leaves it; side by side, best of --runs: the whole-tree digest every apply computes, then
`command_intents` for 1 command without `inputs`, 1 with two patterns, 3 with the same
patterns (computed once) and 3 with different ones.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from hashlib import sha256

from reconciler.reconcile.desired import command_intents
from reconciler.spec.models import SessionSpec
from reconciler.sync.manifest import Entry, Manifest


def _manifest(files: int) -> Manifest:
    entries = {}
    for i in range(files):
        path = f"pkg{i % 100}/mod{i // 100}/f{i}.py" if i % 3 else f"docs/d{i}/x{i}.md"
        entries[path] = Entry("f", 100, 1, 0o644, sha256(str(i).encode()).hexdigest())
    return Manifest(entries)


def _best(runs: int, work: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(runs):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    manifest = _manifest(args.files)
    same = ["pkg1*/**/*.py", "!**/f9*.py"]
    cases = {
        "1 command, no inputs": [{"name": "a", "run": "x"}],
        "1 command, 2 patterns": [{"name": "a", "run": "x", "inputs": same}],
        "3 commands, same patterns": [
            {"name": f"c{i}", "run": "x", "inputs": same} for i in range(3)
        ],
        "3 commands, own patterns": [
            {"name": f"c{i}", "run": "x", "inputs": [f"pkg{i}*/", "docs/"]} for i in range(3)
        ],
    }
    tree = _best(args.runs, lambda: Manifest(dict(manifest.entries)).digest)
    print(f"{args.files} files; best of {args.runs}")
    print(f"  {'whole-tree digest (every apply)':<34} {tree * 1000:8.1f} ms   1.00x")
    for label, commands in cases.items():
        spec = SessionSpec.model_validate({"name": "s", "image": "i", "commands": commands})
        took = _best(args.runs, lambda spec=spec: command_intents(spec, manifest, ()))
        print(f"  {label:<34} {took * 1000:8.1f} ms   {took / tree:.2f}x")


if __name__ == "__main__":
    main()
