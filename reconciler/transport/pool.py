"""Connections into sandboxes kept across passes and rounds, and opened ahead of need."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

from reconciler.transport import links
from reconciler.transport.base import Transport
from reconciler.transport.links import LinkKey

__all__ = ["TransportPool"]


class TransportPool:
    """Live connections kept across passes and rounds, one per session and instance.

    Also opens connections ahead of need (`prefetch`): the apply loop asks for one as soon as a
    scan sees that a session's tree changed, so the handshake overlaps the rest of the scan and
    the planning. A prefetched connection is only ever a faster way to the same connection the
    executor would open; if it failed, `take` returns None and the executor connects (and
    reports errors) itself.

    In a command forked by the warm process, what is kept with its `LinkKey` when the pool
    closes is not closed but kept for the next command (`transport.links`); `drop` closes
    (a borrowed connection is then given up by its lender too).
    """

    def __init__(self) -> None:
        self._kept: dict[str, tuple[str, Transport]] = {}
        self._links: dict[str, LinkKey] = {}
        self._pending: dict[str, tuple[str, threading.Thread, list[Transport]]] = {}
        self._lock = threading.Lock()

    def prefetch(
        self,
        session: str,
        instance_uuid: str,
        opener: Callable[[], Transport],
        link: LinkKey | None = None,
    ) -> None:
        """Start `opener()` in the background unless a connection is kept or on its way."""
        with self._lock:
            if session in self._kept or session in self._pending:
                return
            box: list[Transport] = []

            def open_one() -> None:
                with contextlib.suppress(Exception):  # the executor's own attempt reports it
                    box.append(opener())

            thread = threading.Thread(target=open_one, name=f"prefetch-{session}", daemon=True)
            # started before another thread can see it pending: a `take` that pops it
            # between the two would join a thread not yet started (RuntimeError: seen as an
            # "internal error" of `ukc apply` under load)
            thread.start()
            self._pending[session] = (instance_uuid, thread, box)
            if link is not None:
                self._links[session] = link

    def _settle(self, session: str) -> None:
        """Wait for a prefetch of `session` and keep what it opened."""
        with self._lock:
            pending = self._pending.pop(session, None)
        if pending is None:
            return
        uuid, thread, box = pending
        thread.join()
        if box:
            with self._lock:
                link = self._links.get(session)
            self.keep(session, uuid, box[0], link)

    def take(self, session: str, instance_uuid: str) -> Transport | None:
        """The kept connection if it belongs to this instance and is still alive."""
        self._settle(session)
        with self._lock:
            item = self._kept.pop(session, None)
        if item is None:
            return None
        uuid, transport = item
        if uuid == instance_uuid and transport.active:
            return transport
        with self._lock:
            self._links.pop(session, None)
        with contextlib.suppress(Exception):
            transport.close()
        return None

    def peek(self, session: str) -> tuple[str, Transport] | None:
        """The kept connection of `session` and its instance, left in the pool (a prefetch
        still on its way is not waited for)."""
        with self._lock:
            return self._kept.get(session)

    def keep(
        self,
        session: str,
        instance_uuid: str,
        transport: Transport,
        link: LinkKey | None = None,
    ) -> None:
        """Keep `transport`; with `link`, what makes it the same connection for a later
        command (`links.LinkKey`)."""
        with self._lock:
            old = self._kept.pop(session, None)
            self._kept[session] = (instance_uuid, transport)
            if link is not None and link.uuid == instance_uuid:
                self._links[session] = link
            else:
                self._links.pop(session, None)
        if old is not None and old[1] is not transport:
            with contextlib.suppress(Exception):
                old[1].close()

    def drop(self, session: str) -> None:
        self._settle(session)
        with self._lock:
            item = self._kept.pop(session, None)
            self._links.pop(session, None)
        if item is not None:
            with contextlib.suppress(Exception):
                item[1].close()

    def close(self) -> None:
        for session in list(self._pending):
            self._settle(session)
        with self._lock:
            items = [(t, self._links.get(s)) for s, (_, t) in self._kept.items()]
            self._kept.clear()
            self._links.clear()
        for transport, link in items:
            with contextlib.suppress(Exception):
                if link is not None and links.hand_over(transport, link):
                    continue
                transport.close()
