#!/usr/bin/env python3
"""Summaries of py-spy's collapsed stacks (`py-spy record -f raw`): where the samples go.

    .venv/bin/python bench/stacks.py FILE [--top 25] [--thread NAME] [--pid PID]
                                          [--under FUNC] [--lines]

Prints the functions with the most samples, inclusive (the function or anything it called was
on the stack: counted once per stack) and self (the innermost frame), as shares of the
samples kept. With `py-spy record --threads --idle` (what `profile_bench.py` uses) every
sample of every thread is there, waiting included, so the main thread's shares are shares of
its wall time; `--thread MainThread` keeps only those. `--under FUNC` keeps the stacks that
pass through FUNC (e.g. `push`), `--pid` one process of a `--subprocesses` recording.
Frames are `function (file)`; `--lines` keeps line numbers apart.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r"^(.*) (\d+)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


def _short(frame: str, lines: bool) -> str:
    m = _FRAME.match(frame)
    if m is None:
        return frame
    func, path, line = m.group(1), m.group(2), m.group(3)
    parts = path.split("/")
    for anchor in ("reconciler", "site-packages", "lib"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + (0 if anchor == "reconciler" else 1) :]
            break
    where = "/".join(parts[-3:])
    return f"{func} ({where}:{line})" if lines and line else f"{func} ({where})"


def load(path: Path, lines: bool = False) -> list[tuple[list[str], int]]:
    """(frames root first, samples) per distinct stack."""
    out: list[tuple[list[str], int]] = []
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        m = _LINE.match(raw.strip())
        if not m:
            continue
        frames = [_short(f, lines) if "(" in f else f for f in m.group(1).split(";")]
        out.append((frames, int(m.group(2))))
    return out


def summarize(
    stacks: list[tuple[list[str], int]],
    *,
    thread: str | None = None,
    pid: str | None = None,
    under: str | None = None,
) -> tuple[int, Counter[str], Counter[str]]:
    total = 0
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    for frames, n in stacks:
        head = " ".join(frames[:2])
        if thread is not None and thread not in head:
            continue
        if pid is not None and f"process {pid}" not in head and f"({pid})" not in head:
            continue
        if under is not None and not any(f.startswith(under + " ") for f in frames):
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        self_[frames[-1]] += n
    return total, inclusive, self_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--thread", default=None, help="keep stacks of this thread (name or id)")
    ap.add_argument("--pid", default=None, help="keep stacks of this process")
    ap.add_argument("--under", default=None, help="keep stacks through this function")
    ap.add_argument("--lines", action="store_true")
    a = ap.parse_args()
    stacks = load(a.file, a.lines)
    total, inclusive, self_ = summarize(stacks, thread=a.thread, pid=a.pid, under=a.under)
    print(f"# {a.file}: {total} samples kept")
    if not total:
        return
    print("## inclusive")
    for f, n in inclusive.most_common(a.top):
        print(f"{100 * n / total:6.1f}%  {n:7d}  {f}")
    print("## self")
    for f, n in self_.most_common(a.top):
        print(f"{100 * n / total:6.1f}%  {n:7d}  {f}")


if __name__ == "__main__":
    main()
