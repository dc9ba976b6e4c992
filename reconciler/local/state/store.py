"""`instances.json`: where the local metro's instances survive a daemon restart.

Written whole through a temp file and a rename, 0600 (instance env may hold secrets). Saving
on every change would make 1000 creates quadratic, so changes are coalesced: `mark_dirty`
schedules one save a short delay later.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

from reconciler._util.atomic import write_atomic
from reconciler.errors import LocalMetroError
from reconciler.local.state.records import LocalInstance

__all__ = ["InstanceStore"]


class InstanceStore:
    """Loads and saves the instance records of one state dir."""

    def __init__(
        self,
        state_dir: Path,
        snapshot: Callable[[], Iterable[LocalInstance]],
        *,
        save_delay_s: float = 0.2,
    ) -> None:
        self.path = state_dir / "instances.json"
        self._snapshot = snapshot
        self._save_delay_s = save_delay_s
        self._dirty = False
        self._saver: asyncio.Task[None] | None = None

    def load(self) -> list[LocalInstance]:
        """The saved records (none when the file does not exist yet)."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise LocalMetroError(f"instances file {self.path} is unreadable: {exc}") from None
        return [LocalInstance.from_json(item) for item in raw.get("instances", [])]

    def save_now(self) -> None:
        self._dirty = False
        data = {"instances": [r.to_json() for r in self._snapshot()]}
        write_atomic(self.path, json.dumps(data).encode(), mode=0o600)

    def mark_dirty(self) -> None:
        """Save soon (must be called on the event loop)."""
        self._dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        await asyncio.sleep(self._save_delay_s)
        if self._dirty:
            self.save_now()

    async def close(self) -> None:
        """Cancel a pending delayed save and write the current records now."""
        saver, self._saver = self._saver, None
        if saver is not None and not saver.done():
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
        self.save_now()
