#!/usr/bin/env python3
"""Run one `ukc` command in this process under cProfile, in every thread, for call counts.

    UKC_WARM=0 .venv/bin/python bench/cprofile_all.py OUT.prof -- apply s.yaml

`python -m cProfile` sees only the main thread, and ukc does its sessions' work in a thread
pool (and watch passes, prefetched connections, the TLS bridge in threads of their own). Here
every thread gets its own `cProfile.Profile` the moment it starts (`threading.setprofile`);
at exit they are merged into OUT.prof (pstats: counts and times per function, summed over
threads) and the top functions by cumulative time are printed to stderr. Deterministic
profiling slows Python-heavy code several times over: use it for counts ("status.save: 152
calls"), and py-spy (`profile_bench.py`) for shares of time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import threading
from pathlib import Path
from typing import Any

PROFILES: list[cProfile.Profile] = []
_LOCK = threading.Lock()


def _start_in_thread(frame: Any, event: str, arg: Any) -> None:
    prof = cProfile.Profile()
    with _LOCK:
        PROFILES.append(prof)
    prof.enable()  # replaces this bootstrap hook for the rest of the thread


def dump(out: Path, top: int = 40) -> None:
    for prof in PROFILES:
        prof.disable()
    stats = pstats.Stats(PROFILES[0])
    for prof in PROFILES[1:]:
        try:
            stats.add(prof)
        except TypeError:
            continue  # a thread that never ran a profiled call
    stats.dump_stats(str(out))
    buf = io.StringIO()
    pstats.Stats(str(out), stream=buf).sort_stats("cumulative").print_stats(top)
    sys.stderr.write(buf.getvalue())


def main() -> None:
    if len(sys.argv) < 3 or sys.argv[2] != "--":
        raise SystemExit(__doc__)
    out = Path(sys.argv[1])
    args = sys.argv[3:]
    from reconciler.cli.main import main as cli_main

    threading.setprofile(_start_in_thread)
    main_prof = cProfile.Profile()
    PROFILES.append(main_prof)
    main_prof.enable()
    code: Any = 0
    try:
        cli_main(args)
    except SystemExit as done:
        code = done.code
    finally:
        threading.setprofile(None)  # type: ignore[arg-type]
        dump(out)
    sys.exit(code)


if __name__ == "__main__":
    main()
