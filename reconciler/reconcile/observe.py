"""The observer: reads the world (cloud instances, local trees, secrets) for the planner.

Reads only: never mutates anything remote, and writes nothing locally but the sync engine's
hash cache. One paginated, tag-filtered list per metro per pass, never one request per
session. Local trees are scanned with the hash cache so unchanged files are never re-hashed.
Everything the pure planner needs comes out of here as plain values.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from reconciler import errors
from reconciler.cloud.metros import MetroRegistry, metro_label
from reconciler.cloud.model import Instance, Volume
from reconciler.cloud.quotas import Quota
from reconciler.reconcile import identity
from reconciler.reconcile.desired import (
    DesiredSession,
    Group,
    SessionContext,
    build_session,
    sync_options_for,
    transport_of,
)
from reconciler.status.schema import StatusDoc
from reconciler.sync.options import SyncOptions

__all__ = ["Observation", "observe", "observe_quotas", "observe_volumes"]


@dataclass
class Observation:
    project: str
    #: this checkout as an owner (the planner proves ownership against it)
    owner: identity.Owner
    desired: list[DesiredSession]
    contexts: dict[str, SessionContext]
    #: instances carrying the project's tags, by instance name (claims, not proofs)
    instances: dict[str, Instance]
    #: the same, by the session their tags name
    claimed: dict[str, Instance]
    #: sessions whose tree cannot be synced, with the reason
    halted: dict[str, str]
    #: uuids of instances still listed that this checkout's status records as deleted: on
    #: their way out (a delete does not wait for the name), never claimed by a session
    dying: frozenset[str] = frozenset()


def observe(
    group: Group,
    doc: StatusDoc,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    *,
    only: set[str] | None = None,
    owner: identity.Owner,
    salt: bytes,
    on_tree_changed: Callable[[str, str, str, Instance, SyncOptions], None] | None = None,
    scan: bool = True,
) -> Observation:
    """List owned instances (one list per metro in use), then scan the local trees (not
    without `scan`: a delete reads nothing of them).

    `on_tree_changed(session, transport, metro, instance, sync options)` is called while a
    session's tree is being scanned, as soon as it is seen to differ from the last push, when
    the session's instance is running: the apply loop opens the connection the push will need
    meanwhile (and starts its sync helper). A hint only; nothing observed depends on it.
    """
    project = owner.project
    wanted = [loaded for loaded in group.sessions if only is None or loaded.spec.name in only]

    used = {metro_label(loaded.spec.metro) for loaded in wanted}
    recorded = {r.metro: name for name, r in doc.inventory().items() if r.metro}
    # why: a platform may still list an instance being deleted in another state than
    # `deleted` (it is force-stopped first); our own record of the delete says what it is
    deleted = {
        rec.instance.uuid
        for rec in doc.sessions.values()
        if rec.instance is not None and rec.instance.uuid and rec.instance.state == "deleted"
    }
    dying: set[str] = set()
    instances: dict[str, Instance] = {}
    claimed: dict[str, Instance] = {}
    metro_of: dict[str, str] = {}
    for metro in sorted(used | set(recorded)):
        try:
            conn = metros.get(metro)
        except errors.UsageError as err:
            if metro in used:
                raise
            # why: a status file comes with the checkout; it names a metro, it does not
            # choose where the token goes
            raise errors.UsageError(
                f"{group.status_path}: session {recorded[metro]!r} was recorded on a metro "
                f"ukc will not use: {err}"
            ) from None
        for inst in conn.api.list_instances([f"ukc.project={project}"]):
            session = identity.session_from_tags(inst.tags, project)
            if session is None:
                continue  # not even claimed by a session of this project
            if inst.uuid in deleted:
                dying.add(inst.uuid)
                continue
            instances[inst.name] = inst
            claimed[session] = inst
            metro_of[session] = metro

    records = {name: rec.instance for name, rec in doc.sessions.items()}
    contexts: dict[str, SessionContext] = {}
    halted: dict[str, str] = {}
    for loaded in wanted:
        name = loaded.spec.name
        hint = None
        mine = claimed.get(name)
        if (
            on_tree_changed is not None
            and mine is not None
            and mine.state == "running"
            and identity.prove(mine, owner, name, records.get(name)).ours
        ):
            hint = functools.partial(
                on_tree_changed,
                name,
                transport_of(loaded),
                metro_of[name],
                mine,
                sync_options_for(group, loaded),
            )
        named = instances.get(identity.instance_name(project, name))
        ctx, why = build_session(group, loaded, owner, environ, salt, hint, named, scan=scan)
        contexts[name] = ctx
        if why is not None:
            halted[name] = why
    return Observation(
        project=project,
        owner=owner,
        desired=[c.desired for c in contexts.values()],
        contexts=contexts,
        instances=instances,
        claimed=claimed,
        halted=halted,
        dying=frozenset(dying),
    )


def observe_volumes(
    metros: MetroRegistry, project: str, labels: Iterable[str]
) -> dict[str, list[Volume]]:
    """The volumes carrying the project's tags on each metro in `labels`, by the session
    their tags claim (claims, not proofs)."""
    found: dict[str, list[Volume]] = {}
    for metro in sorted(set(labels)):
        for vol in metros.get(metro).api.list_volumes([f"ukc.project={project}"]):
            session = identity.session_from_tags(vol.tags, project)
            if session is not None:
                found.setdefault(session, []).append(vol)
    return found


def observe_quotas(
    metros: MetroRegistry, labels: Iterable[str]
) -> tuple[dict[str, Quota], list[str]]:
    """The account's quota on each metro in `labels`, and a warning for each metro whose
    quota could not be read (a missing or unreadable answer never stops an apply)."""
    found: dict[str, Quota] = {}
    warnings: list[str] = []
    for metro in sorted(set(labels)):
        try:
            found[metro] = metros.get(metro).api.get_quotas()
        except errors.UkcError as err:
            warnings.append(f"the quota of metro {metro} was not checked: {err}")
    return found, warnings
