#!/usr/bin/env python3
"""Summaries of py-spy's collapsed stacks (`py-spy record -f raw`): where the samples go.

    .venv/bin/python bench/stacks.py FILE [--top 25] [--critical | --kind KIND]
                                          [--thread NAME] [--pid PID] [--under FUNC] [--lines]

Prints the functions with the most samples, inclusive (the function or anything it called was
on the stack: counted once per stack) and self (the innermost frame), as shares of the
samples kept. With `py-spy record --threads --idle` (what `profile_bench.py` uses) every
sample of every thread is there, waiting included, so the main thread's shares are shares of
its wall time. `--critical` keeps what adds up to a one-session `ukc apply`'s wall time (the
main thread outside its wait for the worker pool, plus every `Executor.run_session`);
`--kind` one kind of metro-side process of a `--subprocesses` recording (daemon, agent,
sync-helper); `--under FUNC` the stacks through FUNC (e.g. `push`). Thread names are
py-spy's and may be stale (a pool thread that reuses an ended thread's id keeps its name):
select by function, not by thread name. Frames are `function (file)`; `--lines` keeps line
numbers apart.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    """(frames root first, samples) per distinct stack.

    A `--subprocesses` recording names each process by its command line, which may span
    lines (the sync helper is started with a multi-line `python3 -c`): a record ends only
    at a line that ends in its sample count.
    """
    out: list[tuple[list[str], int]] = []
    text = path.read_text(encoding="utf-8", errors="replace")
    for raw in re.split(r"(?<=\s\d)\n|(?<=\d\d)\n", text):
        m = _LINE.match(raw.strip().replace("\n", " "))
        if not m or ";" not in m.group(1):
            continue
        frames = [_short(f, lines) if "(" in f else f for f in m.group(1).split(";")]
        out.append((frames, int(m.group(2))))
    return out


MAIN = "_run_module_as_main"
#: where the main thread of `ukc apply` waits for the sessions' worker threads
POOL_WAIT = "Executor.map.<locals>.result_iterator"


def critical_path(frames: list[str]) -> bool:
    """The samples that add up to a one-session apply's wall time: the main thread except
    while it waits for the thread pool, and each worker's `Executor.run_session`."""
    names = {f.split(" (")[0] for f in frames}
    if "Executor.run_session" in names:
        return True
    return any(f.startswith(MAIN) for f in frames) and POOL_WAIT not in names


def process_kind(frames: list[str]) -> str:
    """Which metro-side process a `--subprocesses` stack belongs to."""
    # the innermost process frame: a sandbox's processes descend from the daemon's
    head = next((f for f in reversed(frames) if f.startswith("process ")), frames[0])
    if "ukc-sync" in head or "marshal" in head or "exec(c)" in head:
        return "sync-helper"
    if "/run/ukc-host/agent/" in head:
        return "agent"
    if "reconciler.local" in head:
        return "daemon"
    return "other"


def summarize(
    stacks: list[tuple[list[str], int]],
    *,
    thread: str | None = None,
    pid: str | None = None,
    under: str | None = None,
    keep: Callable[[list[str]], bool] | None = None,
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
        if keep is not None and not keep(frames):
            continue
        total += n
        for f in set(frames):
            inclusive[f] += n
        self_[frames[-1]] += n
    return total, inclusive, self_


def report(
    stacks: list[tuple[list[str], int]],
    title: str,
    top: int = 30,
    **kw: Any,
) -> str:
    """Top inclusive and self functions as text (shares of the samples kept)."""
    total, inclusive, self_ = summarize(stacks, **kw)
    out = [f"## {title}: {total} samples"]
    if total:
        out.append("### inclusive")
        out += [f"{100 * n / total:6.1f}% {n:7d}  {f}" for f, n in inclusive.most_common(top)]
        out.append("### self")
        out += [f"{100 * n / total:6.1f}% {n:7d}  {f}" for f, n in self_.most_common(top)]
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", type=Path)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--thread", default=None, help="keep stacks of this thread (name or id)")
    ap.add_argument("--pid", default=None, help="keep stacks of this process")
    ap.add_argument("--under", default=None, help="keep stacks through this function")
    ap.add_argument("--lines", action="store_true")
    ap.add_argument("--critical", action="store_true", help="the one-session wall-time path")
    ap.add_argument("--kind", choices=("daemon", "agent", "sync-helper", "other"))
    a = ap.parse_args()
    stacks = load(a.file, a.lines)
    keep = None
    if a.critical:
        keep = critical_path
    elif a.kind:
        kind = a.kind
        keep = lambda frames: process_kind(frames) == kind  # noqa: E731
    print(
        report(
            stacks,
            str(a.file),
            a.top,
            thread=a.thread,
            pid=a.pid,
            under=a.under,
            keep=keep,
        ),
        end="",
    )


if __name__ == "__main__":
    main()
