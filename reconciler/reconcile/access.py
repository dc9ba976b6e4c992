"""Reaching one session from the command line (`ukc ssh`, `ukc exec`, `ukc logs`) and
listing the sessions on a metro (`ukc ls`).

A session is reached as apply reaches it, never otherwise: its instance must be provably this
checkout's (`identity.prove`), it must be the very instance the status file records (same
name and uuid), and every connection must present the host key pinned there. A changed key
is refused, never learnt here: only apply learns the key of an instance it has just created.
Nothing here changes the instance, the status file or the sync records.

Secrets: `ukc exec` runs with the session's `env` and the `secret_env` values the controller
has; they travel like apply's commands (on the command's stdin, never on a command line), and
its output is redacted before it is printed. `ukc ssh` gives a login shell in /workspace
without the session's environment: what the user types there is theirs.
"""

from __future__ import annotations

import contextlib
import shlex
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from reconciler import errors
from reconciler.cloud.metros import MetroConnection, MetroRegistry
from reconciler.cloud.model import ConsoleLog, Instance
from reconciler.reconcile import identity
from reconciler.reconcile.desired import (
    Group,
    instance_credentials,
    secret_missing_message,
    session_env,
    target_for,
    transport_of,
)
from reconciler.reconcile.plan import parse_time
from reconciler.reconcile.redaction import Redactor
from reconciler.reconcile.wake import wake
from reconciler.spec.durations import format_duration
from reconciler.spec.loader import LoadedSession
from reconciler.status import journal
from reconciler.status.schema import CommandRecord, SessionStatus, format_time
from reconciler.transport import select
from reconciler.transport.base import Terminal, TerminalProcess, Transport

__all__ = [
    "CONNECT_DEADLINE_S",
    "LOGIN_SHELL",
    "ListedSession",
    "Reached",
    "command_line",
    "connect",
    "console_log",
    "exec_command",
    "follow_log",
    "interact",
    "list_sessions",
    "reach",
    "recorded",
    "stoppable",
]

#: how long a connection may wait for a sandbox waking from standby
CONNECT_DEADLINE_S = 60.0
#: what `ukc ssh` without a command runs: a login shell in the session's workspace
LOGIN_SHELL = 'cd /workspace 2>/dev/null; exec "${SHELL:-/bin/sh}" -l'
#: the exit status of a command stopped by Ctrl-C (as a shell reports SIGINT)
INTERRUPTED_EXIT = 130


@dataclass(frozen=True)
class Reached:
    """A session whose instance is proven ours and pinned: what a connection needs."""

    group: Group
    loaded: LoadedSession
    record: SessionStatus
    instance: Instance
    connection: MetroConnection
    owner: identity.Owner
    #: the host key the status file recorded for this very instance and boot (None only
    #: when reached without `connecting`)
    pin: str | None

    @property
    def name(self) -> str:
        return self.loaded.spec.name


def _expires_at(loaded: LoadedSession, inst: Instance, record: SessionStatus) -> float | None:
    """When the session's `ttl` passes (None: no ttl, or no creation time known)."""
    if loaded.spec.ttl is None:
        return None
    created = parse_time(inst.created_at)
    if created is None and record.instance is not None:
        created = parse_time(record.instance.created_at)
    return None if created is None else created + float(loaded.spec.ttl)


def recorded(group: Group, session: str) -> tuple[LoadedSession, SessionStatus]:
    """The session's spec and what the status file records of it; an error when no spec
    declares it or it was never applied here."""
    loaded = next((s for s in group.sessions if s.spec.name == session), None)
    if loaded is None:
        known = ", ".join(sorted(s.spec.name for s in group.sessions)) or "none"
        raise errors.UsageError(f"no session {session!r} in the specs (known sessions: {known})")
    record = journal.load(group.status_path).sessions.get(session)
    if record is None:
        raise errors.UsageError(
            f"session {session!r} has no record in {group.status_path}: "
            f"run `ukc apply {loaded.file}` first"
        )
    return loaded, record


