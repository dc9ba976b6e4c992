"""Who owns an instance: the one rule every destructive or adopting step goes through.

Names and the `ukc.project`/`ukc.session` tags can be reproduced by anyone who picks the same
`UKC_PROJECT` and session name, by accident as easily as on purpose. So ukc replaces, deletes,
adopts or uses an instance only when it can *prove* the instance is its own:

* the instance has the session's name and ukc tags, and
* its `ukc.owner=<id>` tag carries an owner id of ours. The id is HMAC-SHA256 of the project
  under `UKC_SESSION_SECRET` (any checkout or CI runner with the secret, and nobody without
  it, computes the same id), else a random id kept in the checkout's `.ukc/owner`;
* or, for an instance made by an older ukc (no owner tag): this checkout's status file
  records that very uuid *and* a host key. A uuid alone is not enough: an older ukc journaled
  the uuid of any instance it observed under its name before its first connection; a recorded
  host key means this checkout's own private key opened that sandbox, which only the key its
  creator gave it does.

The delete that follows a proof names the instance by uuid, so an instance swapped in under
the same name between observation and action is never the one deleted.

Pure: the owner arrives as a value (the observer derives or reads it).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from reconciler import naming
from reconciler.backends import Instance
from reconciler.status import InstanceRecord

__all__ = ["OWNER_KEY", "SECRET_VAR", "Owner", "Proof", "owner_id_from_secret", "prove"]

OWNER_KEY = "ukc.owner"
SECRET_VAR = "UKC_SESSION_SECRET"
#: hex digits of an owner id (128 bits)
OWNER_ID_LEN = 32


@dataclass(frozen=True)
class Owner:
    """This checkout as an owner: the id new instances get, and every id that proves ours."""

    project: str
    id: str
    #: `id`, plus this checkout's own random id when a secret now takes its place
    accepted: frozenset[str]
    #: where the id comes from, for messages: `UKC_SESSION_SECRET` or the owner file
    source: str


@dataclass(frozen=True)
class Proof:
    ours: bool
    #: how ownership was proven, or why it could not be
    why: str
    #: the remedy when not ours
    remedy: str = ""

    def refusal(self, inst: Instance) -> str:
        """One line naming the instance, its metro, why and what to do."""
        where = f" on metro {inst.metro}" if inst.metro else ""
        return (
            f"instance {inst.name} (uuid {inst.uuid}){where} is not provably this checkout's: "
            f"{self.why}; ukc will not replace, delete or use it; {self.remedy}"
        )


def owner_id_from_secret(secret: str, project: str) -> str:
    """The owner id every holder of `secret` derives for `project` (and nobody else can)."""
    digest = hmac.new(secret.encode(), f"ukc.owner:{project}".encode(), hashlib.sha256)
    return digest.hexdigest()[:OWNER_ID_LEN]


def owner_values(tags: Sequence[str]) -> list[str]:
    prefix = OWNER_KEY + "="
    return [t[len(prefix) :] for t in tags if t.startswith(prefix)]


def prove(inst: Instance, owner: Owner, session: str, record: InstanceRecord | None) -> Proof:
    """Whether `inst` is provably `session`'s instance of this checkout.

    `record` is what this checkout's status file recorded for the session's instance.
    """
    expected = naming.instance_name(owner.project, session)
    rename = "rename the session (or set another UKC_PROJECT)"
    if inst.name != expected:
        return Proof(False, f"session {session!r} names its instance {expected}", rename)
    if naming.session_from_tags(inst.tags, owner.project) != session:
        return Proof(
            False,
            f"it does not carry ukc's tags for session {session!r} of project {owner.project}",
            f"{rename}, or delete that instance yourself if you know it is abandoned",
        )
    values = owner_values(inst.tags)
    if values:
        if all(v in owner.accepted for v in values):
            return Proof(True, f"its {OWNER_KEY} tag is ours ({owner.source})")
        return Proof(
            False,
            f"its {OWNER_KEY} tag is another owner's (another checkout of project "
            f"{owner.project}, or another {SECRET_VAR}; ours comes from {owner.source})",
            "if it is yours (made from another checkout, or before this checkout's .ukc/ "
            f"was removed), run ukc where it was made, or with the {SECRET_VAR} it was made "
            f"with, or delete it yourself; otherwise {rename}",
        )
    if (
        record is not None
        and record.uuid == inst.uuid
        and record.name == inst.name
        and record.host_key
    ):
        return Proof(True, "made by an older ukc: this checkout recorded its uuid and host key")
    return Proof(
        False,
        f"it has no {OWNER_KEY} tag (an older ukc or someone else made it) and this "
        "checkout's status file does not record its uuid and host key",
        "if it is yours, delete it yourself (UKC console or API) and apply again; "
        f"otherwise {rename}",
    )
