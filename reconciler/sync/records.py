"""Small JSON records kept in the controller's per-session sync state dir, and the names of
all of them.

The index, the push record and the pull record are journals (`journal`, `pullrecord`).
Writes are atomic (`_util.atomic`: temp file in the same directory, fsync, rename) so a crash
leaves either the old record or the new one, never a torn file, and a killed writer's temp
file is swept by the next write.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from reconciler._util.atomic import write_atomic

__all__ = ["INDEX", "PUSH_RECORD", "TOOLS", "drop_legacy", "read_record", "write_record"]

PUSH_RECORD = "push.jnl"
INDEX = "index.jnl"
#: which sync path the session's instance takes (`capability`)
TOOLS = "tools.json"
#: the whole-manifest records the journals replaced
_LEGACY = ("push.json", "hashcache.json")


def drop_legacy(state_dir: Path) -> None:
    """Remove records of an older ukc that nothing reads any more (12 MB each at 100k files)."""
    for name in _LEGACY:
        with contextlib.suppress(OSError):
            (Path(state_dir) / name).unlink()


def read_record(state_dir: Path, name: str) -> dict[str, Any] | None:
    """The record, or None when it is missing or unreadable (treated as no record)."""
    try:
        with open(Path(state_dir) / name, encoding="utf-8") as f:
            data = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def write_record(state_dir: Path, name: str, data: dict[str, Any], *, durable: bool = True) -> None:
    """Write `data` as `state_dir/name` atomically (0600: records name user files).

    `durable=False` skips the fsync, for caches whose loss only costs time (a torn or empty
    file reads as "no record").
    """
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, separators=(",", ":"))
    write_atomic(state_dir / name, text.encode("utf-8", "surrogateescape"), durable=durable)