def reach(
    group: Group,
    session: str,
    metros: MetroRegistry,
    environ: Mapping[str, str],
    *,
    connecting: bool = True,
    now: Callable[[], float] = time.time,
) -> Reached:
    """The session's instance, proven ours, and (`connecting`: to open a connection to it)
    with the host key pinned for this boot, within its ttl, not stopped; an error naming
    what is missing (never applied, deleted, not ours, no pin) and what to run."""
    loaded, record = recorded(group, session)
    if record.instance is None or record.phase == "Deleted":
        raise errors.UsageError(
            f"session {session!r} has no instance recorded in {group.status_path}: "
            f"run `ukc apply {loaded.file}` first"
        )
    project = identity.project_id(group.base_dir, environ)
    owner = identity.load_owner(group.state_dir, project, environ)
    connection = metros.get(loaded.spec.metro)
    name = identity.instance_name(project, session)
    instance = connection.api.get_instance(name)
    if instance is None:
        raise errors.UsageError(
            f"session {session!r}: instance {name} is gone from metro {connection.label} "
            f"(deleted, or expired): run `ukc apply {loaded.file}` to create it again"
        )
    proof = identity.prove(instance, owner, session, record.instance)
    if not proof.ours:
        raise errors.OwnershipError(proof.refusal(instance))
    if connecting and instance.state == "standby":
        # an apply leaves the instance suspended, which traffic may not wake
        instance = wake(connection.api, instance, CONNECT_DEADLINE_S)
    pin = identity.boot_pin(record.instance, instance)
    if pin is None and instance.state == "running":
        # a wake may move `start_count` without being a cold boot (an apply leaves the
        # instance suspended): the sandbox is held to the host key recorded for the instance,
        # so a stateful wake is reached and a cold boot's new key is refused
        pin = identity.recorded_pin(record.instance, instance)
    if not connecting:
        return Reached(group, loaded, record, instance, connection, owner, pin)
    if not pin:
        why = "has no host key recorded for"
        if identity.recorded_pin(record.instance, instance):
            # a cold boot may bring new host keys: apply learns them, never a shell
            why = "recorded the host key of an earlier boot of"
        raise errors.UsageError(
            f"session {session!r}: this checkout {why} instance {instance.name} "
            f"(uuid {instance.uuid}): run `ukc apply {loaded.file}` first"
        )
    ttl = _expires_at(loaded, instance, record)
    if ttl is not None and now() >= ttl:
        raise errors.UsageError(
            f"session {session!r} expired at {format_time(ttl)} (ttl "
            f"{format_duration(int(loaded.spec.ttl or 0))}): `ukc apply {loaded.file}` deletes "
            "it; raise `ttl` in the spec to keep it"
        )
    if instance.state in ("stopped", "stopping", "draining"):
        raise errors.UsageError(
            f"session {session!r}: instance {instance.name} is {instance.state}: run "
            f"`ukc apply {loaded.file}` to start it"
        )
    return Reached(group, loaded, record, instance, connection, owner, pin)


def connect(reached: Reached, *, deadline_s: float = CONNECT_DEADLINE_S) -> Transport:
    """A connection to the session's sandbox over its own transport, with the pinned host
    key required (a sandbox presenting another is refused)."""
    if reached.pin is None:
        raise errors.UsageError(f"session {reached.name!r}: no host key pinned to connect with")
    kind = select.kind_for(
        identity.instance_transport(reached.instance, transport_of(reached.loaded))
    )
    target = target_for(reached.instance, reached.connection)
    credentials = instance_credentials(reached.group, reached.name, reached.owner, reached.instance)
    if not kind.credentials_present(credentials):
        raise errors.UsageError(
            f"session {reached.name!r}: its {kind.credentials_noun} is missing "
            f"({credentials.path}); `ukc apply` replaces the instance with a new key"
        )
    return kind.connect(target, credentials, pin=reached.pin, deadline_s=deadline_s)


def command_line(argv: Sequence[str]) -> str:
    """What `ukc exec NAME -- ARGV...` runs: one argument is a shell command line (`ukc exec
    s -- 'make && make test'`), several are one command with exactly those arguments."""
    if not argv:
        raise errors.UsageError("no command given: ukc exec NAME -- COMMAND [ARGS...]")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def exec_command(
    reached: Reached,
    transport: Transport,
    command: str,
    environ: Mapping[str, str],
    *,
    out: Callable[[bytes], None],
    err: Callable[[bytes], None],
    warn: Callable[[str], None],
    stop: Callable[[], bool] | None = None,
    timeout_s: float | None = None,
) -> int:
    """Run `command` in /workspace with the session's environment and shell, output
    streamed (secret values masked) as it comes; the command's exit status (130 when `stop`
    stopped it, 124 when it ran out of `timeout_s`). Not recorded in the status file."""
    spec = reached.loaded.spec
    env, secrets, missing = session_env(spec, environ)
    for sandbox_name, controller in missing:
        where = secret_missing_message(reached.loaded, sandbox_name, controller)
        warn(f"{where}; the command runs without {sandbox_name}")
    redactor = Redactor(v for v in secrets.values() if v)
    streams = {"out": redactor.stream(), "err": redactor.stream()} if redactor else {}

    def sink(which: str, write: Callable[[bytes], None]) -> Callable[[bytes], None]:
        if not streams:
            return write
        stream = streams[which]
        return lambda data: write(stream.feed(data).encode())

    result = transport.run(
        command,
        env=env,
        cwd="/workspace",
        timeout_s=timeout_s,
        on_stdout=sink("out", out),
        on_stderr=sink("err", err),
        stop=stop,
        shell=spec.shell,
    )
    if streams:
        out(streams["out"].close().encode())
        err(streams["err"].close().encode())
    if result.interrupted:
        return INTERRUPTED_EXIT
    if result.timed_out:
        return 124
    return result.exit_code if result.exit_code is not None else 1


