"""Who a session's instance is and who owns it: names, tags, the ownership proof, owner ids.

Names are idempotency keys: the same project and session always map to the same instance name,
so a create whose answer was lost can be found (and adopted) instead of duplicated. The project
and session tags say which session an instance claims to be; only the `ukc.owner` tag proves it
is ours, because anyone can pick the same project and session name (by accident as easily as
on purpose). So ukc replaces, deletes, adopts or uses an instance only when `prove` says it is
its own:

* the instance has the session's name and ukc tags, and
* its `ukc.owner=<id>` tag carries an owner id of ours. The id is HMAC-SHA256 of the project
  under `UKC_SESSION_SECRET` (any checkout or CI runner with the secret, and nobody without
  it, computes the same id), else a random id kept in the checkout's `.ukc/owner`;
* or, for an instance made by an older ukc (no owner tag): this checkout's status file
  records that very uuid *and* a pin (the host key of the first connection). A uuid alone is
  not enough: an older ukc journaled the uuid of any instance it observed under its name before
  its first connection; a recorded pin means this checkout's own credentials opened that
  sandbox, which only the ones its creator gave it do.

The delete that follows a proof names the instance by uuid, so an instance swapped in under
the same name between observation and action is never the one deleted.

Everything here is pure except `load_owner` and `load_salt`, which read (and on first use
write) `.ukc/owner` and `.ukc/salt`; the apply loop calls them once per pass.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from reconciler import errors
from reconciler._util.atomic import create_atomic, write_atomic
from reconciler.cloud.model import Instance, Volume
from reconciler.reconcile import sessionkeys
from reconciler.spec.models import EXEC_NAMES
from reconciler.status.schema import InstanceRecord

__all__ = [
    "GROUP_TAG",
    "OWNER_KEY",
    "OWNER_TAG",
    "SECRET_VAR",
    "TRANSPORT_TAG",
    "Owner",
    "Proof",
    "boot_pin",
    "group_id",
    "group_tag",
    "instance_hash",
    "instance_name",
    "instance_transport",
    "load_owner",
    "load_salt",
    "owner_id_from_secret",
    "owner_tags",
    "project_id",
    "prove",
    "recorded_pin",
    "session_from_tags",
    "tag_value",
    "transport_tag",
    "ttl_from_tags",
    "ttl_tag",
    "volume_is_ours",
]

#: every instance ukc creates carries this bare tag
OWNER_TAG = "ukc"
#: tag key recording the transport (`exec`) an instance was created for: its public ports are
#: fixed at creation. An instance without it was made by an older ukc, which gave every
#: instance both ports (2222 and the exec API's 443)
TRANSPORT_TAG = "ukc.exec"
#: tag key recording the session's `ttl` (seconds) when the instance was created: what
#: `ukc ls` shows of sessions whose specs it cannot see (apply goes by the spec's ttl)
TTL_TAG = "ukc.ttl"


def project_id(status_dir: Path, environ: Mapping[str, str]) -> str:
    """8 hex chars naming the project: `$UKC_PROJECT` (CI: set it, paths differ per runner),
    else derived from the real path of the directory that holds `.ukc/`."""
    explicit = environ.get("UKC_PROJECT", "").strip().lower()
    if explicit:
        return hashlib.sha256(explicit.encode()).hexdigest()[:8]
    real = os.path.realpath(status_dir)
    return hashlib.sha256(real.encode()).hexdigest()[:8]


def instance_name(project: str, session: str) -> str:
    """`ukc-<project>-<session>`; at most 63 chars because session names are capped at 50."""
    return f"ukc-{project}-{session}"


def instance_hash(image: str, memory_mb: int | None, volume_mb: int | None = None) -> str:
    """Hash of the fields that are baked into an instance at creation: a change means replace."""
    fields: dict[str, object] = {"image": image, "memory_mb": memory_mb}
    # why only when set: an instance without a volume keeps the hash it had before volumes
    # existed, so upgrading ukc replaces nothing
    if volume_mb is not None:
        fields["workspace_volume_mb"] = volume_mb
    canon = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def owner_tags(project: str, session: str, inst_hash: str, owner_id: str) -> list[str]:
    return [
        OWNER_TAG,
        f"ukc.project={project}",
        f"ukc.session={session}",
        f"ukc.spec={inst_hash}",
        f"ukc.owner={owner_id}",
    ]


#: tag key naming the spec directory (its path inside the repository) an instance was made for
GROUP_TAG = "ukc.group"


def group_id(base_dir: Path) -> str | None:
    """12 hex naming a spec directory by its path inside its git repository (the same in every
    clone), or None outside a repository (no stateless prune there)."""
    real = Path(os.path.realpath(base_dir))
    for root in (real, *real.parents):
        if (root / ".git").exists():
            rel = real.relative_to(root).as_posix()
            return hashlib.sha256(f"ukc.group:{rel}".encode()).hexdigest()[:12]
    return None


def group_tag(group: str) -> str:
    return f"{GROUP_TAG}={group}"


def transport_tag(transport: str) -> str:
    return f"{TRANSPORT_TAG}={transport}"


def instance_transport(inst: Instance, desired: str) -> str:
    """The transport that reaches `inst`: the one it was made for (its `ukc.exec` tag), which
    stays until it is replaced, even when the spec now asks for another (its outputs still
    come home through it first); `desired` for an older ukc's instance without the tag."""
    made_for = tag_value(inst.tags, TRANSPORT_TAG)
    return made_for if made_for in EXEC_NAMES else desired


