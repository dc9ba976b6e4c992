"""Diffing: local manifest vs the previous remote state -> `TransferPlan`. Pure.

`previous` is our last push record when planning, and the remote record (when it is trusted,
else a fresh remote scan) when pushing. Safety rules live here so they are easy to test: a delete is
only ever of a path present in `previous` and absent locally, never the root, never an excluded
path, never a sync-back path or a directory holding one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from reconciler.sync.ignore import IgnoreRules
from reconciler.sync.manifest import Basis, Manifest

__all__ = ["TransferPlan", "changes_of", "diff_manifests"]

#: changed paths whose entries are copied rather than the whole tree's length asked for (a
#: probed tree's length is a parse of its whole index: `journal.probe`)
_FEW = 4096
#: where `changes_of` keeps its answer on a manifest
_MEMO = "_changes_of"


@dataclass(frozen=True)
class TransferPlan:
    """What a push will do.

    `uploads`: paths to (re)create remotely with their content (files, dirs, links), parents
    first. `metas`: files whose content is already there but whose mode or mtime differ.
    `deletes`: remote paths to remove, deepest first. `replaces`: paths whose type changed
    (file <-> dir <-> link): the old object is removed after the deletes, then recreated, so an
    error earlier in the sync leaves it untouched. `upload_bytes`: file content bytes to send.
    """

    uploads: tuple[str, ...] = ()
    metas: tuple[str, ...] = ()
    deletes: tuple[str, ...] = ()
    replaces: tuple[str, ...] = ()
    upload_bytes: int = 0
    reason: str = ""

    @property
    def empty(self) -> bool:
        return not (self.uploads or self.metas or self.deletes or self.replaces)

    @property
    def upload_files(self) -> int:
        return len(self.uploads)


def diff_manifests(
    local: Manifest, previous: Manifest, rules: IgnoreRules, *, reason: str = ""
) -> TransferPlan:
    """The plan that turns `previous` (what the remote holds) into `local`."""
    uploads: list[str] = []
    metas: list[str] = []
    replaces: list[str] = []
    upload_bytes = 0
    prev = previous.entries
    for path in sorted(local.entries):
        mine = local.entries[path]
        theirs = prev.get(path)
        if theirs is not None and theirs.type != mine.type:
            replaces.append(path)
            theirs = None
        if theirs is None:
            uploads.append(path)
            upload_bytes += mine.size if mine.type == "f" else 0
        elif mine.type == "f":
            if mine.ref != theirs.ref or mine.size != theirs.size:
                uploads.append(path)
                upload_bytes += mine.size
            elif mine.mode != theirs.mode or mine.mtime_ns != theirs.mtime_ns:
                metas.append(path)
        elif mine.type == "l":
            if mine.ref != theirs.ref:
                replaces.append(path)
                uploads.append(path)
        elif mine.mode != theirs.mode:
            uploads.append(path)  # a dir: mkdir is idempotent and applies the mode
    deletes = [
        p
        for p, e in prev.items()
        if p not in local.entries and p and rules.deletable(p, e.type == "d")
    ]
    # a replaced path under a back path or excluded must never be touched
    replaces = [p for p in replaces if rules.deletable(p, prev[p].type == "d")]
    # deepest first, so a directory is emptied before it is removed
    deletes.sort(key=lambda p: (-p.count("/"), p))
    return TransferPlan(
        uploads=tuple(uploads),
        metas=tuple(metas),
        deletes=tuple(deletes),
        replaces=tuple(sorted(replaces)),
        upload_bytes=upload_bytes,
        reason=reason,
    )


def changes_of(
    local: Manifest, basis: Basis, rules: IgnoreRules, *, reason: str = ""
) -> tuple[Manifest, TransferPlan]:
    """The plan from `basis`'s state to `local` when only `basis.old`'s paths changed: the
    diff of those paths alone (a path's action depends on its own two entries only), and the
    part of the previous state it was judged against.

    An apply asks twice of the same tree and basis, the plan and then the push (the second
    time with the sandbox waiting for its first upload; bench/PROFILE.md, session 32): the
    answer is kept on `local` for its basis and rules."""
    memo = local.__dict__.get(_MEMO)
    if memo is not None and memo[0] is basis and memo[1] == rules.key:
        previous, plan = memo[2]
        return previous, plan if plan.reason == reason else replace(plan, reason=reason)
    previous = Manifest({p: e for p, e in basis.old.items() if e is not None})
    entries = local.entries
    if (
        len(basis.old) > _FEW
        and len(basis.old) >= len(entries)
        and basis.old.keys() >= entries.keys()
    ):
        # every path changed (a first push over a seeded sandbox): no copy of 100,000 entries
        plan = diff_manifests(local, previous, rules, reason=reason)
    else:
        mine = {p: entries[p] for p in basis.old if p in entries}
        plan = diff_manifests(Manifest(mine), previous, rules, reason=reason)
    # (a manifest is frozen, and never changes once made: what it caches lives as long)
    local.__dict__[_MEMO] = (basis, rules.key, (previous, plan))
    return previous, plan
