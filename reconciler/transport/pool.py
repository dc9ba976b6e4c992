"""Connections into sandboxes kept across passes and rounds, and opened ahead of need."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from reconciler.transport.base import RemoteShell

__all__ = ["ShellPool"]


class ShellPool:
    """Live SSH connections kept across passes and rounds, one per session and instance.

    Also opens connections ahead of need (`prefetch`): the apply loop asks for one as soon as a
    scan sees that a session's tree changed, so the handshake overlaps the rest of the scan and
    the planning. A prefetched connection is only ever a faster way to the same connection the
    executor would open; if it failed, `take` returns None and the executor connects (and
    reports errors) itself.
    """

    def __init__(self) -> None:
        self._shells: dict[str, tuple[str, RemoteShell]] = {}
        self._pending: dict[str, tuple[str, threading.Thread, list[RemoteShell]]] = {}
        self._lock = threading.Lock()

    def prefetch(self, session: str, instance_uuid: str, opener: Callable[[], RemoteShell]) -> None:
        """Start `opener()` in the background unless a connection is kept or on its way."""
        with self._lock:
            if session in self._shells or session in self._pending:
                return
            box: list[RemoteShell] = []

            def open_one() -> None:
                with contextlib.suppress(Exception):  # the executor's own attempt reports it
                    box.append(opener())

            thread = threading.Thread(target=open_one, name=f"prefetch-{session}", daemon=True)
            self._pending[session] = (instance_uuid, thread, box)
        thread.start()

    def _settle(self, session: str) -> None:
        """Wait for a prefetch of `session` and keep what it opened."""
        with self._lock:
            pending = self._pending.pop(session, None)
        if pending is None:
            return
        uuid, thread, box = pending
        thread.join()
        if box:
            self.keep(session, uuid, box[0])

    def take(self, session: str, instance_uuid: str) -> RemoteShell | None:
        """The kept connection if it belongs to this instance and is still alive."""
        self._settle(session)
        with self._lock:
            item = self._shells.pop(session, None)
        if item is None:
            return None
        uuid, shell = item
        if uuid == instance_uuid and getattr(shell, "active", True):
            return shell
        with contextlib.suppress(Exception):
            shell.close()
        return None

    def keep(self, session: str, instance_uuid: str, shell: RemoteShell) -> None:
        with self._lock:
            old = self._shells.pop(session, None)
            self._shells[session] = (instance_uuid, shell)
        if old is not None and old[1] is not shell:
            with contextlib.suppress(Exception):
                old[1].close()

    def drop(self, session: str) -> None:
        self._settle(session)
        with self._lock:
            item = self._shells.pop(session, None)
        if item is not None:
            with contextlib.suppress(Exception):
                item[1].close()

    def close(self) -> None:
        for session in list(self._pending):
            self._settle(session)
        with self._lock:
            items = list(self._shells.values())
            self._shells.clear()
        for _, shell in items:
            with contextlib.suppress(Exception):
                shell.close()
