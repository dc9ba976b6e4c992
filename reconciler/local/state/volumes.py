"""The local metro's volumes: `/v1/volumes` and the `volumes` of an instance create.

A volume is a host directory under `volumes/<uuid>/`, attached to at most one instance at a
time (UKC's default access mode `rwo`) and mounted where its attachment says. One created on
its own outlives the instances it was attached to; one created inline in an instance create is
not persistent and goes with that instance. Kept in `volumes.json` (written on every change:
volumes change rarely). The size is recorded and checked against the quota, not enforced on
the files (a local volume lives on the host's disk).
"""

from __future__ import annotations

import json
import re
import time
import uuid as uuidlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler._util.atomic import write_atomic
from reconciler._util.names import is_dns_label
from reconciler.errors import LocalMetroError
from reconciler.local.state.records import (
    CODE_ALREADY_EXISTS,
    CODE_CANNOT_BE_USED,
    CODE_INVALID,
    CODE_NOT_FOUND,
    CODE_QUOTA,
    ItemError,
    LocalVolume,
)

__all__ = ["VolumeAttach", "VolumeIndex", "VolumeLimits", "check_mount_point", "parse_attach"]

# why: a volume over the sandbox's system directories (or the agent's) would change what
# every process in it runs; UKC mounts into the image's own tree, the local metro shares /usr
_RESERVED_TOP = frozenset(
    {"bin", "dev", "etc", "lib", "lib32", "lib64", "libx32", "proc", "run", "sbin", "sys", "usr"}
)
_SEGMENT_RE = re.compile(r"^[^\0:]+$")


def _bad(message: str) -> ItemError:
    return ItemError(message, status=400, code=CODE_INVALID)


@dataclass(frozen=True)
class VolumeLimits:
    """Quota-like bounds answered with item code 19."""

    min_volume_mb: int = 1
    max_volume_mb: int = 65536
    max_volumes: int = 1000


def check_mount_point(at: object) -> str:
    """UKC's rules for a mount path (absolute, no `.`/`..`/`:`), plus the local metro's own:
    not `/` and not over a system directory of the sandbox."""
    if not isinstance(at, str) or not at.startswith("/"):
        raise _bad(f"volume mount point {at!r} must be an absolute path")
    parts = at.rstrip("/").split("/")[1:]
    if not parts or any(p in ("", ".", "..") or not _SEGMENT_RE.match(p) for p in parts):
        raise _bad(f"volume mount point {at!r} must not be / or contain ., .., : or //")
    if parts[0] in _RESERVED_TOP:
        raise _bad(f"volume mount point {at!r} is over a system directory of the sandbox")
    return "/" + "/".join(parts)


def _size(raw: object, limits: VolumeLimits) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool):
        raise _bad(f"size_mb must be an integer, got {type(raw).__name__}")
    if not limits.min_volume_mb <= raw <= limits.max_volume_mb:
        raise ItemError(
            f"volume size_mb {raw} is outside the quota limits "
            f"{limits.min_volume_mb}..{limits.max_volume_mb}",
            code=CODE_QUOTA,
        )
    return raw


def _tags(raw: object) -> list[str]:
    tags = raw if raw is not None else []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise _bad("tags must be a list of strings")
    return list(tags)


@dataclass(frozen=True)
class VolumeAttach:
    """One entry of an instance create's `volumes`: an existing volume (`ref`) or a new one
    (`size_mb`), mounted at `at`."""

    at: str
    readonly: bool
    ref: dict[str, str] | None
    size_mb: int | None
    name: str | None
    tags: list[str]


