"""A lease per project and metro: two runners (CI pipelines) never act on one project at once.

The platform has no lock API, but it guarantees that instance names are unique. So the lease
is an instance: `ukc-lease-<project>`, created stopped with a session's image (it never
boots: no sandbox, no running cost), tagged with who holds it (`ukc.holder`) until when
(`ukc.expires`, unix seconds) and the owner id (`ukc.owner`). Whoever creates it holds it; a
runner that finds it taken waits
for it (`--lock-timeout`) or fails at once naming the holder and the expiry. The holder
renews it every `RENEW_S` (its tags get a new expiry) and, when done, marks it expired and
deletes it by uuid (not waiting for the name: the next runner waits for it).
A lease whose holder died expires after `TTL_S` and is then taken over: deleted by its uuid
(so a lease a third runner made meanwhile is never the one deleted) and created anew. A lease
of another owner (no proof it is ours) is never deleted: the runner fails naming it.

A holder that cannot renew before its lease expires has lost it: `on_lost` is called (apply
then stops as on Ctrl-C: no new action starts).

Only with `UKC_PROJECT` (checkouts that share a project across machines; one checkout is
already serialised by the status file's lock). Expiries compare the runners' clocks: they
must agree to well within `TTL_S - RENEW_S`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from reconciler import errors
from reconciler.cloud.model import CloudApi, CreateRequest, Instance
from reconciler.reconcile import identity

__all__ = ["RENEW_S", "TTL_S", "Lease", "holder_id", "lease_name"]

TTL_S = 120.0
RENEW_S = 40.0
#: a released lease's name stays taken while the platform deletes it (a release does not wait
#: for it): a runner polls this often, up to this long, whatever its lock timeout
NAME_POLL_S = 0.1
NAME_WAIT_S = 60.0
LEASE_TAG = "ukc.lease"
HOLDER_TAG = "ukc.holder"
EXPIRES_TAG = "ukc.expires"
_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9\-+_.:]")


def lease_name(project: str) -> str:
    return f"ukc-lease-{project}"


def holder_id() -> str:
    """This run, for the loser's message: host, pid and a random part (tag characters only)."""
    host = _TAG_UNSAFE.sub("-", socket.gethostname())[:64] or "host"
    return f"{host}:pid{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Lease:
    """The lease of `project` on one metro (`api`)."""

    api: CloudApi
    project: str
    owner: identity.Owner
    image: str
    holder: str = field(default_factory=holder_id)
    ttl_s: float = TTL_S
    renew_s: float = RENEW_S
    #: what the lease's expiry is judged by (unix seconds: runners compare them)
    clock: Callable[[], float] = time.time
    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    poll_s: float = 1.0
    #: told once when this runner starts waiting, and when it takes an expired lease over
    on_wait: Callable[[str], None] = lambda _text: None
    #: told when renewing failed until the lease expired (the caller stops acting)
    on_lost: Callable[[str], None] = lambda _text: None
    uuid: str = ""
    expires: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _renewer: threading.Thread | None = None

    @property
    def name(self) -> str:
        return lease_name(self.project)

    def _tags(self, expires: float) -> list[str]:
        return [
            f"{LEASE_TAG}={self.project}",
            f"{HOLDER_TAG}={self.holder}",
            f"{EXPIRES_TAG}={int(expires)}",
            f"{identity.OWNER_KEY}={self.owner.id}",
        ]

    # -- taking it -------------------------------------------------------------------------

    def acquire(self, timeout_s: float = 0.0) -> None:
        deadline = self.monotonic() + timeout_s
        freed_by = self.monotonic() + NAME_WAIT_S
        waiting = False
        while True:
            expires = self.clock() + self.ttl_s
            request = CreateRequest(
                name=self.name,
                image=self.image,
                env={},
                tags=self._tags(expires),
                # why no memory_mb: it never runs, and the platform's smallest size is a
                # quota setting; its default always fits
                autostart=False,
            )
            try:
                made = self.api.create_instance(request)
            except errors.AlreadyExistsError:
                made = None
            if made is not None:
                self.uuid, self.expires = made.uuid, expires
                return
            found = self.api.get_instance(self.name)
            if found is None:
                # released (or taken over) between our create and our look, or the name is
                # held by a released lease the platform is still deleting: nobody holds it
                if self.monotonic() >= freed_by:
                    raise errors.LockedError(
                        f"lease instance {self.name} on metro {self.api.metro}: the name is "
                        f"still taken by a deleted lease after {NAME_WAIT_S:.0f}s"
                    )
                self.sleep(NAME_POLL_S)
                continue
            if _value(found.tags, HOLDER_TAG) == self.holder:
                # our own create, whose answer was lost and retried
                self.uuid, self.expires = found.uuid, expires
                return
            holder, until = self._describe(found)
            if not self._ours(found):
                raise errors.LockedError(
                    f"lease instance {found.name} (uuid {found.uuid}) on metro "
                    f"{self.api.metro} is not this project's ({until}, holder {holder}; its "
                    f"{identity.OWNER_KEY} tag is another owner's): another checkout without "
                    f"this {identity.SECRET_VAR} applies project {self.project}; delete it "
                    "yourself if it is abandoned"
                )
            stamp = _expiry(found.tags)
            # why a lease of ours without an expiry counts as expired: none of ours lacks one
            if stamp is None or stamp <= self.clock():
                self.on_wait(f"taking over the expired lease of {holder} ({until})")
                with contextlib.suppress(errors.NotFoundError):
                    self.api.delete_instance(found.name, uuid=found.uuid)
                continue
            if self.monotonic() >= deadline:
                raise errors.LockedError(
                    f"project {self.project} is being applied by {holder} (lease instance "
                    f"{found.name} on metro {self.api.metro}, {until}); wait for it or pass "
                    "--lock-timeout SECONDS"
                )
            if not waiting:
                waiting = True
                self.on_wait(f"waiting for {holder} to finish applying ({until})")
            self.sleep(max(0.0, min(self.poll_s, deadline - self.monotonic())))

    def _ours(self, inst: Instance) -> bool:
        values = identity.owner_values(inst.tags)
        return bool(values) and all(v in self.owner.accepted for v in values)

    def _describe(self, inst: Instance) -> tuple[str, str]:
        holder = _value(inst.tags, HOLDER_TAG) or "an unknown holder"
        stamp = _expiry(inst.tags)
        if stamp is None:
            return holder, "no expiry"
        left = stamp - self.clock()
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(stamp))
        return holder, (
            f"expires {when}, in {left:.0f}s" if left > 0 else f"expired {when}, {-left:.0f}s ago"
        )

    # -- keeping it ------------------------------------------------------------------------

    def renew(self) -> None:
        expires = self.clock() + self.ttl_s
        self.api.set_tags(self.name, uuid=self.uuid, tags=self._tags(expires))
        self.expires = expires

    def _keep(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                self.renew()
            except errors.NotFoundError:
                self.on_lost(f"lease {self.name} was taken over (this run paused too long)")
                return
            except errors.UkcError as err:
                if self.clock() >= self.expires:
                    self.on_lost(f"lease {self.name} expired: it could not be renewed ({err})")
                    return

    def release(self) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=5.0)
        if self.uuid:
            with contextlib.suppress(errors.UkcError):
                # why expired first: the delete does not wait for the name, and a platform may
                # read a lease being deleted as still there; an expired one is taken over
                self.api.set_tags(self.name, uuid=self.uuid, tags=self._tags(0.0))
            with contextlib.suppress(errors.UkcError):
                self.api.delete_instance(self.name, uuid=self.uuid, wait=False)
            self.uuid = ""

    def __enter__(self) -> Lease:
        self._renewer = threading.Thread(target=self._keep, name="ukc-lease", daemon=True)
        self._renewer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _value(tags: Sequence[str], key: str) -> str | None:
    return identity.tag_value(tags, key)


def _expiry(tags: Sequence[str]) -> float | None:
    raw = _value(tags, EXPIRES_TAG)
    return float(raw) if raw is not None and raw.isdigit() else None
