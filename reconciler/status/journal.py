"""Reading and writing the status file: load (with its backup), save, the applier lock.

Writes are atomic (temp file + fsync + rename + directory fsync, previous generation kept as
`status.json.bak`), so a kill at any instant leaves a parseable file. One applier at a time per
status file: `lock()` takes an `flock` that the kernel releases when the holder dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Literal

from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from reconciler import errors
from reconciler._util.atomic import fsync_dir, temp_files, write_atomic
from reconciler._util.pids import pid_alive
from reconciler._util.retry import RetryPolicy, poll
from reconciler.status.schema import STATUS_VERSION, Condition, SessionStatus, StatusDoc

__all__ = [
    "Committer",
    "encode",
    "load",
    "lock",
    "save",
    "set_client_pid",
    "set_condition",
    "status_path_for",
    "utc_now",
]


def status_path_for(base_dir: Path) -> Path:
    return base_dir / ".ukc" / "status.json"


def load(path: Path) -> StatusDoc:
    """The status document at `path`; an empty one when the file does not exist yet.

    A corrupt file falls back to the previous generation (`.bak`); if both are unreadable that
    is an error, never a silent reset (a reset would forget the prune inventory).
    """
    for candidate in (path, path.with_name(path.name + ".bak")):
        try:
            raw = candidate.read_bytes()
        except FileNotFoundError:
            continue
        try:
            doc = StatusDoc.model_validate(json.loads(raw))
        except (ValueError, ValidationError):
            continue
        if doc.version > STATUS_VERSION:
            raise errors.UsageError(
                f"{path} has status version {doc.version}; this ukc understands up to "
                f"{STATUS_VERSION}: upgrade ukc"
            )
        return doc
    if path.exists():
        raise errors.UsageError(f"{path} is unreadable and has no readable backup; move it aside")
    return StatusDoc()


def encode(doc: StatusDoc) -> bytes:
    """The document as the status file holds it (stamped `updated_at` now).

    pydantic's own encoder (10x the standard library's indenting one); a string it cannot
    encode as UTF-8 (a lone surrogate of an undecodable file name) takes the standard
    library's, which escapes it."""
    doc.updated_at = utc_now()
    try:
        return doc.model_dump_json(indent=2).encode() + b"\n"
    except PydanticSerializationError:
        return json.dumps(doc.model_dump(mode="json"), indent=2).encode() + b"\n"


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, mode=0o644, backup=path.with_name(path.name + ".bak"))
    fsync_dir(path.parent)


def save(path: Path, doc: StatusDoc) -> None:
    """Write atomically (temp + fsync + rename + directory fsync); the previous generation
    stays readable as `.bak` if this one is ever damaged."""
    _write(path, encode(doc))


class Committer:
    """Durable saves of one status document that worker threads change under `doc_lock`.

    `save()` returns once a write holding every change made before the call is durable (as
    `save` does), but saves that arrive while a write is in flight share the next write
    (a group commit), and the document is locked only while it is encoded, never during the
    write and its fsyncs. Why: with one whole-document save per action under the workers'
    lock, 50 sessions made ~250 writes of a document of up to 50 sessions, one at a time.
    """

    def __init__(
        self,
        path: Path,
        doc: StatusDoc,
        doc_lock: threading.Lock,
        *,
        write: Callable[[Path, bytes], None] = _write,
    ) -> None:
        self.path = path
        self.doc = doc
        self.doc_lock = doc_lock
        self._write = write
        self._cond = threading.Condition()
        #: saves asked for so far, and how many of them a finished write covers
        self.asked = 0
        self._covered = 0
        self._writing = False
        #: the writes made (tests and benches count them)
        self.writes = 0

    def save(self) -> None:
        """Make every change to the document made before this call durable. Never call it
        holding `doc_lock`."""
        with self._cond:
            self.asked += 1
            mine = self.asked
            while self._covered < mine:
                if not self._writing:
                    break
                self._cond.wait()
            else:
                return
            self._writing = True
            # every save asked for by now changed the document before asking: the snapshot
            # taken next holds those changes
            covers = self.asked
        written = False
        try:
            with self.doc_lock:
                data = encode(self.doc)
            self._write(self.path, data)
            written = True
        finally:
            # a failed write covers nothing: a waiter then writes (and fails) itself
            with self._cond:
                self._writing = False
                if written:
                    self._covered = max(self._covered, covers)
                    self.writes += 1
                self._cond.notify_all()