def parse_attach(raw: object) -> list[VolumeAttach]:
    """Validate the `volumes` of a create body (HTTP 400 / code 7 on any refusal)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise _bad("volumes must be a list")
    out: list[VolumeAttach] = []
    seen: set[str] = set()
    for item in raw:
        if not isinstance(item, dict):
            raise _bad("volumes entries must be objects")
        at = check_mount_point(item.get("at"))
        if at in seen:
            raise _bad(f"two volumes are mounted at {at}")
        seen.add(at)
        readonly = item.get("readonly", False)
        if not isinstance(readonly, bool):
            raise _bad("volume readonly must be a boolean")
        has_ref = "uuid" in item or ("name" in item and "size_mb" not in item)
        if "size_mb" in item and "uuid" in item:
            raise _bad(
                "Either a reference to an existing volume or the description of a new "
                "volume can be provided"
            )
        if has_ref:
            key = "uuid" if "uuid" in item else "name"
            if not isinstance(item[key], str) or not item[key]:
                raise _bad(f"volume {key} must be a non-empty string")
            out.append(VolumeAttach(at, readonly, {key: item[key]}, None, None, []))
            continue
        if "size_mb" not in item:
            raise _bad(f"the volume at {at} needs a uuid, a name or a size_mb")
        size = item["size_mb"]
        if not isinstance(size, int) or isinstance(size, bool):
            raise _bad("volume size_mb must be an integer")
        name = item.get("name")
        if name is not None and (not isinstance(name, str) or not is_dns_label(name)):
            raise _bad(f"volume name {name!r} is not a valid DNS label")
        out.append(VolumeAttach(at, readonly, None, size, name, _tags(item.get("tags"))))
    return out


class VolumeIndex:
    """Every volume of one metro by uuid and name, saved to `volumes.json` on every change."""

    def __init__(self, state_dir: Path, limits: VolumeLimits | None = None) -> None:
        self.path = state_dir / "volumes.json"
        self.limits = limits or VolumeLimits()
        self.records: dict[str, LocalVolume] = {}
        self._by_name: dict[str, str] = {}

    def load(self) -> None:
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise LocalMetroError(f"volumes file {self.path} is unreadable: {exc}") from None
        for item in raw.get("volumes", []):
            self._add(LocalVolume.from_json(item))

    def save(self) -> None:
        data = {"volumes": [v.to_json() for v in self.records.values()]}
        write_atomic(self.path, json.dumps(data).encode(), mode=0o600)

    def _add(self, vol: LocalVolume) -> None:
        self.records[vol.uuid] = vol
        self._by_name[vol.name] = vol.uuid

    def remove(self, vol: LocalVolume) -> None:
        self.records.pop(vol.uuid, None)
        self._by_name.pop(vol.name, None)
        self.save()

    def lookup(self, ref: object) -> LocalVolume:
        """Resolve a `{uuid}` / `{name}` reference; ItemError code 8 when absent."""
        if not isinstance(ref, dict) or ("uuid" in ref) == ("name" in ref):
            raise _bad("a volume reference must be an object with either uuid or name")
        key = "uuid" if "uuid" in ref else "name"
        value = str(ref[key])
        found = self.records.get(value) if key == "uuid" else None
        if key == "name" and value in self._by_name:
            found = self.records[self._by_name[value]]
        if found is None:
            raise ItemError(f"no volume with {key} '{value}'", code=CODE_NOT_FOUND)
        return found

    def select(self, tags: Iterable[str]) -> list[LocalVolume]:
        wanted = [t for t in tags if t]
        return [v for v in self.records.values() if all(t in v.tags for t in wanted)]

    def new(
        self,
        *,
        name: object,
        size_mb: object,
        tags: list[str],
        persistent: bool,
        extra: int = 0,
    ) -> LocalVolume:
        """A validated new volume (not yet added: `add` it once its whole request passed).

        `extra`: volumes of the same request admitted before this one, for the quota."""
        if name is None:
            name = f"volume-{uuidlib.uuid4().hex[:8]}"
        if not isinstance(name, str) or not is_dns_label(name):
            raise _bad(f"volume name {name!r} is not a valid DNS label")
        size = _size(size_mb, self.limits)
        if len(self.records) + extra >= self.limits.max_volumes:
            raise ItemError(
                f"volume quota reached: {len(self.records)} of {self.limits.max_volumes}",
                code=CODE_QUOTA,
            )
        if name in self._by_name:
            raise ItemError(f"volume name '{name}' is already taken", code=CODE_ALREADY_EXISTS)
        return LocalVolume(
            uuid=str(uuidlib.uuid4()),
            name=name,
            size_mb=size,
            created_at=time.time(),
            tags=tags,
            persistent=persistent,
        )

    def create(self, body: object) -> LocalVolume:
        """POST /v1/volumes: a new, persistent, unattached volume."""
        if not isinstance(body, dict):
            raise _bad("the volume create body must be a JSON object")
        if "template" in body or "host_path" in body:
            raise _bad("volume templates and host paths are not supported by the local metro")
        vol = self.new(
            name=body.get("name"),
            size_mb=body.get("size_mb"),
            tags=_tags(body.get("tags")),
            persistent=True,
        )
        self.add(vol)
        return vol

    def add(self, vol: LocalVolume) -> None:
        self._add(vol)
        self.save()

    def resolve_for(self, wanted: list[VolumeAttach], instance_name: str) -> list[LocalVolume]:
        """The volumes an instance create asks for, checked together before any is made:
        existing ones must be free (one instance at a time), new ones valid and in quota."""
        out: list[LocalVolume] = []
        for n, want in enumerate(wanted):
            if want.ref is not None:
                vol = self.lookup(want.ref)
                if vol.attached_to is not None or any(v is vol for v in out):
                    raise ItemError(
                        f"volume '{vol.name}' is already attached to instance "
                        f"'{vol.attached_name}'",
                        code=CODE_CANNOT_BE_USED,
                    )
            else:
                name = want.name if want.name is not None else f"{instance_name}-vol{n}"
                if any(v.name == name for v in out):
                    raise ItemError(f"volume name '{name}' is used twice", code=CODE_INVALID)
                vol = self.new(
                    name=name,
                    size_mb=want.size_mb,
                    tags=want.tags,
                    persistent=False,
                    extra=sum(1 for v in out if v.uuid not in self.records),
                )
            out.append(vol)
        return out

    def attach(
        self, vols: list[LocalVolume], wanted: list[VolumeAttach], uuid: str, name: str
    ) -> None:
        """Record `vols` (from `resolve_for`) as attached to the instance `uuid`."""
        for vol, want in zip(vols, wanted, strict=True):
            vol.attached_to, vol.attached_name = uuid, name
            vol.at, vol.readonly = want.at, want.readonly
            self._add(vol)
        if vols:  # why: most creates attach nothing; a durable write per create held the loop
            self.save()

    def attached(self, uuid: str) -> list[LocalVolume]:
        return [v for v in self.records.values() if v.attached_to == uuid]

    def release(self, uuid: str) -> list[LocalVolume]:
        """Detach every volume of a deleted instance; the non-persistent ones are dropped and
        returned (their directories are the caller's to remove)."""
        gone: list[LocalVolume] = []
        attached = self.attached(uuid)
        for vol in attached:
            vol.attached_to = vol.attached_name = vol.at = None
            vol.readonly = False
            if not vol.persistent:
                self.records.pop(vol.uuid, None)
                self._by_name.pop(vol.name, None)
                gone.append(vol)
        if attached:
            self.save()
        return gone

    def check_deletable(self, vol: LocalVolume) -> None:
        if vol.attached_to is not None:
            raise ItemError(
                f"volume '{vol.name}' is attached to instance '{vol.attached_name}'",
                code=CODE_CANNOT_BE_USED,
            )

    @staticmethod
    def wire(vol: LocalVolume, mounted: bool, details: bool) -> dict[str, Any]:
        item = vol.to_wire(mounted=mounted) if details else vol.identity()
        item["status"] = "success"
        return item