def ttl_tag(ttl_s: float) -> str:
    return f"{TTL_TAG}={int(ttl_s)}"


def ttl_from_tags(tags: Sequence[str]) -> int | None:
    """The `ttl` (seconds) an instance was created with, or None (no ttl, an older ukc)."""
    value = tag_value(tags, TTL_TAG)
    return int(value) if value is not None and value.isdigit() else None


def tag_value(tags: Sequence[str], key: str) -> str | None:
    """The value of `key=value` among `tags`, or None."""
    prefix = key + "="
    for tag in tags:
        if tag.startswith(prefix):
            return tag[len(prefix) :]
    return None


def session_from_tags(tags: Sequence[str], project: str) -> str | None:
    """The session an instance claims, if it carries ukc's tags for `project` (a claim, not a
    proof of ownership)."""
    if OWNER_TAG not in tags or tag_value(tags, "ukc.project") != project:
        return None
    return tag_value(tags, "ukc.session")


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
    #: with `UKC_SESSION_SECRET`: what session keys are derived from (`sessionkeys`)
    key_root: bytes | None = field(default=None, repr=False, compare=False)
    #: with `UKC_SESSION_SECRET`, in a repository: this spec directory's group id
    #: (`group_id`), tagged on its instances so a fresh runner knows which ones a prune may
    #: delete without this checkout's inventory
    group: str | None = None


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


def recorded_pin(record: InstanceRecord | None, inst: Instance) -> str | None:
    """The pin this checkout recorded for that very instance (same name and uuid), else None.

    The one rule for carrying what was learnt about an instance forward: a pin never passes to
    another instance under the same name (a replacement has a new identity to learn).
    """
    if record is not None and record.uuid == inst.uuid and record.name == inst.name:
        return record.pin
    return None


def boot_pin(record: InstanceRecord | None, inst: Instance) -> str | None:
    """The recorded pin to hold `inst`'s sandbox to: that of the same instance *and boot*.

    A cold boot (the platform counts it in `start_count`) may come with new host keys, so a
    pin is carried only while the platform shows the same boot; when either count is
    unknown the instance's pin stands (`recorded_pin`).
    """
    pin = recorded_pin(record, inst)
    if pin is None or record is None:
        return None
    if (
        record.start_count is not None
        and inst.start_count is not None
        and record.start_count != inst.start_count
    ):
        return None
    return pin


