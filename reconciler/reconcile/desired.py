"""The desired state: what the specs declare, as values the pure planner compares.

`build_session` turns one `LoadedSession` plus a scan of its local tree into a
`DesiredSession` (what the planner sees) and a `SessionContext` (what the executor needs,
secrets included). Sessions that share one status file form a `Group`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from reconciler import errors
from reconciler.cloud.metros import MetroConnection, metro_label
from reconciler.cloud.model import Instance
from reconciler.reconcile import identity, sessionkeys
from reconciler.spec.loader import LoadedSession, load_specs
from reconciler.spec.models import (
    DEFAULT_EXEC,
    DEFAULT_MEMORY_MB,
    DEFAULT_SHELL,
    SessionSpec,
    missing_secret_env,
    spec_hash,
)
from reconciler.status.journal import status_path_for
from reconciler.sync import capability
from reconciler.sync import engine as sync_engine
from reconciler.sync.capability import Tools
from reconciler.sync.ignore import matcher
from reconciler.sync.options import SyncOptions
from reconciler.transport import select
from reconciler.transport.base import Credentials, Target

__all__ = [
    "CommandIntent",
    "DesiredSession",
    "Group",
    "SessionContext",
    "TreeState",
    "build_session",
    "command_intents",
    "credentials_for",
    "group_sessions",
    "instance_credentials",
    "load_groups",
    "secret_missing_message",
    "session_env",
    "sync_options_for",
    "target_for",
    "transport_of",
]


@dataclass(frozen=True)
class TreeState:
    """The local tree as the sync engine sees it (scanned by the observer)."""

    digest: str
    files: int
    bytes: int
    uploads: tuple[str, ...] = ()
    upload_bytes: int = 0
    deletes: tuple[str, ...] = ()
    #: set when the tree cannot be synced (missing root, emptied root): nothing will be sent
    halted: str | None = None
    #: the sync path an earlier contact found, and for which instance uuid (`sync.capability`)
    tools: tuple[str, Tools] | None = None
    #: False: not scanned yet (an observation made while the tree is scanned); `halted` then
    #: says what can be told without a walk
    scanned: bool = True


@dataclass(frozen=True)
class CommandIntent:
    name: str
    run: str
    timeout_s: float
    #: its `inputs` patterns; None: every synced file is an input
    inputs: tuple[str, ...] | None = None
    #: the shell it runs under
    shell: str = DEFAULT_SHELL
    #: digest of the synced files its `inputs` match ("" without `inputs`)
    inputs_digest: str = ""
    #: those of its inputs about to be sent or deleted (what changed since the last push)
    inputs_changed: tuple[str, ...] = ()


@dataclass(frozen=True)
class DesiredSession:
    name: str
    metro: str
    instance_name: str
    instance_hash: str
    image: str
    ttl_s: float | None
    spec_hash: str
    commands: tuple[CommandIntent, ...]
    #: hash of env + secret values (salted by the caller): a change re-runs commands
    env_fingerprint: str
    tree: TreeState
    #: the same without the secret values (their names only): what commands are judged by
    #: when a secret's controller variable is not set
    public_fingerprint: str = ""
    #: `file:line: field: why` of each secret_env entry whose controller variable is not
    #: set (only an action that passes secrets, a command, needs it)
    secrets_missing: tuple[str, ...] = ()
    back: tuple[str, ...] = ()
    tags: tuple[str, ...] = field(default=())
    #: (files, bytes) the last sync-back brought, for the plan's estimate
    back_known: tuple[int, int] = (0, 0)
    #: `sync.back_delete`: sync-back mirrors remote deletions of files it brought back
    back_delete: bool = False
    #: the transport (`exec`) the session's instance is made for and reached with
    transport: str = DEFAULT_EXEC
    #: the transport's credentials for the session are there (an existing instance accepts
    #: only the ones it was created with: without them it is unreachable)
    credentials_present: bool = True
    #: what those credentials are called in messages ("ssh key")
    credentials_noun: str = "credentials"
    #: what the transport warns about (shown by plan and apply)
    warnings: tuple[str, ...] = ()
    #: the memory the instance is created with (MiB)
    memory_mb: int = DEFAULT_MEMORY_MB
    #: the size of the volume `/workspace` lives on (MiB); None: it lives in `memory_mb`
    volume_mb: int | None = None
    #: the platform deletes the instance once down this long (ms); None: never (`autokill`)
    autokill_ms: int | None = None
    #: a converged one-shot apply suspends the instance (`suspend`)
    suspend: bool = False


@dataclass
class Group:
    """Sessions that share one status file (one spec directory)."""

    base_dir: Path
    sessions: list[LoadedSession]
    #: `--status PATH` overrides where the status file lives (keys and records stay in .ukc/)
    status_override: Path | None = None
    #: the names of the spec files given, when the directory was not given whole: the
    #: directory's other spec files may declare the status file's other sessions
    only_files: frozenset[str] | None = None

    @property
    def status_path(self) -> Path:
        if self.status_override is not None:
            return self.status_override
        return status_path_for(self.base_dir)

    def __post_init__(self) -> None:
        check_state_links(self.base_dir / ".ukc")

    @property
    def state_dir(self) -> Path:
        return self.base_dir / ".ukc"


def check_state_links(state_dir: Path) -> None:
    """Refuse a checkout that brings a symlink in its `.ukc/`: the dir itself, or an entry of
    it, of `keys/`, of `sync/` or of a session's sync dir (ukc makes no link there itself).

    why: the checkout is untrusted (a pull request may commit `.ukc/keys -> /etc` and name a
    session `passwd`), and ukc writes there as the user running it: keys (after a chmod 0700
    of `keys/`), journals, records, the holder line at the start of `status.lock`; it removes
    a deleted session's key and sync dir whole. Through a link, all of it happened wherever
    the link pointed.
    """
    if state_dir.is_symlink():
        _linked(state_dir)
    dirs = [state_dir, state_dir / "keys", state_dir / "sync"]
    with contextlib.suppress(OSError), os.scandir(state_dir / "sync") as sessions:
        dirs += [Path(e.path) for e in sessions if e.is_dir(follow_symlinks=False)]
    for path in dirs:
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_symlink():
                        _linked(Path(entry.path))
        except (FileNotFoundError, NotADirectoryError):
            continue


def _linked(path: Path) -> None:
    raise errors.UsageError(
        f"{path} is a symlink: ukc writes its keys and records in .ukc/ and never through a "
        "link (a checkout may bring one pointing anywhere); remove it"
    )


@dataclass
class SessionContext:
    """What the executor needs to act for one session (holds secret values: never print it)."""

    loaded: LoadedSession
    desired: DesiredSession
    sync_options: SyncOptions
    credentials: Credentials
    env: dict[str, str] = field(repr=False)
    secret_values: tuple[str, ...] = field(repr=False)
    manifest: sync_engine.Manifest | None = field(default=None, repr=False)


def group_sessions(loaded: Iterable[LoadedSession]) -> list[Group]:
    groups: dict[Path, Group] = {}
    for item in loaded:
        groups.setdefault(item.base_dir, Group(item.base_dir, [])).sessions.append(item)
    return list(groups.values())


def load_groups(
    paths: Sequence[Path], environ: Mapping[str, str], status_override: Path | None = None
) -> list[Group]:
    """The sessions of the spec files or directories in `paths`, by status file.

    With no session at all, still a group per given directory, so prune and status know
    where to look.
    """
    targets = list(paths) or [Path(".")]
    groups = group_sessions(load_specs(targets, environ).sessions)
    if not groups:
        for p in targets:
            base = p if p.is_dir() else p.parent
            groups.append(Group(base.resolve(), []))
    whole = {p.resolve() for p in targets if p.is_dir()}
    for g in groups:
        if g.base_dir.resolve() not in whole:
            g.only_files = frozenset(s.file.name for s in g.sessions)
    if status_override is not None:
        for g in groups:
            g.status_override = status_override
    return groups


def sync_options_for(group: Group, loaded: LoadedSession) -> SyncOptions:
    s = loaded.spec
    return SyncOptions(
        local_root=loaded.directory,
        exclude=tuple(s.sync.exclude),
        back=tuple(s.sync.back),
        back_delete=s.sync.back_delete,
        compress=s.sync.compress,
        state_dir=group.state_dir / "sync" / s.name,
        session=s.name,
        back_max_bytes=s.sync.back_max_bytes,
        back_max_files=s.sync.back_max_files,
        back_max_refused=s.sync.back_max_refused,
        timeout_s=float(s.sync.timeout),
        idle_timeout_s=float(s.sync.idle_timeout),
    )


def target_for(inst: Instance, conn: MetroConnection) -> Target:
    """What a transport connects to: the instance, reached through its metro."""
    return Target(inst.name, inst.fqdn, conn.reach, inst.uuid, conn.api)


def credentials_for(
    group: Group, session: str, key_root: bytes | None = None, nonce: str | None = None
) -> Credentials:
    """Where the session's transport keeps its secrets (`.ukc/keys/<session>`); with the
    project's key root (`UKC_SESSION_SECRET`) and the instance's key nonce, also the seed
    they are derived from (see `sessionkeys`)."""
    path = group.state_dir / "keys" / session
    if key_root is None or nonce is None:
        return Credentials(path)
    return Credentials(path, seed=sessionkeys.seed(key_root, session, nonce))


def instance_credentials(
    group: Group, session: str, owner: identity.Owner, inst: Instance | None
) -> Credentials:
    """The credentials that open `inst` (derived when it carries a key nonce and this runner
    holds the secret; else this checkout's own key file)."""
    nonce = sessionkeys.nonce_of(inst.tags) if inst is not None else None
    return credentials_for(group, session, owner.key_root, nonce)


def transport_of(loaded: LoadedSession) -> str:
    """The transport a session is reached with: the one its `exec` names."""
    return loaded.spec.exec


def build_session(
    group: Group,
    loaded: LoadedSession,
    owner: identity.Owner,
    environ: Mapping[str, str],
    salt: bytes,
    on_change: Callable[[], None] | None = None,
    instance: Callable[[], Instance | None] = lambda: None,
    scan: bool = True,
) -> tuple[SessionContext, str | None]:
    """`instance()` is the one observed under the session's name (a claim: the planner proves
    it ours before anything uses it); its key nonce says which derived key opens it. Asked
    for after the scan: the observer lists the instances while the tree is scanned.
    Without `scan` the local tree is not read (a delete needs nothing of it): no manifest,
    an empty tree state marked not scanned."""
    s = loaded.spec
    env, secret_env, missing = session_env(s, environ)
    fingerprint = hashlib.sha256(
        salt + json.dumps([sorted(s.env.items()), sorted(secret_env.items())]).encode()
    ).hexdigest()[:32]
    public = hashlib.sha256(
        salt + json.dumps([sorted(s.env.items()), sorted(s.secret_env.items())]).encode()
    ).hexdigest()[:32]
    opts = sync_options_for(group, loaded)
    halted: str | None = None
    manifest = None
    pending: tuple[str, ...] = ()
    tree = TreeState(digest="", files=0, bytes=0, scanned=scan)
    try:
        if scan:
            manifest = sync_engine.scan_local(opts, on_change=on_change)
            transfer = sync_engine.plan_push(manifest, opts)
            tree = TreeState(
                digest=manifest.digest,
                files=manifest.file_count,
                bytes=manifest.total_bytes,
                uploads=tuple(transfer.uploads),
                upload_bytes=transfer.upload_bytes,
                deletes=tuple(transfer.deletes),
            )
            pending = tree.uploads + tree.deletes
            tree = replace(tree, tools=capability.recorded(opts))
    except errors.SyncHaltedError as err:
        halted = str(err)
        tree = TreeState(digest="", files=0, bytes=0, halted=halted)
    inst_hash = identity.instance_hash(s.image, s.memory_mb, s.workspace.volume_mb)
    transport = select.kind_for(transport_of(loaded))
    credentials = instance_credentials(group, s.name, owner, instance())
    desired = DesiredSession(
        name=s.name,
        metro=metro_label(s.metro),
        instance_name=identity.instance_name(owner.project, s.name),
        instance_hash=inst_hash,
        image=s.image,
        ttl_s=float(s.ttl) if s.ttl is not None else None,
        spec_hash=spec_hash(s),
        commands=command_intents(s, manifest, pending),
        env_fingerprint="" if missing else fingerprint,
        tree=tree,
        public_fingerprint=public,
        secrets_missing=tuple(secret_missing_message(loaded, k, v) for k, v in missing),
        back=tuple(s.sync.back),
        tags=(
            *identity.owner_tags(owner.project, s.name, inst_hash, owner.id),
            *((identity.group_tag(owner.group),) if owner.group else ()),
        ),
        back_known=_back_known(opts),
        back_delete=opts.back_delete,
        transport=transport.name,
        credentials_present=transport.credentials_present(credentials),
        credentials_noun=transport.credentials_noun,
        warnings=transport.warnings(s.name),
        memory_mb=s.memory_mb or DEFAULT_MEMORY_MB,
        volume_mb=s.workspace.volume_mb,
        autokill_ms=None if s.autokill_s is None else s.autokill_s * 1000,
        suspend=s.suspend,
    )
    ctx = SessionContext(
        loaded=loaded,
        desired=desired,
        sync_options=opts,
        credentials=credentials,
        env=env,
        secret_values=tuple(v for v in secret_env.values() if v),
        manifest=manifest,
    )
    return ctx, halted


def command_intents(
    spec: SessionSpec, manifest: sync_engine.Manifest | None, pending: Sequence[str]
) -> tuple[CommandIntent, ...]:
    """The spec's commands with the digest of the synced files each one's `inputs` match
    (`manifest`: the scanned tree; None when it could not be scanned) and which of the
    `pending` paths (about to be sent or deleted) those are."""
    intents = []
    # why: matching costs ~3 us a path (0.3 s for 100,000 files); commands often share inputs
    seen: dict[tuple[str, ...], tuple[str, tuple[str, ...]]] = {}
    for c in spec.commands:
        digest = ""
        changed: tuple[str, ...] = ()
        if c.inputs is not None and manifest is not None:
            if c.inputs not in seen:
                match = matcher(c.inputs)
                seen[c.inputs] = (
                    manifest.digest_of(
                        p for p, e in manifest.entries.items() if e.type != "d" and match(p)
                    ),
                    tuple(p for p in pending if match(p)),
                )
            digest, changed = seen[c.inputs]
        intents.append(
            CommandIntent(
                c.name,
                c.run,
                float(c.timeout),
                inputs=c.inputs,
                shell=c.shell or spec.shell,
                inputs_digest=digest,
                inputs_changed=changed,
            )
        )
    return tuple(intents)


def session_env(
    spec: SessionSpec, environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str], list[tuple[str, str]]]:
    """The environment the session's commands run with (`env`, then the `secret_env` values
    the controller has), its secret part, and the `secret_env` entries whose controller
    variable is not set."""
    missing = missing_secret_env(spec, environ)
    secret_env = {k: environ[v] for k, v in spec.secret_env.items() if (k, v) not in missing}
    return {**dict(spec.env), **secret_env}, secret_env, missing


def secret_missing_message(loaded: LoadedSession, sandbox_name: str, controller: str) -> str:
    """Where and which: never a value (there is none)."""
    return (
        f"{loaded.where_of('secret_env', sandbox_name)}: controller environment variable "
        f"{controller} is not set"
    )


def _back_known(opts: SyncOptions) -> tuple[int, int]:
    if not opts.back:
        return (0, 0)
    known = sync_engine.plan_pull(opts)
    return (known.known_files, known.known_bytes)
