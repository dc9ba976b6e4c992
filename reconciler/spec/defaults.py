"""Defaults of the spec's `sync` limits, which the sync engine applies when used on its own.

What one sync-back may bring at most (`sync.back_max_bytes`, `sync.back_max_files`,
`sync.back_max_refused`): far above what a session's outputs are by accident, low enough that
a hostile sandbox cannot fill the disk, the inode table or our memory. The longest one push or
one sync-back may take (`sync.timeout`), and the longest the sync helper may stay silent, or
not read, while we wait on it (`sync.idle_timeout`).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_BACK_MAX_BYTES",
    "DEFAULT_BACK_MAX_FILES",
    "DEFAULT_BACK_MAX_REFUSED",
    "DEFAULT_IDLE_TIMEOUT_S",
    "DEFAULT_TIMEOUT_S",
]

DEFAULT_BACK_MAX_BYTES = 16 << 30
DEFAULT_BACK_MAX_FILES = 1_000_000
DEFAULT_BACK_MAX_REFUSED = 10_000
DEFAULT_TIMEOUT_S = 3600.0
DEFAULT_IDLE_TIMEOUT_S = 120.0
