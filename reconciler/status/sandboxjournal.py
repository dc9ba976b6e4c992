"""The session's journal kept in its sandbox: what a fresh runner rebuilds its status from.

With `UKC_SESSION_SECRET`, the executor leaves the session's whole status record (commands
with their input hashes, exit codes, output tails and times; the sync record; conditions) in
the sandbox at `JOURNAL_PATH`, so a runner without the first one's `.ukc/` (a CI runner, a
fresh clone) knows what ran, on which inputs, and which tree the sandbox holds.

The sandbox is untrusted and can write that file. So the journal is sealed with an HMAC
whose key is derived from the secret (which never enters a sandbox), and bound to the project,
the session and the instance uuid: a sandbox cannot make one up, nor pass another session's or
another instance's off as its own. What it can do is keep an older journal of its own session
(or delete it), which makes a runner redo work or skip work its own session once recorded as
done, never more. Anything malformed, oversized, unsealed or bound elsewhere is refused, and
the runner proceeds as if there were no journal (redoing the work).

Pure: encoding and checking only; `reconcile.rebuild` moves the bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from reconciler.errors import MALFORMED_JSON
from reconciler.status.schema import SessionStatus

__all__ = [
    "JOURNAL_DIR",
    "JOURNAL_PATH",
    "JOURNAL_VERSION",
    "MAX_JOURNAL_BYTES",
    "Binding",
    "decode",
    "encode",
    "journal_key",
]

#: in the sandbox: under `/workspace` (kept across restarts) in `.ukc/`, which sync never
#: sends, deletes or brings back
JOURNAL_DIR = "/workspace/.ukc"
JOURNAL_PATH = f"{JOURNAL_DIR}/journal.json"
JOURNAL_VERSION = 1
#: what a runner reads at most; a record is a few KiB to a few hundred (output tails)
MAX_JOURNAL_BYTES = 1 << 20


@dataclass(frozen=True)
class Binding:
    """Which session's journal it must be: a journal for anything else is refused."""

    project: str
    session: str
    instance_uuid: str


def journal_key(key_root: bytes) -> bytes:
    """The MAC key, derived from the project's key root (`sessionkeys.key_root`)."""
    return hmac.new(key_root, b"ukc.journal", hashlib.sha256).digest()


def _mac(key: bytes, body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hmac.new(key, canon.encode("ascii"), hashlib.sha256).hexdigest()


def encode(key: bytes, binding: Binding, record: SessionStatus) -> bytes:
    body: dict[str, Any] = {
        "v": JOURNAL_VERSION,
        "project": binding.project,
        "session": binding.session,
        "instance": binding.instance_uuid,
        "record": record.model_dump(mode="json"),
    }
    body["mac"] = _mac(key, body)
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_JOURNAL_BYTES:
        raise ValueError(f"journal of session {binding.session!r} is {len(data)} bytes")
    return data


def decode(key: bytes, binding: Binding, data: bytes) -> tuple[SessionStatus | None, str]:
    """The record a journal carries, or None and why it was refused (for messages; it names
    nothing the sandbox wrote)."""
    if len(data) > MAX_JOURNAL_BYTES:
        return None, f"larger than {MAX_JOURNAL_BYTES} bytes"
    try:
        body = json.loads(data)
    except MALFORMED_JSON:
        return None, "not JSON"
    if not isinstance(body, dict) or not isinstance(body.get("mac"), str):
        return None, "not a sealed journal"
    mac = body.pop("mac")
    if not hmac.compare_digest(mac.encode("ascii", "replace"), _mac(key, body).encode()):
        return None, "its seal does not match (written without this project's secret)"
    if body.get("v") != JOURNAL_VERSION:
        return None, f"version {body.get('v')!r}, not {JOURNAL_VERSION}"
    bound = (body.get("project"), body.get("session"), body.get("instance"))
    if bound != (binding.project, binding.session, binding.instance_uuid):
        return None, "it belongs to another project, session or instance"
    try:
        record = SessionStatus.model_validate(body.get("record"))
    except ValidationError:
        return None, "its record does not parse"
    return record, ""
