"""Suite-wide settings.

In CI, Hypothesis runs derandomized (the same examples every run) and without per-example
deadlines: a property that fails must fail on every run of the same commit, not by luck on a
busy 2-core machine. Locally it explores new examples each run; a failure found there is kept
in `.hypothesis/` and should become a named regression test.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None)
if os.environ.get("CI"):
    settings.load_profile("ci")
