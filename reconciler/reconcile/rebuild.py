"""A runner's status rebuilt from the cloud and the sandbox, and the journal left there.

With `UKC_SESSION_SECRET`, every runner that acts in a sandbox leaves the session's record
there (`status.sandboxjournal`, sealed with a key derived from the secret). Before a runner
acts on its own record, it reads that journal when its record may be behind: it has none for
the observed instance (a fresh clone, a CI runner), or its plan has work to do in the sandbox
(another runner may have done it already). A journal newer than the local record replaces it,
and the session is planned again from it. No-op applies read nothing: they open no
connection.

A journal is removed before the first change a runner makes in the sandbox (a push or a
command) and written again after its last: a run killed half-way leaves no journal, and the
next runner redoes the work rather than trusting a record of a tree that is no longer there.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

from reconciler import errors
from reconciler._util.fanout import those_where
from reconciler.cloud.metros import MetroRegistry
from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, identity, sessionkeys
from reconciler.reconcile.desired import SessionContext, target_for
from reconciler.reconcile.events import Event, Reporter
from reconciler.reconcile.observe import Observation
from reconciler.reconcile.wake import wake
from reconciler.status import sandboxjournal
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from reconciler.transport import select
from reconciler.transport.base import Transport
from reconciler.transport.pool import TransportPool

__all__ = ["clear_journal", "connect", "consult", "exchange", "leave_journal", "worth_reading"]

#: the longest one journal read or write may take (the sandbox may stall it)
EXCHANGE_TIMEOUT_S = 30.0
#: how long a sandbox may take to accept the connection a journal read needs
CONNECT_TIMEOUT_S = 60.0
_UP = frozenset({"running", "standby"})
_SANDBOX_WORK = (actions.SyncUp, actions.RunCommand, actions.SyncBack)
_NEW_INSTANCE = (actions.CreateInstance, actions.DeleteInstance, actions.StartInstance)


def worth_reading(
    plan: actions.Plan, obs: Observation, doc: StatusDoc, done: set[str]
) -> list[str]:
    """The sessions whose journal may change the plan (not yet read in this run)."""
    if obs.owner.key_root is None:
        return []
    names = []
    for splan in plan.sessions:
        name = splan.session
        ctx = obs.contexts.get(name)
        if name in done or ctx is None or splan.refusal is not None:
            continue
        inst = obs.instances.get(ctx.desired.instance_name)
        if inst is None or inst.state not in _UP or sessionkeys.nonce_of(inst.tags) is None:
            continue
        if any(isinstance(a, _NEW_INSTANCE) for a in splan.actions):
            continue  # a new or restarted sandbox: what ran in the old one does not count
        rec = doc.sessions.get(name)
        behind = rec is None or rec.instance is None or rec.instance.uuid != inst.uuid
        if behind or any(isinstance(a, _SANDBOX_WORK) for a in splan.actions):
            names.append(name)
    return names


def consult(
    names: Sequence[str],
    *,
    obs: Observation,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    reporter: Reporter,
    concurrency: int = 8,
) -> list[str]:
    """Read the journals of `names` (up to `concurrency` at once); put each one newer than the
    local record into `doc`. The sessions whose record was replaced (plan them again).
    Connections stay in `pool`."""
    lock = threading.Lock()

    def one(name: str) -> bool:
        return _consult_one(
            name, obs=obs, doc=doc, metros=metros, pool=pool, reporter=reporter, lock=lock
        )

    return those_where(names, one, concurrency=concurrency, name="ukc-journal")


def _consult_one(
    name: str,
    *,
    obs: Observation,
    doc: StatusDoc,
    metros: MetroRegistry,
    pool: TransportPool,
    reporter: Reporter,
    lock: threading.Lock,
) -> bool:
    key_root = obs.owner.key_root
    assert key_root is not None
    key = sandboxjournal.journal_key(key_root)
    ctx = obs.contexts[name]
    inst = obs.instances[ctx.desired.instance_name]
    with lock:
        rec = doc.sessions.get(name)
    known = rec.instance if rec is not None else None
    transport = pool.take(name, inst.uuid)
    try:
        if transport is None:
            woken = wake(metros.get(ctx.desired.metro).api, inst)
            if woken is not inst:
                # the plan made next sees the instance as it runs now (its `start_count`)
                with lock:
                    obs.woke(name, woken)
                inst = woken
            transport = connect(ctx, inst, known, metros)
        data = exchange(
            transport,
            f"cat {sandboxjournal.JOURNAL_PATH} 2>/dev/null; true",
            None,
            limit=sandboxjournal.MAX_JOURNAL_BYTES,
        )
    except errors.UkcError as err:
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        reporter.event(Event(name, "info", f"journal not read: {err}"))
        return False
    binding = sandboxjournal.Binding(obs.owner.project, name, inst.uuid)
    found, why = sandboxjournal.decode(key, binding, data) if data else (None, "")
    if found is None:
        if why:
            reporter.event(Event(name, "info", f"journal in the sandbox ignored: {why}"))
        pool.keep(name, inst.uuid, transport)
        return False
    ours = rec is not None and known is not None and known.uuid == inst.uuid
    if ours and rec is not None and found.journal_seq <= rec.journal_seq:
        pool.keep(name, inst.uuid, transport)
        return False
    pinned = found.instance.pin if found.instance is not None else None
    if pinned and pinned != transport.pin:
        # The sealed record names the sandbox's identity: a connection that saw another one
        # is not kept, and the executor's own connection is held to the record's pin.
        with contextlib.suppress(Exception):
            transport.close()
        reporter.event(
            Event(
                name,
                "info",
                f"the sandbox presented host key {transport.pin}, its journal records "
                f"{pinned}: that connection is not used",
            )
        )
    else:
        if found.instance is not None:
            found.instance.pin = transport.pin
        pool.keep(name, inst.uuid, transport)
    with lock:
        doc.sessions[name] = found
    reporter.event(Event(name, "info", "status rebuilt from the sandbox's journal"))
    return True


def connect(
    ctx: SessionContext, inst: Instance, known: InstanceRecord | None, metros: MetroRegistry
) -> Transport:
    """A connection to `inst`'s sandbox for a read before planning, held to the pin this
    checkout recorded for that instance (a new identity is not learnt here). An instance in
    standby is woken first (a suspended one may not wake on traffic)."""
    kind = select.kind_for(identity.instance_transport(inst, ctx.desired.transport))
    conn = metros.get(ctx.desired.metro)
    inst = wake(conn.api, inst)
    return kind.connect(
        target_for(inst, conn),
        ctx.credentials,
        pin=identity.recorded_pin(known, inst),
        deadline_s=CONNECT_TIMEOUT_S,
    )


def leave_journal(
    transport: Transport, key_root: bytes, binding: sandboxjournal.Binding, record: SessionStatus
) -> None:
    """Write `record` (its `journal_seq` already advanced) as the sandbox's journal."""
    data = sandboxjournal.encode(sandboxjournal.journal_key(key_root), binding, record)
    where = sandboxjournal.JOURNAL_DIR
    exchange(
        transport,
        f"mkdir -p {where} && cat > {where}/.journal.tmp && "
        f"mv -f {where}/.journal.tmp {sandboxjournal.JOURNAL_PATH}",
        data,
        limit=4096,
    )


