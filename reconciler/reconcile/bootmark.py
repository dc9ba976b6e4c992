"""Whether a sandbox still runs the boot ukc last worked on, seen from inside it.

On UKC, `/workspace` (without a volume) and the rest of the root filesystem live in the
instance's memory: a cold boot (stop/start, a restart by policy, a stateless wake) starts from
the image, a stateful standby wake restores memory. ukc counts boots with the platform's
`start_count`, but whether a stateful wake moves that counter is not documented; if it does,
trusting it would make every idle period look like a cold boot (a full re-sync, every command
run again, and the host key learnt anew).

So the executor leaves a boot marker in the sandbox's memory (`MARK_PATH`, a random token
recorded with the instance) on its first connection of a boot, and the observer reads it back
only when the platform shows another `start_count` than the record (no extra round trip in
the common case). An intact marker proves that memory (and with it `/workspace` and the host
key) was kept: the record is carried over to the new count and the planner sees the same
boot. A missing or different marker, a sandbox that cannot be reached, or one presenting
another host key, leaves the record as it is: the planner sees a cold boot.

The marker is written and read with POSIX sh only (no python3 in the image is needed). A
sandbox can forge it, but only to its own harm: it owns /workspace anyway.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import threading
from collections.abc import Sequence

from reconciler import errors
from reconciler._util.fanout import those_where
from reconciler.cloud.metros import MetroRegistry
from reconciler.cloud.model import Instance
from reconciler.reconcile import rebuild
from reconciler.reconcile.events import Event, Reporter
from reconciler.reconcile.observe import Observation
from reconciler.status.schema import SessionStatus, StatusDoc
from reconciler.transport.base import Transport
from reconciler.transport.pool import TransportPool

__all__ = [
    "MARK_PATH",
    "carry_over",
    "check",
    "leave_mark",
    "mark_command",
    "new_token",
    "read_mark",
    "worth_checking",
]

#: in the root filesystem, which lives in memory like /workspace: a cold boot starts
#: without it, a stateful wake keeps it (and, unlike /workspace, no volume outlives a boot)
MARK_PATH = "/tmp/.ukc-boot"
_TOKEN = re.compile(r"^[0-9a-f]{32}$")
_MAX_ANSWER = 128
_UP = frozenset({"running", "standby"})


def new_token() -> str:
    return secrets.token_hex(16)


def mark_command(token: str, path: str = MARK_PATH) -> str:
    """The shell text that writes `token` as the sandbox's boot marker.

    Why in place, with the shell's own `printf` (no temp file and `mv`): a marker cut short
    or read while it is written is not a whole token, which reads as no marker (a cold boot,
    the safe side), and the sandbox runs one program fewer on every new boot.
    """
    if not _TOKEN.match(token):
        raise ValueError("a boot marker token is 32 lowercase hex digits")
    return f"printf '%s\\n' {token} > {shlex.quote(path)}"


def leave_mark(transport: Transport, token: str, path: str = MARK_PATH) -> None:
    """Write `token` as the sandbox's boot marker, on a channel of its own (a new boot's first
    push carries it on its helper's instead: `Executor._connect`)."""
    rebuild.exchange(transport, mark_command(token, path), None, limit=_MAX_ANSWER)


def read_mark(transport: Transport, path: str = MARK_PATH) -> str:
    """The sandbox's boot marker ("" when there is none); what the sandbox says is bounded."""
    data = rebuild.exchange(
        transport, f"cat {shlex.quote(path)} 2>/dev/null; true", None, limit=_MAX_ANSWER
    )
    found = data.decode("ascii", errors="replace").strip()
    return found if _TOKEN.match(found) else ""


def worth_checking(obs: Observation, doc: StatusDoc, done: set[str]) -> list[str]:
    """The sessions whose instance shows another `start_count` than the boot their record
    marked (not yet checked in this run)."""
    names = []
    for name, ctx in obs.contexts.items():
        if name in done or name in obs.halted:
            continue
        inst = obs.instances.get(ctx.desired.instance_name)
        rec = doc.sessions.get(name)
        known = rec.instance if rec is not None else None
        if inst is None or known is None or inst.state not in _UP:
            continue
        if (
            known.uuid == inst.uuid
            and known.boot_mark
            and known.start_count is not None
            and inst.start_count is not None
            and known.start_count != inst.start_count
        ):
            names.append(name)
    return names


def carry_over(rec: SessionStatus, inst: Instance) -> None:
    """Move what the record holds of the marked boot onto `inst`'s count: the same boot."""
    assert rec.instance is not None
    old = rec.instance.start_count
    rec.instance.start_count = inst.start_count
    if rec.sync.instance_uuid == inst.uuid and rec.sync.start_count == old:
        rec.sync.start_count = inst.start_count
    for cmd in rec.commands:
        if cmd.instance_uuid == inst.uuid and cmd.start_count == old:
            cmd.start_count = inst.start_count


def check(
    names: Sequence[str],
    *,
    obs: Observation,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    reporter: Reporter,
    concurrency: int = 8,
) -> list[str]:
    """Read the boot marker of `names`' sandboxes (up to `concurrency` at once); carry each
    record whose marker is intact over to the observed count. The sessions carried over.
    A connection that read an intact marker stays in `pool`."""
    lock = threading.Lock()

    def one(name: str) -> bool:
        return _check_one(name, obs=obs, doc=doc, metros=metros, pool=pool, reporter=reporter,
                          lock=lock)  # fmt: skip

    return those_where(names, one, concurrency=concurrency, name="ukc-bootmark")


def _check_one(
    name: str,
    *,
    obs: Observation,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    reporter: Reporter,
    lock: threading.Lock,
) -> bool:
    ctx = obs.contexts[name]
    inst = obs.instances[ctx.desired.instance_name]
    with lock:
        rec = doc.sessions[name]
        known = rec.instance
    assert known is not None
    moved = f"start count {known.start_count} -> {inst.start_count}"
    transport = pool.take(name, inst.uuid)
    try:
        if transport is None:
            # held to the recorded pin: a sandbox with another host key is not the same boot
            transport = rebuild.connect(ctx, inst, known, metros)
        found = read_mark(transport)
    except errors.UkcError as err:
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        reporter.event(Event(name, "info", f"{moved}; boot marker not read ({err}): a cold boot"))
        return False
    if found != known.boot_mark:
        with contextlib.suppress(Exception):
            transport.close()
        reporter.event(Event(name, "info", f"{moved}; boot marker gone: a cold boot"))
        return False
    pool.keep(name, inst.uuid, transport)
    with lock:
        carry_over(rec, inst)
    reporter.event(
        Event(name, "info", f"{moved}; boot marker intact: a stateful wake, /workspace kept")
    )
    return True