def stoppable(command: str, token: str) -> tuple[str, str]:
    """`command` (run in /workspace) wrapped so that another channel can stop it, and the
    `kill_group` target that does. why: closing the channel of a command that has no
    terminal does not stop it (sshd only closes its pipes), so without this a Ctrl-C of
    `ukc ssh NAME -- CMD` would leave it running. The shell records its process group (sshd
    makes each session's command a session leader) or, if it leads none, its pid."""
    path = f"/tmp/.ukc-stop-{token}"
    line = (
        f"trap 'rm -f {path}; exit 143' TERM; "
        f"p=$$; kill -0 -$p 2>/dev/null && p=-$p; echo $p > {path}; "
        f"(cd /workspace 2>/dev/null; {command}\n); c=$?; rm -f {path}; exit $c"
    )
    return line, f'"$(cat {path} 2>/dev/null)"'


def interact(
    process: TerminalProcess,
    terminal: Terminal,
    *,
    poll_s: float = 0.05,
    stop: Callable[[], bool] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> int:
    """Relay a user's terminal and a sandbox process until the process exits: input to its
    stdin (end of input closes it), its stdout and stderr to the terminal, window size
    changes to its pseudo-terminal; its exit status. Once `stop()` is true, `on_stop()`
    stops the process and the status is `INTERRUPTED_EXIT`."""

    def pump(read: Callable[[int], bytes], write: Callable[[bytes], None]) -> None:
        with contextlib.suppress(Exception):  # the channel closed: the process is over
            while data := read(65536):
                write(data)

    pumps = [
        threading.Thread(target=pump, args=(process.read, terminal.write), daemon=True),
        threading.Thread(target=pump, args=(process.read_stderr, terminal.write_err), daemon=True),
    ]
    for thread in pumps:
        thread.start()
    reading = True
    while True:
        if terminal.resized():
            size = terminal.size()
            if size is not None:
                process.resize(*size)
        if reading:
            data = terminal.read(poll_s)
            if data == b"":
                reading = False
                process.close_stdin()
            elif data:
                try:
                    process.write(data)
                except errors.UkcError:
                    reading = False  # the process no longer reads: its exit follows
        if stop is not None and stop():
            if on_stop is not None:
                on_stop()
            process.kill()
            code = INTERRUPTED_EXIT
            break
        try:
            code = process.wait(0.0 if reading else poll_s)
            break
        except TimeoutError:
            continue
    for thread in pumps:
        thread.join(5.0)
    return code


def console_log(reached: Reached, *, tail_bytes: int | None) -> ConsoleLog:
    """The console of the session's instance: all the platform keeps, or its last
    `tail_bytes`."""
    api = reached.connection.api
    if tail_bytes is None:
        return api.instance_log(reached.instance.uuid, offset=0)
    return api.instance_log(reached.instance.uuid, offset=-tail_bytes)


def follow_log(
    reached: Reached,
    start: int,
    *,
    stop: Callable[[], bool],
    interval_s: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[bytes]:
    """What the console gains after byte `start`, as it comes, until `stop()`."""
    api = reached.connection.api
    offset = start
    while not stop():
        got = api.instance_log(reached.instance.uuid, offset=offset)
        if got.data:
            offset = got.end
            yield got.data
        elif got.available_end < offset:
            offset = got.available_end  # the platform dropped its oldest bytes
        else:
            sleep(interval_s)


def last_outputs(record: SessionStatus) -> list[CommandRecord]:
    """The session's commands that ran, in their order, with their output tails."""
    return [c for c in record.commands if c.started_at or c.stdout or c.stderr]


@dataclass(frozen=True)
class ListedSession:
    """One session instance on a metro, as its tags describe it (claims, not proofs)."""

    session: str
    project: str
    instance: Instance
    #: the owner id in its tags proves this checkout (or UKC_SESSION_SECRET) owns it
    ours: bool
    #: the `ttl` it was created with (seconds), from its tags
    ttl_s: int | None = None


def list_sessions(
    connection: MetroConnection, environ: Mapping[str, str], here: Group | None = None
) -> list[ListedSession]:
    """Every instance on the metro that carries ukc's tags, whatever its project, sorted
    by project and session. `ours` is proven with `UKC_SESSION_SECRET` for any project, and
    with this directory's own owner id for its own project (`here`, when it has one)."""
    secret = environ.get(identity.SECRET_VAR, "")
    local: tuple[str, frozenset[str]] | None = None
    if here is not None and (here.state_dir / "owner").exists():
        mine = identity.project_id(here.base_dir, environ)
        local = (mine, identity.load_owner(here.state_dir, mine, environ).accepted)
    found: list[ListedSession] = []
    for inst in connection.api.list_instances([identity.OWNER_TAG]):
        project = identity.tag_value(inst.tags, "ukc.project")
        session = identity.tag_value(inst.tags, "ukc.session")
        if not project or not session:
            continue
        owners = identity.owner_values(inst.tags)
        accepted: set[str] = set()
        if secret:
            accepted.add(identity.owner_id_from_secret(secret, project))
        if local is not None and local[0] == project:
            accepted |= local[1]
        ours = bool(owners) and all(v in accepted for v in owners)
        found.append(ListedSession(session, project, inst, ours, identity.ttl_from_tags(inst.tags)))
    return sorted(found, key=lambda s: (s.project, s.session, s.instance.name))