#: the `ukc` process this one runs a command for (set by the warm process's child): the
#: lock records it, so that a holder whose `ukc` is gone is known to be dying
_CLIENT_PID: int | None = None
#: how long an applier waits for a lock whose holder is dying. why: a command run by the warm
#: process ends a few milliseconds after its `ukc` is killed (its watcher sees the closed
#: socket, then kills it); an immediate re-run must not fail on that holder
DYING_HOLDER_WAIT_S = 5.0
_CLIENT_MARK = re.compile(r"\(for ukc pid (\d+)\)")
#: the lock file's holder text, padded to this length
_HOLDER_BYTES = 256


def set_client_pid(pid: int | None) -> None:
    """Name the `ukc` process the locks of this process are taken for (warm process)."""
    global _CLIENT_PID
    _CLIENT_PID = pid


def _holder_dying(holder: str) -> bool:
    """True when the lock's holder runs for a `ukc` that no longer exists."""
    found = _CLIENT_MARK.search(holder)
    return found is not None and not pid_alive(int(found.group(1)))


@contextlib.contextmanager
def lock(path: Path, *, timeout_s: float = 0.0, poll_s: float = 0.02) -> Iterator[None]:
    """Hold the applier lock beside the status file, waiting up to `timeout_s`.

    The lock file records who holds it so the loser's message can say so; the kernel drops
    the lock when the holder dies, so there are no stale locks on one host. A holder that is
    dying (it runs for a `ukc` that is gone) is waited for, up to `DYING_HOLDER_WAIT_S`.
    """
    lock_path = path.with_name("status.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    started = time.monotonic()

    def take(_: float) -> bool | None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            waited = time.monotonic() - started
            holder = os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8", "replace").strip()
            dying = waited < DYING_HOLDER_WAIT_S and _holder_dying(holder)
            if waited >= timeout_s and not dying:
                raise errors.LockedError(
                    f"another ukc holds {lock_path} ({holder or 'holder unknown'}); "
                    "wait for it or pass --lock-timeout SECONDS"
                ) from None
            return None

    try:
        poll(take, policy=RetryPolicy.every(poll_s))
        client = f" (for ukc pid {_CLIENT_PID})" if _CLIENT_PID is not None else ""
        info = f"pid {os.getpid()}{client} on {socket.gethostname()} since {utc_now()}"
        # why in place, padded, never truncated: ext4 flushes a file truncated to zero when it
        # is closed (a disk write per watch pass, slow on a busy disk); a loser reads the
        # first `_HOLDER_BYTES` and strips the padding
        os.pwrite(fd, info.encode()[:_HOLDER_BYTES].ljust(_HOLDER_BYTES), 0)
        _sweep_temps(path)
        yield
    finally:
        os.close(fd)


def _sweep_temps(path: Path) -> None:
    """Remove temp files of `save()` left by a holder killed mid-write.

    Only the lock holder writes the status file, so once we hold the lock every temp file
    beside it belongs to a writer that died: nobody else will ever rename it into place.
    """
    for stale in temp_files(path):
        with contextlib.suppress(FileNotFoundError):
            stale.unlink()


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def set_condition(
    session: SessionStatus,
    type_: str,
    status: Literal["True", "False", "Unknown"],
    reason: str,
    message: str,
    now: str,
) -> None:
    """Set a condition, keeping `last_transition_time` when the status did not change."""
    for cond in session.conditions:
        if cond.type == type_:
            if cond.status != status:
                cond.last_transition_time = now
            cond.status = status
            cond.reason = reason
            cond.message = message
            return
    session.conditions.append(
        Condition(
            type=type_,
            status=status,
            reason=reason,
            message=message,
            last_transition_time=now,
        )
    )