def clear_journal(transport: Transport) -> None:
    """Remove the journal before the sandbox changes (see the module's docstring)."""
    exchange(transport, f"rm -f {sandboxjournal.JOURNAL_PATH}", None, limit=4096)


def exchange(
    transport: Transport,
    command: str,
    data: bytes | None,
    *,
    limit: int,
    timeout_s: float = EXCHANGE_TIMEOUT_S,
) -> bytes:
    """Run `command`, feed it `data`, read at most `limit` bytes of its output; a sandbox that
    stalls it is cut off at `timeout_s`, one that says more than `limit` at once."""
    proc = transport.start(command)
    fired = threading.Event()

    def cut() -> None:
        fired.set()
        proc.kill()

    cutoff = threading.Timer(timeout_s, cut)
    cutoff.daemon = True
    cutoff.start()
    stalled = errors.RemoteError(f"the sandbox did not answer within {timeout_s:g}s")
    out = bytearray()
    try:
        if data is not None:
            proc.write(data)
        proc.close_stdin()
        while chunk := proc.read(65536):
            out += chunk
            if len(out) > limit:
                proc.kill()
                raise errors.RemoteError(f"the sandbox answered more than {limit} bytes")
        code = proc.wait(timeout_s)
    except TimeoutError:
        proc.kill()
        raise stalled from None
    except (errors.UkcError, OSError, EOFError) as err:
        if fired.is_set():
            raise stalled from None
        if isinstance(err, errors.UkcError):
            raise
        raise errors.RemoteError(f"the exchange broke ({type(err).__name__})") from None
    finally:
        cutoff.cancel()
    if fired.is_set():
        raise stalled
    if code != 0:
        raise errors.RemoteError(f"the command exited {code}")
    return bytes(out)
