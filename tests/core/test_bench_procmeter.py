"""The benches' CPU meter: what a process tree used, each process counted once."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from procmeter import run_measured

_BURN = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5: pass\n"


def _waits_for(code: str, then: str = "") -> str:
    """Python that runs `code` in a child, waits for it, then runs `then`."""
    return f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {code!r}]){then}"


def test_a_child_its_parent_waits_for_is_counted_once_not_also_from_its_samples() -> None:
    # the parent's wait4 figure holds the reaped child; the meter also sampled the child
    # while it ran, and used to add both (1.09 s here)
    m = run_measured([sys.executable, "-c", _waits_for(_BURN)])
    assert 0.45 <= m.cpu_s < 0.85, m.cpu_s


def test_a_grandchild_reaped_by_a_sampled_child_is_counted_once() -> None:
    # the middle process's cutime holds the grandchild once it is reaped (was 1.65 s)
    m = run_measured([sys.executable, "-c", _waits_for(_waits_for(_BURN), "; time.sleep(0.2)")])
    assert 0.45 <= m.cpu_s < 0.9, m.cpu_s