def prove(inst: Instance, owner: Owner, session: str, record: InstanceRecord | None) -> Proof:
    """Whether `inst` is provably `session`'s instance of this checkout.

    `record` is what this checkout's status file recorded for the session's instance.
    """
    expected = instance_name(owner.project, session)
    rename = "rename the session (or set another UKC_PROJECT)"
    if inst.name != expected:
        return Proof(False, f"session {session!r} names its instance {expected}", rename)
    if session_from_tags(inst.tags, owner.project) != session:
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
    if recorded_pin(record, inst):
        return Proof(True, "made by an older ukc: this checkout recorded its uuid and host key")
    return Proof(
        False,
        f"it has no {OWNER_KEY} tag (an older ukc or someone else made it) and this "
        "checkout's status file does not record its uuid and host key",
        "if it is yours, delete it yourself (UKC console or API) and apply again; "
        f"otherwise {rename}",
    )


def volume_is_ours(volume: Volume, owner: Owner, session: str) -> bool:
    """Whether `volume` is provably `session`'s of this checkout: it carries ukc's tags for the
    session and only owner ids of ours (no fallback for untagged ones: ukc always tagged the
    volumes it made)."""
    values = owner_values(volume.tags)
    return (
        session_from_tags(volume.tags, owner.project) == session
        and bool(values)
        and all(v in owner.accepted for v in values)
    )


def load_salt(state_dir: Path, owner: Owner | None = None) -> bytes:
    """A per-project random salt, so hashes of secret values in the status file reveal nothing.

    With `UKC_SESSION_SECRET` the salt is derived from it instead (and nothing is written):
    every runner then judges commands by the same input hashes.

    Written through a temp file and a rename: a kill mid-write never leaves a short salt behind
    (a short one is replaced; that only makes commands with secrets run once more). A writer
    killed before its rename left no salt, so the next call writes one and sweeps its temp file.
    """
    if owner is not None and owner.key_root is not None:
        return hmac.new(owner.key_root, b"ukc.salt", hashlib.sha256).digest()
    path = state_dir / "salt"
    try:
        value = path.read_bytes()
        if len(value) == 32:
            return value
    except FileNotFoundError:
        pass
    state_dir.mkdir(parents=True, exist_ok=True)
    value = secrets.token_bytes(32)
    write_atomic(path, value)
    return value


#: minimum length of `UKC_SESSION_SECRET`: a short one could be picked again by accident
MIN_SECRET_LEN = 16
_OWNER_ID = re.compile(rb"[0-9a-f]{32}\n?")


def load_owner(state_dir: Path, project: str, environ: Mapping[str, str]) -> Owner:
    """This checkout as an owner: the id derived from `UKC_SESSION_SECRET`, else the random
    id in `.ukc/owner` (created on first use, 0600). With a secret, an id this checkout made
    earlier still proves ownership of the instances it made before the secret was set."""
    path = state_dir / "owner"
    earlier = _read_owner_file(path)
    secret = environ.get(SECRET_VAR, "")
    if secret:
        if len(secret) < MIN_SECRET_LEN:
            raise errors.UsageError(
                f"{SECRET_VAR} is {len(secret)} characters; use at least "
                f"{MIN_SECRET_LEN} random ones (e.g. from `openssl rand -hex 32`)"
            )
        primary = owner_id_from_secret(secret, project)
        accepted = {primary} | ({earlier} if earlier else set())
        root = sessionkeys.key_root(secret, project)
        return Owner(
            project,
            primary,
            frozenset(accepted),
            SECRET_VAR,
            key_root=root,
            group=group_id(state_dir.parent),
        )
    if earlier is None:
        state_dir.mkdir(parents=True, exist_ok=True)
        fresh = secrets.token_hex(OWNER_ID_LEN // 2)
        # why exclusive: a concurrent `ukc plan` must not replace the id an apply tags with
        create_atomic(path, (fresh + "\n").encode(), mode=0o600)
        earlier = _read_owner_file(path)
        assert earlier is not None
    return Owner(project, earlier, frozenset({earlier}), str(path))


def _read_owner_file(path: Path) -> str | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    if not _OWNER_ID.fullmatch(raw):
        raise errors.UsageError(
            f"{path} does not hold an owner id (32 hex digits); restore it, or remove it: ukc "
            "then no longer proves it owns the instances this checkout made (delete those "
            "yourself)"
        )
    return raw.decode().strip()
