"""The python helper, shell+tar and rsync measured side by side: each run takes the three in a
rotated order (each goes first once in three runs), and the medians print as seconds and
ratios (tar/python, tar/rsync, python/rsync per phase)."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from typing import Any

#: one side of a run: fills in its timings, registers its cleanup steps in the list it gets
Side = Callable[[list[Any]], dict[str, float]]


def rotated_run(sides: Sequence[Side], k: int) -> dict[str, float]:
    """Run k: every side once, starting with side k mod 3, each cleaned up before the next."""
    shift = k % len(sides)
    row: dict[str, float] = {}
    for side in [*sides[shift:], *sides[:shift]]:
        cleanup: list[Any] = []
        row.update(side(cleanup))
        for step in cleanup:
            step()
    return row


def report(runs: Sequence[dict[str, float]], header: str, phases: Sequence[str]) -> None:
    """Print the medians of `runs` under `header`, then the ratios of each phase."""
    med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    print(header)
    for key in sorted(med):
        print(f"{key}={med[key]:.3f}" if key.endswith("_s") else f"{key}={int(med[key])}")
    for phase in phases:
        tar, py, rs = (med[f"{s}_{phase}_s"] for s in ("tar", "python", "rsync"))
        print(f"ratio_{phase}_tar_to_python={tar / py:.2f}")
        print(f"ratio_{phase}_tar_to_rsync={tar / rs:.2f}")
        print(f"ratio_{phase}_python_to_rsync={py / rs:.2f}")
