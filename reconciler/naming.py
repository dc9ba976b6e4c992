"""Deterministic instance names and owner tags.

Names are idempotency keys: the same project and session always map to the same instance name,
so a create whose answer was lost can be found (and adopted) instead of duplicated. The project
and session tags say which session an instance claims to be; only the `ukc.owner` tag proves
it is ours (see `ownership`), because anyone can pick the same project and session name.

Pure: no I/O except `project_id`, which reads nothing but the path string it is given.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "OWNER_TAG",
    "instance_hash",
    "instance_name",
    "owner_tags",
    "project_id",
    "session_from_tags",
    "tag_value",
]

#: every instance ukc creates carries this bare tag
OWNER_TAG = "ukc"


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


def instance_hash(image: str, memory_mb: int | None) -> str:
    """Hash of the fields that are baked into an instance at creation: a change means replace."""
    canon = json.dumps({"image": image, "memory_mb": memory_mb}, sort_keys=True)
    return hashlib.sha256(canon.encode()).hexdigest()[:12]


def owner_tags(project: str, session: str, inst_hash: str, owner_id: str) -> list[str]:
    return [
        OWNER_TAG,
        f"ukc.project={project}",
        f"ukc.session={session}",
        f"ukc.spec={inst_hash}",
        f"ukc.owner={owner_id}",
    ]


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
