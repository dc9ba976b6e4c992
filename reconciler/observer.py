"""The observer: reads the world (cloud instances, local trees, secrets) for the planner.

Reads only, never mutates anything remote. One paginated, tag-filtered list per metro per
pass, never one request per session. Local trees are scanned with the sync engine's hash cache
so unchanged files are never re-hashed. Everything the pure planner needs comes out of here
as plain values.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from reconciler import errors, naming, ownership, planner, spec, status
from reconciler._util.atomic import create_atomic, write_atomic
from reconciler.backends import Instance
from reconciler.metro import MetroRegistry, metro_label
from reconciler.sync import engine as sync_engine
from reconciler.sync.options import SyncOptions

__all__ = ["Group", "Observation", "SessionContext", "group_sessions", "observe"]


@dataclass
class Group:
    """Sessions that share one status file (one spec directory)."""

    base_dir: Path
    sessions: list[spec.LoadedSession]
    #: `--status PATH` overrides where the status file lives (keys and records stay in .ukc/)
    status_override: Path | None = None

    @property
    def status_path(self) -> Path:
        if self.status_override is not None:
            return self.status_override
        return status.status_path_for(self.base_dir)

    @property
    def state_dir(self) -> Path:
        return self.base_dir / ".ukc"


@dataclass
class SessionContext:
    """What the executor needs to act for one session (holds secret values: never print it)."""

    loaded: spec.LoadedSession
    desired: planner.DesiredSession
    sync_options: SyncOptions
    key_path: Path
    env: dict[str, str] = field(repr=False)
    secret_values: tuple[str, ...] = field(repr=False)
    manifest: sync_engine.Manifest | None = field(default=None, repr=False)


@dataclass
class Observation:
    project: str
    #: this checkout as an owner (the planner proves ownership against it)
    owner: ownership.Owner
    desired: list[planner.DesiredSession]
    contexts: dict[str, SessionContext]
    #: instances carrying the project's tags, by instance name (claims, not proofs)
    instances: dict[str, Instance]
    #: the same, by the session their tags name
    claimed: dict[str, Instance]
    #: sessions whose tree cannot be synced, with the reason
    halted: dict[str, str]


def group_sessions(loaded: Iterable[spec.LoadedSession]) -> list[Group]:
    groups: dict[Path, Group] = {}
    for item in loaded:
        groups.setdefault(item.base_dir, Group(item.base_dir, [])).sessions.append(item)
    return list(groups.values())


def _salt(state_dir: Path) -> bytes:
    """A per-project random salt, so hashes of secret values in the status file reveal nothing.

    Written through a temp file and a rename: a kill mid-write never leaves a short salt behind
    (a short one is replaced; that only makes commands with secrets run once more). A writer
    killed before its rename left no salt, so the next call writes one and sweeps its temp file.
    """
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


def load_owner(state_dir: Path, project: str, environ: Mapping[str, str]) -> ownership.Owner:
    """This checkout as an owner: the id derived from `UKC_SESSION_SECRET`, else the random
    id in `.ukc/owner` (created on first use, 0600). With a secret, an id this checkout made
    earlier still proves ownership of the instances it made before the secret was set."""
    path = state_dir / "owner"
    earlier = _read_owner_file(path)
    secret = environ.get(ownership.SECRET_VAR, "")
    if secret:
        if len(secret) < MIN_SECRET_LEN:
            raise errors.UsageError(
                f"{ownership.SECRET_VAR} is {len(secret)} characters; use at least "
                f"{MIN_SECRET_LEN} random ones (e.g. from `openssl rand -hex 32`)"
            )
        primary = ownership.owner_id_from_secret(secret, project)
        accepted = {primary} | ({earlier} if earlier else set())
        return ownership.Owner(project, primary, frozenset(accepted), ownership.SECRET_VAR)
    if earlier is None:
        state_dir.mkdir(parents=True, exist_ok=True)
        fresh = secrets.token_hex(ownership.OWNER_ID_LEN // 2)
        # why exclusive: a concurrent `ukc plan` must not replace the id an apply tags with
        create_atomic(path, (fresh + "\n").encode(), mode=0o600)
        earlier = _read_owner_file(path)
        assert earlier is not None
    return ownership.Owner(project, earlier, frozenset({earlier}), str(path))


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


def sync_options_for(group: Group, loaded: spec.LoadedSession) -> SyncOptions:
    s = loaded.spec
    return SyncOptions(
        local_root=loaded.directory,
        exclude=tuple(s.sync.exclude),
        back=tuple(s.sync.back),
        back_delete=s.sync.back_delete,
        state_dir=group.state_dir / "sync" / s.name,
        session=s.name,
        back_max_bytes=s.sync.back_max_bytes,
        back_max_files=s.sync.back_max_files,
        back_max_refused=s.sync.back_max_refused,
        timeout_s=float(s.sync.timeout),
        idle_timeout_s=float(s.sync.idle_timeout),
    )


def key_path_for(group: Group, session: str) -> Path:
    return group.state_dir / "keys" / session


def _context(
    group: Group,
    loaded: spec.LoadedSession,
    owner: ownership.Owner,
    environ: Mapping[str, str],
    salt: bytes,
    on_change: Callable[[], None] | None = None,
) -> tuple[SessionContext, str | None]:
    s = loaded.spec
    secret_env = spec.resolve_secret_env(s, environ)
    env = {**dict(s.env), **secret_env}
    fingerprint = hashlib.sha256(
        salt + json.dumps([sorted(s.env.items()), sorted(secret_env.items())]).encode()
    ).hexdigest()[:32]
    opts = sync_options_for(group, loaded)
    halted: str | None = None
    manifest = None
    try:
        manifest = sync_engine.scan_local(opts, on_change=on_change)
        transfer = sync_engine.plan_push(manifest, opts)
        tree = planner.TreeState(
            digest=manifest.digest,
            files=manifest.file_count,
            bytes=manifest.total_bytes,
            uploads=tuple(transfer.uploads),
            upload_bytes=transfer.upload_bytes,
            deletes=tuple(transfer.deletes),
        )
    except errors.SyncHaltedError as err:
        halted = str(err)
        tree = planner.TreeState(digest="", files=0, bytes=0, halted=halted)
    inst_hash = naming.instance_hash(s.image, s.memory_mb)
    desired = planner.DesiredSession(
        name=s.name,
        metro=metro_label(s.metro),
        instance_name=naming.instance_name(owner.project, s.name),
        instance_hash=inst_hash,
        image=s.image,
        ttl_s=float(s.ttl) if s.ttl is not None else None,
        spec_hash=spec.spec_hash(s),
        commands=tuple(planner.CommandIntent(c.name, c.run, float(c.timeout)) for c in s.commands),
        env_fingerprint=fingerprint,
        tree=tree,
        back=tuple(s.sync.back),
        tags=tuple(naming.owner_tags(owner.project, s.name, inst_hash, owner.id)),
        back_known=_back_known(opts),
        back_delete=opts.back_delete,
        key_present=key_path_for(group, s.name).exists(),
        exec_mode=s.exec,
    )
    ctx = SessionContext(
        loaded=loaded,
        desired=desired,
        sync_options=opts,
        key_path=key_path_for(group, s.name),
        env=env,
        secret_values=tuple(v for v in secret_env.values() if v),
        manifest=manifest,
    )
    return ctx, halted


def _back_known(opts: SyncOptions) -> tuple[int, int]:
    if not opts.back:
        return (0, 0)
    known = sync_engine.plan_pull(opts)
    return (known.known_files, known.known_bytes)


def observe(
    group: Group,
    doc: status.StatusDoc,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    *,
    only: set[str] | None = None,
    on_tree_changed: Callable[[str, str, Instance], None] | None = None,
) -> Observation:
    """List owned instances (one list per metro in use), then scan the local trees.

    `on_tree_changed(session, metro, instance)` is called while a session's tree is being
    scanned, as soon as it is seen to differ from the last push, when the session's instance is
    running: the apply loop opens the connection the push will need meanwhile. A hint only;
    nothing observed depends on it.
    """
    project = naming.project_id(group.base_dir, environ)
    owner = load_owner(group.state_dir, project, environ)
    salt = _salt(group.state_dir)
    wanted = [loaded for loaded in group.sessions if only is None or loaded.spec.name in only]

    used = {metro_label(loaded.spec.metro) for loaded in wanted}
    recorded = {r.metro: name for name, r in doc.inventory().items() if r.metro}
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
            session = naming.session_from_tags(inst.tags, project)
            if session is None:
                continue  # not even claimed by a session of this project
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
            and ownership.prove(mine, owner, name, records.get(name)).ours
        ):
            hint = functools.partial(on_tree_changed, name, metro_of[name], mine)
        ctx, why = _context(group, loaded, owner, environ, salt, hint)
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
    )
