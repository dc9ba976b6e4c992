"""Which journals a runner reads, and what it takes from one (small fakes, no metro)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

from reconciler.cloud.model import Instance
from reconciler.reconcile import actions, identity, rebuild, sessionkeys
from reconciler.reconcile.events import RecordingReporter
from reconciler.status import sandboxjournal
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from reconciler.transport.pool import TransportPool
from tests.support.planning import PROJECT, desired, instance

ROOT = sessionkeys.key_root("0123456789abcdef-secret", PROJECT)
OWNER = identity.Owner(PROJECT, "1" * 32, frozenset({"1" * 32}), "secret", key_root=ROOT)
NONCE = "ab" * 16


class _Proc:
    def __init__(self, out: bytes) -> None:
        self.out = [out] if out else []

    def write(self, data: bytes) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    def read(self, n: int = 65536) -> bytes:
        return self.out.pop(0) if self.out else b""

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        pass


class _Transport:
    """A connection to a sandbox whose journal file holds `journal` and whose host key is
    `pin`."""

    kind = "ssh"

    def __init__(self, journal: bytes, pin: str) -> None:
        self.journal = journal
        self.pin = pin
        self.active = True
        self.closed = False

    def start(self, command: str) -> _Proc:
        return _Proc(self.journal if command.startswith("cat ") else b"")

    def close(self) -> None:
        self.closed = True
        self.active = False


def world(inst: Instance, owner: identity.Owner = OWNER) -> Any:
    d = desired()
    ctx = SimpleNamespace(desired=d, credentials=None)
    return SimpleNamespace(owner=owner, contexts={d.name: ctx}, instances={inst.name: inst})


def tagged(**overrides: object) -> Instance:
    d = desired()
    return instance(d, tags=(*d.tags, sessionkeys.key_tag(NONCE)), **overrides)


def sealed(inst: Instance, record: SessionStatus) -> bytes:
    binding = sandboxjournal.Binding(PROJECT, "hello", inst.uuid)
    return sandboxjournal.encode(sandboxjournal.journal_key(ROOT), binding, record)


def written_by_another_runner(inst: Instance, pin: str, seq: int = 3) -> SessionStatus:
    return SessionStatus(
        phase="Ready",
        instance=InstanceRecord(name=inst.name, uuid=inst.uuid, pin=pin),
        journal_seq=seq,
    )


def consult(inst: Instance, doc: StatusDoc, conn: _Transport) -> tuple[list[str], TransportPool]:
    pool = TransportPool()
    pool.keep("hello", inst.uuid, conn)  # type: ignore[arg-type]
    got = rebuild.consult(
        ["hello"],
        obs=world(inst),
        doc=doc,
        metros=None,  # type: ignore[arg-type]
        pool=pool,
        reporter=RecordingReporter(),
    )
    return got, pool


def test_a_fresh_runner_takes_the_sealed_record_and_keeps_the_connection() -> None:
    inst = tagged()
    conn = _Transport(sealed(inst, written_by_another_runner(inst, "SHA256:real")), "SHA256:real")
    doc = StatusDoc()
    replaced, pool = consult(inst, doc, conn)
    assert replaced == ["hello"] and doc.sessions["hello"].journal_seq == 3
    assert pool.take("hello", inst.uuid) is conn


def test_a_sandbox_presenting_another_host_key_than_the_sealed_record_is_not_trusted() -> None:
    inst = tagged()
    journal = sealed(inst, written_by_another_runner(inst, "SHA256:real"))
    conn = _Transport(journal, "SHA256:impostor")
    doc = StatusDoc()
    consult(inst, doc, conn)
    # the connection that saw another key is closed; the executor's own must show the real one
    assert conn.closed
    assert identity.recorded_pin(doc.sessions["hello"].instance, inst) == "SHA256:real"


def test_a_journal_no_newer_than_this_runners_record_changes_nothing() -> None:
    inst = tagged()
    mine = written_by_another_runner(inst, "SHA256:real", seq=5)
    doc = StatusDoc(sessions={"hello": mine})
    journal = sealed(inst, written_by_another_runner(inst, "SHA256:real", seq=5))
    replaced, _pool = consult(inst, doc, _Transport(journal, "SHA256:real"))
    assert replaced == [] and doc.sessions["hello"] is mine


def test_a_journal_is_read_only_where_the_record_may_be_behind() -> None:
    inst = tagged()
    work = actions.Plan(
        (actions.SessionPlan("hello", (actions.SyncUp("hello", 1, 1, 0, False, "x"),)),)
    )
    idle = actions.Plan((actions.SessionPlan("hello", ()),))
    current = StatusDoc(sessions={"hello": written_by_another_runner(inst, "p")})
    assert rebuild.worth_reading(idle, world(inst), StatusDoc(), set()) == ["hello"]
    assert rebuild.worth_reading(work, world(inst), current, set()) == ["hello"]
    # a no-op apply reads nothing; nor does a runner without the secret, nor one that read it
    assert rebuild.worth_reading(idle, world(inst), current, set()) == []
    assert (
        rebuild.worth_reading(idle, world(inst, replace(OWNER, key_root=None)), StatusDoc(), set())
        == []
    )
    assert rebuild.worth_reading(work, world(inst), current, {"hello"}) == []
    # nor where no key nonce says the journal is a secret holder's, or the sandbox is down
    assert rebuild.worth_reading(idle, world(instance(desired())), StatusDoc(), set()) == []
    assert rebuild.worth_reading(idle, world(tagged(state="stopped")), StatusDoc(), set()) == []


def test_the_journals_of_many_sessions_are_read_at_once() -> None:
    import threading

    names = ["s1", "s2", "s3"]
    together = threading.Barrier(len(names), timeout=10)
    pool = TransportPool()
    contexts, instances = {}, {}
    for name in names:
        d = desired(name=name, instance_name=identity.instance_name(PROJECT, name))
        inst = instance(d, uuid=f"u-{name}", tags=(*d.tags, sessionkeys.key_tag(NONCE)))
        contexts[name] = SimpleNamespace(desired=d, credentials=None)
        instances[inst.name] = inst
        binding = sandboxjournal.Binding(PROJECT, name, inst.uuid)
        journal = sandboxjournal.encode(
            sandboxjournal.journal_key(ROOT), binding, written_by_another_runner(inst, "p")
        )

        class Slow(_Transport):
            def start(self, command: str) -> _Proc:
                together.wait()  # every session's read has begun before any ends
                return super().start(command)

        pool.keep(name, inst.uuid, Slow(journal, "p"))  # type: ignore[arg-type]
    obs = SimpleNamespace(owner=OWNER, contexts=contexts, instances=instances)
    doc = StatusDoc()
    replaced = rebuild.consult(
        names,
        obs=obs,
        doc=doc,
        metros=None,  # type: ignore[arg-type]
        pool=pool,
        reporter=RecordingReporter(),
    )
    assert replaced == names and sorted(doc.sessions) == names
