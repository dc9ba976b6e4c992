"""`instances.json`: where the local metro's instances survive a daemon restart.

Written whole through a temp file and a rename, 0600 (instance env may hold secrets). Saving
on every change would make 1000 creates quadratic, so changes are coalesced: `mark_dirty`
schedules one save a short delay later. The records are encoded on the event loop (a
consistent snapshot) and written in a worker thread: the write's fsync held the whole daemon
(every API request, every byte through the edge, every boot's progress) for its duration,
several times a second while instances change.
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
        write: Callable[[Path, bytes], None] | None = None,
    ) -> None:
        self.path = state_dir / "instances.json"
        self._snapshot = snapshot
        self._save_delay_s = save_delay_s
        # why injectable: a test holds a write in progress to see what the loop does meanwhile
        self._write_file = write or (lambda path, data: write_atomic(path, data, mode=0o600))
        self._dirty = False
        self._saver: asyncio.Task[None] | None = None
        #: the write running in a worker thread, if any (one at a time: one temp file name)
        self._writing: asyncio.Future[None] | None = None

    def load(self) -> list[LocalInstance]:
        """The saved records (none when the file does not exist yet)."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise LocalMetroError(f"instances file {self.path} is unreadable: {exc}") from None
        return [LocalInstance.from_json(item) for item in raw.get("instances", [])]

    def _encode(self) -> bytes:
        self._dirty = False
        data = {"instances": [r.to_json() for r in self._snapshot()]}
        return json.dumps(data).encode()

    def save_now(self) -> None:
        self._write_file(self.path, self._encode())

    def mark_dirty(self) -> None:
        """Save soon (must be called on the event loop)."""
        self._dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        while True:
            await asyncio.sleep(self._save_delay_s)
            if not self._dirty:
                return
            self._writing = asyncio.ensure_future(
                asyncio.to_thread(self._write_file, self.path, self._encode())
            )
            # why shielded: `close` cancels this task but must wait for the write itself
            await asyncio.shield(self._writing)
            # why a loop: changes made while the write ran are saved by the next round

    async def close(self) -> None:
        """Cancel a pending delayed save, wait for a write in progress, and write the current
        records now."""
        saver, self._saver = self._saver, None
        if saver is not None and not saver.done():
            saver.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await saver
        writing, self._writing = self._writing, None
        if writing is not None:
            # why: an older write landing after the one below would lose the newest records
            with contextlib.suppress(OSError):
                await writing
        self.save_now()
