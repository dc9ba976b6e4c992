"""The journal a session leaves in its sandbox: every status field comes back, and nothing a
sandbox can write without the project's secret is taken for one."""

from __future__ import annotations

import json
import threading
import types
import typing
from typing import Any

import pytest
from pydantic import BaseModel

from reconciler import errors
from reconciler.reconcile import rebuild, sessionkeys
from reconciler.status import sandboxjournal
from reconciler.status.schema import SessionStatus

KEY = sandboxjournal.journal_key(sessionkeys.key_root("0123456789abcdef-secret", "abcd1234"))
BOUND = sandboxjournal.Binding("abcd1234", "demo", "uuid-1")


def sample(annotation: Any, default: Any, name: str) -> Any:
    """A value of `annotation` other than `default` (a new field gets one without edits)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return sample(next(a for a in args if a is not type(None)), default, name)
    if origin is typing.Literal:
        return next(a for a in reversed(args) if a != default)
    if origin is list:
        return [sample(args[0], None, name)]
    if origin is dict:
        return {"k": sample(args[1], None, name)}
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return filled(annotation)
    if annotation is bool:
        return not default
    if annotation is int:
        return 7
    if annotation is float:
        return 1.5
    if annotation is str:
        return f"{name}-value"
    raise AssertionError(f"no sample for field {name}: {annotation!r}")


def filled(model: type[BaseModel]) -> Any:
    values = {}
    for name, field in model.model_fields.items():
        default = None if field.is_required() else field.get_default(call_default_factory=True)
        values[name] = sample(field.annotation, default, name)
    return model(**values)


def defaults_left(value: BaseModel, path: str = "") -> list[str]:
    left = []
    for name, field in type(value).model_fields.items():
        got = getattr(value, name)
        if not field.is_required() and got == field.get_default(call_default_factory=True):
            left.append(path + name)
        items = got if isinstance(got, list) else [got]
        for item in items:
            if isinstance(item, BaseModel):
                left += defaults_left(item, f"{path}{name}.")
    return left


def test_every_field_of_a_session_status_comes_back_from_the_journal() -> None:
    record = filled(SessionStatus)
    assert defaults_left(record) == []  # a field the sample leaves at its default proves nothing
    back, why = sandboxjournal.decode(KEY, BOUND, sandboxjournal.encode(KEY, BOUND, record))
    assert why == "" and back == record


def journal(**changes: Any) -> bytes:
    body = json.loads(sandboxjournal.encode(KEY, BOUND, SessionStatus(phase="Ready")))
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "not JSON"),
        (b"[]", "not a sealed journal"),
        (journal(record={"phase": "Failed"}), "seal does not match"),
        (journal(mac="0" * 64), "seal does not match"),
        (journal(mac="\u00e9" * 64), "seal does not match"),
        (b" " * (sandboxjournal.MAX_JOURNAL_BYTES + 1), "larger than"),
    ],
)
def test_a_journal_the_sandbox_made_or_changed_is_refused(data: bytes, why: str) -> None:
    record, reason = sandboxjournal.decode(KEY, BOUND, data)
    assert record is None and why in reason


@pytest.mark.parametrize(
    "elsewhere",
    [
        sandboxjournal.Binding("abcd1235", "demo", "uuid-1"),
        sandboxjournal.Binding("abcd1234", "other", "uuid-1"),
        sandboxjournal.Binding("abcd1234", "demo", "uuid-2"),
    ],
)
def test_a_sealed_journal_of_another_project_session_or_instance_is_refused(
    elsewhere: sandboxjournal.Binding,
) -> None:
    # what a sandbox would copy in: a genuine journal, written for someone else
    data = sandboxjournal.encode(KEY, elsewhere, SessionStatus(phase="Ready"))
    record, reason = sandboxjournal.decode(KEY, BOUND, data)
    assert record is None and "another project, session or instance" in reason


def test_another_secrets_journal_is_refused() -> None:
    other = sandboxjournal.journal_key(sessionkeys.key_root("another-secret-0123456", "abcd1234"))
    data = sandboxjournal.encode(other, BOUND, SessionStatus(phase="Ready"))
    assert sandboxjournal.decode(KEY, BOUND, data)[0] is None


class _Proc:
    """A sandbox process that answers `chunks`, then maybe nothing at all."""

    def __init__(self, chunks: list[bytes], *, stall: bool = False) -> None:
        self.chunks = chunks
        self.stall = stall
        self.killed = False
        self.dead = threading.Event()

    def write(self, data: bytes) -> None:
        pass

    def close_stdin(self) -> None:
        pass

    def read(self, n: int = 65536) -> bytes:
        if self.chunks:
            return self.chunks.pop(0)
        if self.stall:
            self.dead.wait(10)
            if self.killed:
                raise errors.TransportError("channel closed")
        return b""

    def read_stderr(self, n: int = 65536) -> bytes:
        return b""

    def wait(self, timeout: float | None = None) -> int:
        return 0

    def kill(self) -> None:
        self.killed = True
        self.dead.set()


class _Shell:
    def __init__(self, proc: _Proc) -> None:
        self.proc = proc

    def start(self, command: str) -> _Proc:
        return self.proc


def test_a_sandbox_that_answers_without_end_is_cut_off_at_the_limit() -> None:
    proc = _Proc([b"x" * 65536] * 100)
    with pytest.raises(errors.RemoteError, match="more than 1000 bytes"):
        rebuild.exchange(_Shell(proc), "cat journal", None, limit=1000)  # type: ignore[arg-type]
    assert proc.killed


def test_a_sandbox_that_never_answers_is_cut_off_at_the_deadline() -> None:
    proc = _Proc([], stall=True)
    with pytest.raises(errors.RemoteError, match=r"did not answer within 0\.2s"):
        rebuild.exchange(_Shell(proc), "cat", None, limit=10, timeout_s=0.2)  # type: ignore[arg-type]
    assert proc.killed
