"""Host uid/gid ranges for the sandboxes of a root daemon: one range of 65536 ids per instance.

A sandbox's user namespace maps its ids 0..65535 onto its own host range, so `root` inside is
an unprivileged host uid that owns nothing on the host but its workspace, and no two instances
(of any daemon on the machine) share a uid. Ranges are `FIRST + slot * 65536`, slot 0..4093:
0x70000000..0x7FFDFFFF, above the container ranges systemd hands out and below both its
foreign range and the ids that tools treat as negative.

Claims are machine-wide, in `/var/lib/ukc-local/ids/<slot>` (root-only), each naming the
instance dir that owns the slot; the instance dir keeps its slot in `ids`, so an instance keeps
its range (and its workspace stays writable) across restarts of its sandbox and of the daemon.
A claim whose instance dir is gone or names another slot is stale and is reused once no slot
is left that no claim names: a state dir deleted without `ukc delete` leaks nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from reconciler._util.atomic import write_atomic
from reconciler.errors import LocalMetroError

__all__ = ["FIRST_ID", "IDS_PER_INSTANCE", "REGISTRY", "SLOTS", "HostIds", "IdRange"]

FIRST_ID = 0x70000000
IDS_PER_INSTANCE = 65536
SLOTS = (0x7FFE0000 - FIRST_ID) // IDS_PER_INSTANCE
REGISTRY = Path("/var/lib/ukc-local/ids")
_OWNER_FILE = "ids"


@dataclass(frozen=True)
class IdRange:
    """Host ids `base .. base + count - 1`, seen as `0 .. count - 1` inside the sandbox."""

    slot: int
    base: int
    count: int = IDS_PER_INSTANCE

    def host_id(self, inner: int) -> int:
        """The host id of `inner`; any host id folds into the range by its low 16 bits."""
        return self.base + (inner % self.count)


def _range(slot: int) -> IdRange:
    return IdRange(slot=slot, base=FIRST_ID + slot * IDS_PER_INSTANCE)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class HostIds:
    """Claims and releases id ranges in a root-only registry directory."""

    def __init__(self, registry: Path = REGISTRY, slots: int = SLOTS) -> None:
        self.registry = registry
        self.slots = slots

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.registry.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(self.registry)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            raise LocalMetroError(
                f"id registry {self.registry} is not a directory owned by uid {os.geteuid()}"
            )
        os.chmod(self.registry, 0o700)
        fd = os.open(self.registry / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _holder(self, slot: int) -> Path | None:
        """The instance dir that validly holds `slot`, or None when the slot is free."""
        try:
            owner = Path((self.registry / str(slot)).read_text().strip())
        except OSError:
            return None
        return owner if _read_int(owner / _OWNER_FILE) == slot else None

    def _free_slot(self) -> int | None:
        """The lowest slot no claim names, else the lowest whose claim is stale, else None.

        why one listing first: checking every claim in turn reads two files per slot held on
        the machine, for every new instance (quadratic in a fan-out); a slot no file names is
        free without reading anything
        """
        claimed = {int(n) for n in os.listdir(self.registry) if n.isdigit()}
        unclaimed = next((s for s in range(self.slots) if s not in claimed), None)
        if unclaimed is not None:
            return unclaimed
        return next((s for s in range(self.slots) if self._holder(s) is None), None)

    def _write(self, path: Path, text: str) -> None:
        # why: not fsync'd (a claim is rewritten at every start of its sandbox); a claim lost
        # in a crash is taken again by its owner or leaves the owner a fresh range
        write_atomic(path, text.encode(), mode=0o600, durable=False)

    def claim(self, owner: Path) -> IdRange:
        """The range of the instance dir `owner` (created), claiming a free one the first time."""
        owner = owner.absolute()
        with self._locked():
            mine = _read_int(owner / _OWNER_FILE)
            if mine is not None and mine < self.slots:
                holder = self._holder(mine)
                if holder is None or holder == owner:
                    self._write(self.registry / str(mine), f"{owner}\n")
                    return _range(mine)
            slot = self._free_slot()
            if slot is not None:
                owner.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._write(self.registry / str(slot), f"{owner}\n")
                self._write(owner / _OWNER_FILE, f"{slot}\n")
                return _range(slot)
        raise LocalMetroError(
            f"no free host id range: all {self.slots} ranges of {IDS_PER_INSTANCE} ids from "
            f"{FIRST_ID} are held by instances; delete some instances"
        )

    def release(self, owner: Path) -> None:
        """Give the range of `owner` back (a no-op when it holds none)."""
        owner = owner.absolute()
        with self._locked():
            mine = _read_int(owner / _OWNER_FILE)
            if mine is not None and self._holder(mine) == owner:
                (self.registry / str(mine)).unlink(missing_ok=True)
            (owner / _OWNER_FILE).unlink(missing_ok=True)
