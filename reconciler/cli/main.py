"""`ukc`: the command line. Parses, builds the metro registry (composition root), calls the
reconcile loop, renders. No policy of its own.

Exit codes: 0 success (for `plan --detailed-exitcode`: nothing to do), 1 an action or a
command failed (for `plan`: would fail), 2 invalid usage or spec (with `--detailed-exitcode`:
changes pending, and every error is 1, as in Terraform), 3 `status --exit-code`: a session is
not Ready yet (pending, in progress, interrupted, expired), 130 interrupted (Ctrl-C). `ukc
exec` and `ukc ssh CMD` exit with the remote command's code.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from reconciler import errors

if TYPE_CHECKING:
    # why only for types: each command imports what it runs, so `ukc --help`, `ukc local`
    # and a command run without the warm process pay for no other command's modules
    from reconciler.cli.render import StatusRow
    from reconciler.reconcile.desired import Group
    from reconciler.spec.loader import LoadedSession

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

#: `-h` everywhere; help wraps at up to 100 columns rather than 80
_CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

_paths_arg = click.argument(
    "paths", nargs=-1, type=click.Path(path_type=Path, exists=False, dir_okay=True)
)

ENVIRONMENT_HELP = """\b
Environment:
  UKC_TOKEN            token of a remote metro (sent only to its official API)
  UKC_METRO            default metro: local, a code (fra) or a URL
  UKC_SANDBOX_IMAGE    default image of specs without one
  UKC_PROJECT          stable project id (CI: checkout paths differ)
  UKC_SESSION_SECRET   owner secret (>= 16 chars) shared by checkouts and CI
  UKC_METRO_TOKEN      token for a metro URL you name (instead of UKC_TOKEN)
  UKC_METRO_ALLOW      metro URLs spec files may name (comma, space separated)
  UKC_LOCAL_STATE_DIR  where the local metro keeps its state
  UKC_LOCAL_MAX_PIDS   task limit of each local sandbox (default 512)
  UKC_WARM=0           no warm process (UKC_WARM_DIR, UKC_WARM_IDLE_S tune it)
  UKC_DEBUG=1          tracebacks on errors (as --debug)"""

EXIT_CODES_HELP = """\b
Exit codes:
  0    success
  1    an action or a command failed (plan: apply would fail;
       status --exit-code: a session is Failed)
  2    invalid usage or spec (plan --detailed-exitcode: changes
       pending, and errors are 1)
  3    status --exit-code: a session is not Ready yet
  130  interrupted (Ctrl-C)
  ukc exec and ukc ssh CMD exit with the remote command's code."""


def _guard(fn: F) -> F:
    """Turn every deliberate error into one line and its exit code; tracebacks only with --debug."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        debug = bool(kwargs.get("debug")) or os.environ.get("UKC_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except errors.UkcError as err:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError as err:
            if not _reader_gone():
                _internal_error(err, debug)
            # why: whoever read our output stopped reading (`ukc status | head -1`): end as a
            # program SIGPIPE ended would, with nothing said; stdout goes to /dev/null so the
            # interpreter's own flush at exit does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            sys.exit(128 + signal.SIGPIPE)
        except Exception as err:  # an internal bug: still one line, the traceback on demand
            _internal_error(err, debug)

    return wrapper  # type: ignore[return-value]


def _internal_error(err: Exception, debug: bool) -> None:
    if debug:
        traceback.print_exc()
    click.echo(
        f"internal error: {type(err).__name__}: {err} (run with --debug for details)", err=True
    )
    sys.exit(1)


def _reader_gone() -> bool:
    """Whether our stdout is a pipe nobody reads any more (a broken pipe to a sandbox or
    a socket is an error to report, not this)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(event & select.POLLERR for _, event in poller.poll(0))
    except (OSError, ValueError):
        return False


def _debug_option(fn: F) -> F:
    return click.option("--debug", is_flag=True, help="Show the traceback of an error.")(fn)


def _output_option(fn: F) -> F:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(["text", "json"]),
        default="text",
        show_default=True,
        help="text for people, json for scripts.",
    )(fn)


def _status_option(fn: F) -> F:
    return click.option(
        "--status",
        "status_path",
        type=click.Path(path_type=Path),
        default=None,
        metavar="FILE",
        help="The status file to use instead of .ukc/status.json beside the specs.",
    )(fn)


def _lock_timeout_option(fn: F) -> F:
    return click.option(
        "--lock-timeout",
        type=float,
        default=0.0,
        show_default=True,
        metavar="SECONDS",
        help="How long to wait when another ukc holds the status file's lock (or, with "
        "UKC_PROJECT, the project's lease).",
    )(fn)


def _concurrency_option(fn: F) -> F:
    return click.option(
        "--concurrency",
        type=click.IntRange(1, 64),
        default=8,
        show_default=True,
        help="Sessions worked on at the same time (one waiting for its sandbox to boot lets "
        "the next one start).",
    )(fn)


def _session_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--session",
        "only",
        multiple=True,
        metavar="NAME",
        help=help_text + " Repeatable; a name no spec declares is an error.",
    )


def _load(paths: Sequence[Path], status_override: Path | None) -> list[Group]:
    from reconciler.reconcile.desired import load_groups

    return load_groups(paths, os.environ, status_override)


def _require_sessions(groups: Sequence[Group], paths: Sequence[Path]) -> None:
    """An empty spec set is a mistake (a wrong path, a file without `name:`): said, before
    anything is created (no `.ukc/` appears)."""
    if any(g.sessions for g in groups):
        return
    where = ", ".join(str(p) for p in paths) or "the current directory"
    raise errors.UsageError(
        f"no session specs in {where}: expected *.yaml or *.yml files with a session (name: ...)"
    )


def _check_sessions(only: Sequence[str], known: Sequence[str]) -> None:
    """`--session NAME` must name a session: a typo would otherwise do nothing, silently."""
    missing = [name for name in only if name not in known]
    if missing:
        raise _no_session(missing, known)


def _no_session(missing: Sequence[str], known: Sequence[str]) -> errors.UsageError:
    listed = ", ".join(sorted(set(known))) or "none"
    return errors.UsageError(
        f"no session {', '.join(repr(m) for m in missing)} in the given specs "
        f"(known sessions: {listed})"
    )


def _declared(groups: Sequence[Group]) -> list[str]:
    return [s.spec.name for g in groups for s in g.sessions]


def _warn_short_secrets(sessions: Sequence[LoadedSession]) -> None:
    """One stderr line per secret_env value too short to mask usefully (never the value)."""
    from reconciler.reconcile.redaction import short_secret_warnings

    pairs = {s.spec.name: tuple(s.spec.secret_env.items()) for s in sessions}
    for line in short_secret_warnings(pairs, os.environ):
        click.echo(line, err=True)


def _warn_missing_secrets(sessions: Sequence[LoadedSession]) -> None:
    """One stderr line per secret_env entry whose controller variable is unset: only the
    commands need it, so it is no spec error, but apply fails when a command must run."""
    from reconciler.reconcile.desired import secret_missing_message
    from reconciler.spec.models import missing_secret_env

    for loaded in sessions:
        for sandbox_name, controller in missing_secret_env(loaded.spec, os.environ):
            where = secret_missing_message(loaded, sandbox_name, controller)
            click.echo(f"warning: {where}; apply needs it to run the session's commands", err=True)


def _reporter(output: str) -> Any:
    from reconciler.cli.render import LiveReporter, PlainReporter
    from reconciler.reconcile.events import RecordingReporter

    if output == "json":
        return RecordingReporter()
    if sys.stdout.isatty() and os.environ.get("TERM", "") not in ("", "dumb"):
        return LiveReporter()
    return PlainReporter()


def _metros() -> Any:
    from reconciler.cloud.metros import MetroRegistry

    return MetroRegistry(os.environ)


@click.group(
    context_settings=_CONTEXT,
    epilog="\n\n".join(
        [
            """\b
Examples:
  ukc apply specs/hello.yaml      create, sync, run, bring outputs back
  ukc plan --detailed-exitcode    what apply would do (2: changes pending)
  ukc status --exit-code          what apply recorded (0: all Ready)
  ukc ssh hello                   a shell in session hello
  ukc exec hello -- make test     one command in session hello, its exit code
  ukc delete specs/hello.yaml     remove the session""",
            ENVIRONMENT_HELP,
            EXIT_CODES_HELP,
            "Every command has --help with its options and examples.",
        ]
    ),
)
@click.version_option(package_name="ukc")
def cli() -> None:
    """Declarative Unikraft Cloud sandbox sessions.

    Describe sessions in YAML (image, metro, a local directory, commands); `ukc apply` makes
    the cloud match: it creates or adopts the instance, syncs the directory into /workspace,
    runs the commands that need to run, brings the declared outputs home and writes a status
    file. Without a UKC account everything runs on the local metro, an offline emulator.
    """


@cli.command(
    short_help="Check spec files offline.",
    epilog="""\b
Examples:
  ukc validate                  every spec in the current directory
  ukc validate specs/ a.yaml""",
)
@_paths_arg
@_debug_option
@_guard
def validate(paths: tuple[Path, ...], debug: bool) -> None:
    """Check spec files without contacting anything: fields, names, paths, metros; warns of
    secret_env variables that are not set. An empty spec set is an error (exit 2).

    PATHS are spec files or directories (their *.yaml and *.yml files); default: the current
    directory.
    """
    from reconciler.spec.loader import load_specs

    specset = load_specs(list(paths) or [Path(".")], os.environ)
    if not specset.sessions:
        _require_sessions([], paths)
    _warn_short_secrets(specset.sessions)
    _warn_missing_secrets(specset.sessions)
    for loaded in specset.sessions:
        click.echo(f"ok  {loaded.spec.name}  ({loaded.file}:{loaded.line})")
    click.echo(f"{len(specset.sessions)} session(s) valid")


@cli.command(
    short_help="Show what apply would do, and why.",
    epilog="""\b
Examples:
  ukc plan                        the specs in the current directory
  ukc plan specs/ --prune         also the deletions --prune would make
  ukc plan -o json | jq .         machine-readable (schema: ukc schema plan)
  ukc plan -o markdown > plan.md  a pull-request comment
  ukc plan --detailed-exitcode    0 nothing to do, 1 error, 2 changes pending""",
)
@_paths_arg
@click.option("--prune", is_flag=True, help="Also plan deleting owned sessions no spec declares.")
@click.option(
    "--allow-empty", is_flag=True, help="Allow --prune when the specs declare no session."
)
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when nothing to do, 1 on an error, 2 when changes are pending.",
)
@click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json", "markdown"]),
    default="text",
    show_default=True,
    help="text for people; json: the versioned plan document (`ukc schema plan`); "
    "markdown: a pull-request comment.",
)
@_status_option
@click.option("-v", "--verbose", is_flag=True, help="Also show why unchanged things are fine.")
@_debug_option
@_guard
def plan(
    paths: tuple[Path, ...],
    prune: bool,
    allow_empty: bool,
    detailed_exitcode: bool,
    output: str,
    status_path: Path | None,
    verbose: bool,
    debug: bool,
) -> None:
    """Show what apply would do, and why (files to send, commands to re-run), what it would
    fail on (exit 1), and sessions ukc owns that no spec declares. Reads only.

    PATHS are spec files or directories (their *.yaml and *.yml files); default: the current
    directory.
    """
    try:
        pending, failing = _plan(paths, prune, allow_empty, output, status_path, verbose)
    except errors.UkcError as err:
        if output == "markdown":
            # the comment a pipeline posts says why there is no plan (stderr has it too)
            from reconciler.cli.plan_output import render_error_markdown

            click.echo(render_error_markdown(str(err)), nl=False)
        if not detailed_exitcode:
            raise
        # why: with --detailed-exitcode, 2 means "changes pending"; an error must not read so
        click.echo(f"error: {err}", err=True)
        sys.exit(1)
    if failing:
        sys.exit(1)  # apply would fail those sessions: say so before it is run
    if detailed_exitcode and pending:
        sys.exit(2)


def _plan(
    paths: tuple[Path, ...],
    prune: bool,
    allow_empty: bool,
    output: str,
    status_path: Path | None,
    verbose: bool,
) -> tuple[bool, bool]:
    """Show the plans; (changes pending, a session apply would fail)."""
    from reconciler.cli.plan_output import PlannedGroup, build_document, render_markdown
    from reconciler.cli.render import printable, render_plan
    from reconciler.reconcile.loop import check_prune, plan_group

    groups = _load(paths, status_path)
    # apply refuses such a prune before doing anything: so does its plan
    check_prune(groups, prune=prune, allow_empty=allow_empty, only=())
    if not prune:
        _require_sessions(groups, paths)
    metros = _metros()
    try:
        pending = False
        failing = False
        planned: list[PlannedGroup] = []
        for group in groups:
            the_plan, _ = plan_group(group, metros=metros, environ=os.environ, prune=prune)
            pending = pending or not the_plan.empty
            failing = failing or bool(the_plan.errors)
            planned.append(PlannedGroup(group.base_dir, group.status_path, prune, the_plan))
            if output == "text":
                for line in render_plan(the_plan, verbose):
                    # why escaped: file names are the checkout's (a pull request's)
                    click.echo(printable(line))
        if output != "text":
            doc = build_document(planned, metros.request_count())
            if output == "json":
                click.echo(doc.model_dump_json(indent=2))
            else:
                click.echo(render_markdown(doc), nl=False)
    finally:
        metros.close()
    return pending, failing


@cli.command(
    short_help="Print the JSON Schema of a spec, a plan or a status.",
    epilog="""\b
Examples:
  ukc schema > session.schema.json    for editors: first line of a spec file
                                      # yaml-language-server: $schema=session.schema.json
  ukc schema plan                     the document `ukc plan -o json` prints
  ukc schema apply                    the document `ukc apply -o json` prints
  ukc schema status                   the document `ukc status -o json` prints""",
)
@click.argument(
    "what", type=click.Choice(["session", "plan", "apply", "status"]), default="session"
)
def schema(what: str) -> None:
    """Print a JSON Schema: of a session spec document (for editors), of `plan --output json`,
    `apply --output json` or `status --output json`."""
    if what == "status":
        from reconciler.cli.render import status_schema

        click.echo(json.dumps(status_schema(), indent=2))
        return
    if what == "plan":
        from reconciler.cli.plan_output import plan_schema

        click.echo(json.dumps(plan_schema(), indent=2))
        return
    if what == "apply":
        from reconciler.cli.apply_output import apply_schema

        click.echo(json.dumps(apply_schema(), indent=2))
        return
    from reconciler.spec.schema import session_schema

    click.echo(json.dumps(session_schema(), indent=2))


@cli.command(
    short_help="Converge sessions to their specs.",
    epilog="""\b
Examples:
  ukc apply specs/hello.yaml           one spec file
  ukc apply specs/ --prune             also delete sessions no spec declares
  ukc apply --session web --session db only these two sessions
  ukc apply -o json > result.json      a machine-readable summary (ukc schema apply)

Ctrl-C stops the command in flight (SIGTERM, 5 s, SIGKILL) and records phase Interrupted;
a second Ctrl-C quits at once. Exit codes: 0 converged, 1 a session failed, 2 invalid usage
or spec, 130 interrupted.""",
)
@_paths_arg
@click.option("--prune", is_flag=True, help="Delete owned sessions that no spec declares.")
@click.option(
    "--allow-empty", is_flag=True, help="Allow --prune when the specs declare no session."
)
@_concurrency_option
@_output_option
@_status_option
@_lock_timeout_option
@_session_option("Only this session (a partial run; not with --prune).")
@_debug_option
@_guard
def apply(
    paths: tuple[Path, ...],
    prune: bool,
    allow_empty: bool,
    concurrency: int,
    output: str,
    status_path: Path | None,
    lock_timeout: float,
    only: tuple[str, ...],
    debug: bool,
) -> None:
    """Converge sessions to their specs: create or adopt the instance, sync the directory,
    run the commands that need to, bring the declared outputs back, write the status file.

    PATHS are spec files or directories (their *.yaml and *.yml files); default: the current
    directory.
    """
    from reconciler.cli.apply_output import AppliedGroup, build_apply
    from reconciler.cli.render import printable
    from reconciler.reconcile.loop import apply_group, check_prune

    groups = _load(paths, status_path)
    check_prune(groups, prune=prune, allow_empty=allow_empty, only=only)
    if not prune:
        _require_sessions(groups, paths)
    _check_sessions(only, _declared(groups))
    _warn_short_secrets([s for g in groups for s in g.sessions])
    reporter = _reporter(output)
    metros = _metros()
    interrupted = False
    applied: list[AppliedGroup] = []
    try:
        for group in groups:
            if only and not any(s.spec.name in only for s in group.sessions):
                continue  # a partial run leaves other spec directories untouched
            result = apply_group(
                group,
                metros=metros,
                reporter=reporter,
                environ=os.environ,
                prune=prune,
                concurrency=concurrency,
                lock_timeout_s=lock_timeout,
                only=set(only) or None,
                suspend_idle=True,
            )
            applied.append(AppliedGroup(group.base_dir, group.status_path, prune, result))
            if result.interrupted:
                interrupted = True
                break  # Ctrl-C: no other group starts
        requests = metros.request_count()
    finally:
        reporter.close()
        metros.close()
    doc = build_apply(applied, interrupted=interrupted, api_requests=requests)
    if output == "json":
        click.echo(doc.model_dump_json(indent=2))
    else:
        for item in doc.groups:
            for warning in item.plan.warnings:
                click.echo(f"warning: {warning}", err=True)
            for orphan in item.plan.orphans:
                click.echo(
                    f"note: session {orphan.session}: not declared (use --prune to delete)",
                    err=True,
                )
            for name, why in item.failed.items():
                click.echo(f"[{name}] FAILED: {printable(why)}", err=True)
            click.echo(f"status: {item.status_file}")
    if interrupted:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if not doc.ok:
        sys.exit(1)


def _status_rows(groups: Sequence[Group], only: Sequence[str], now: float) -> list[StatusRow]:
    """The sessions the given specs declare (a spec file: only its own), plus, for a
    directory given whole, the sessions its status file remembers that no spec declares;
    as of `now` (a session whose ttl passed shows as Expired: apply or watch deletes it)."""
    from reconciler.cli.render import StatusRow
    from reconciler.status import journal

    rows: list[StatusRow] = []
    for group in groups:
        doc = journal.load(group.status_path).as_of(now)
        where = str(group.status_path)
        declared = [s.spec.name for s in group.sessions]
        rows.extend(StatusRow(n, where, doc.sessions.get(n)) for n in declared)
        if group.only_files is None:
            rows.extend(
                StatusRow(n, where, rec, declared=False)
                for n, rec in doc.sessions.items()
                if n not in declared and rec.phase != "Deleted"
            )
    _check_sessions(only, [r.name for r in rows])
    return [r for r in rows if not only or r.name in only]


@cli.command(
    "status",
    short_help="Show what the last apply recorded.",
    epilog="""\b
Columns: NAME, PHASE (Pending, Progressing, Ready, Failed, Interrupted,
Deleted, Expired), AGE (of the instance), TTL LEFT (until the session's
ttl passes), LAST APPLY, INSTANCE; each session's commands below it.

\b
Examples:
  ukc status                           the sessions of the current directory
  ukc status calc.yaml --session calc  one session
  ukc status --exit-code               0 all Ready, 1 one Failed, 3 not yet
  ukc status -o json | jq '.sessions[] | {name, phase, ttl_left_s}'
                                       (schema: ukc schema status)""",
)
@_paths_arg
@_output_option
@_status_option
@_session_option("Only this session.")
@click.option(
    "--exit-code",
    is_flag=True,
    help="Exit 0 when every session shown is Ready, 1 when one is Failed, 3 when one is "
    "pending, in progress, interrupted, expired or never applied.",
)
@_debug_option
@_guard
def status_cmd(
    paths: tuple[Path, ...],
    output: str,
    status_path: Path | None,
    only: tuple[str, ...],
    exit_code: bool,
    debug: bool,
) -> None:
    """Show the sessions the given specs declare as the status file recorded them (reads
    only; nothing is contacted).

    PATHS are spec files or directories (their *.yaml and *.yml files); default: the current
    directory. A spec file shows its own sessions; a directory also shows sessions its status
    file remembers that no spec declares any more.
    """
    groups = _load(paths, status_path)
    if not any(g.status_path.exists() for g in groups):
        _require_sessions(groups, paths)
    now = time.time()
    rows = _status_rows(groups, only, now)
    from reconciler.cli.render import (
        printable,
        render_source,
        render_status,
        source_json,
        status_document,
        status_exit_code,
    )
    from reconciler.status import journal

    followed = {
        str(g.status_path): doc
        for g in groups
        if g.status_path.exists() and source_json(doc := journal.load(g.status_path)) is not None
    }
    if output == "json":
        document = status_document(rows, now)
        for path, doc in followed.items():
            found = source_json(doc)
            if found is not None:
                document.sources[path] = found
        click.echo(document.model_dump_json(indent=2))
    else:
        # why escaped: the status file is the checkout's (names, messages, what commands said)
        for line in render_status(rows, now):
            click.echo(printable(line))
        for doc in followed.values():
            for line in render_source(doc, now):
                click.echo(printable(line))
    if exit_code:
        sys.exit(status_exit_code(rows))


@cli.command(
    short_help="Delete the sessions the specs declare.",
    epilog="""\b
Examples:
  ukc delete specs/hello.yaml     the session of one spec file
  ukc delete --session web        one session of the current directory""",
)
@_paths_arg
@_status_option
@_lock_timeout_option
@_session_option("Only this session.")
@_debug_option
@_guard
def delete(
    paths: tuple[Path, ...],
    status_path: Path | None,
    lock_timeout: float,
    only: tuple[str, ...],
    debug: bool,
) -> None:
    """Delete the sessions the given specs declare: their instances, keys and sync records
    (only instances ukc proves it owns). No secret is needed.

    PATHS are spec files or directories (their *.yaml and *.yml files); default: the current
    directory.
    """
    from reconciler.reconcile.desired import Group
    from reconciler.reconcile.loop import delete_group

    groups = _load(paths, status_path)
    _require_sessions(groups, paths)
    _check_sessions(only, _declared(groups))
    metros = _metros()
    reporter = _reporter("text")
    ok = True
    try:
        for group in groups:
            if only:
                group = Group(
                    group.base_dir,
                    [s for s in group.sessions if s.spec.name in only],
                    group.status_override,
                )
                if not group.sessions:
                    continue
            ok = (
                delete_group(
                    group,
                    metros=metros,
                    reporter=reporter,
                    environ=os.environ,
                    lock_timeout_s=lock_timeout,
                )
                and ok
            )
    finally:
        reporter.close()
        metros.close()
    if not ok:
        sys.exit(1)


@cli.command(
    short_help="Follow a git repository: apply each new revision of its specs.",
    epilog="""\b
Examples:
  ukc follow https://github.com/me/infra --path specs --prune
                                  every minute: a new commit on main is applied
  ukc follow . --ref release --once
                                  one check (for cron); exit 1 when it did not apply
  ukc follow REPO --suspend       pause a running follower (--resume to continue)

The status file beside the specs in the checkout records `source` (url, ref, revision,
applied_at), `last_applied_revision` and `last_attempted_revision`. A revision whose specs
do not load applies and prunes nothing. SIGINT/SIGTERM stop it (an apply in flight stops as
on Ctrl-C).""",
)
@click.argument("repo")
@click.option("--ref", default="main", show_default=True, help="The branch or tag to follow.")
@click.option(
    "--path",
    "spec_path",
    default="",
    metavar="PATH",
    help="The specs' directory or file inside the repository (default: its root).",
)
@click.option(
    "--interval",
    default="1m",
    show_default=True,
    metavar="DURATION",
    help="How often to check the ref (90s, 5m, 1h).",
)
@click.option(
    "--resync",
    default="10m",
    show_default=True,
    metavar="DURATION|off",
    help="Apply the current revision again once this long passed since it last converged "
    "(drift, ttls); off: only new revisions.",
)
@click.option("--once", is_flag=True, help="Check once and exit (cron, CI).")
@click.option("--prune", is_flag=True, help="Delete sessions a revision no longer declares.")
@click.option(
    "--allow-empty", is_flag=True, help="Allow --prune when a revision declares no session."
)
@click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=None,
    metavar="DIR",
    help="Where the follower keeps its repository and checkout "
    "(default: $XDG_STATE_HOME/ukc/follow/<source>).",
)
@click.option("--suspend", is_flag=True, help="Mark the follower suspended, then exit.")
@click.option("--resume", is_flag=True, help="Remove the suspend mark, then exit.")
@_concurrency_option
@_lock_timeout_option
@_debug_option
@_guard
def follow(
    repo: str,
    ref: str,
    spec_path: str,
    interval: str,
    resync: str,
    once: bool,
    prune: bool,
    allow_empty: bool,
    state_dir: Path | None,
    suspend: bool,
    resume: bool,
    concurrency: int,
    lock_timeout: float,
    debug: bool,
) -> None:
    """Apply each new revision of a git repository's specs (validate, plan, apply), at an
    interval, recording the revision in the status file."""
    from reconciler.reconcile import follow as following
    from reconciler.spec.durations import DurationError, parse_duration
    from reconciler.spec.gitsource import GitSource, check_ref, is_url, source_key

    if suspend and resume:
        raise errors.UsageError("--suspend and --resume exclude each other")
    path = following.check_spec_path(spec_path)
    check_ref(ref)
    try:
        every = float(parse_duration(interval))
        again = None if resync == "off" else float(parse_duration(resync))
    except DurationError as err:
        raise errors.UsageError(f"--interval/--resync: {err}") from None
    if state_dir is None:
        home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
        # a local repository by its real path: `.` here and its full path elsewhere agree
        named = repo if is_url(repo) else str(Path(repo).resolve())
        state_dir = Path(home) / "ukc" / "follow" / source_key(named, ref, path)
    if suspend:
        following.suspend(state_dir, "ukc follow --suspend")
        click.echo(f"suspended: {state_dir}")
        return
    if resume:
        found = following.resume(state_dir)
        click.echo(f"resumed: {state_dir}" if found else f"was not suspended: {state_dir}")
        return
    source = GitSource(repo, ref, state_dir, environ=os.environ)
    metros = _metros()
    reporter = _reporter("text")
    follower = following.Follower(
        source,
        following.FollowOptions(
            path=path,
            interval_s=every,
            prune=prune,
            allow_empty=allow_empty,
            concurrency=concurrency,
            lock_timeout_s=lock_timeout,
            resync_s=again,
        ),
        metros=metros,
        reporter=reporter,
        environ=os.environ,
    )
    follower.install_signal_handlers()
    reporter.event(
        _follow_event(f"following {source.url} {ref}{' ' + path if path else ''} in {state_dir}")
    )
    try:
        code = follower.run(once=once)
    finally:
        reporter.close()
        metros.close()
    sys.exit(code)


def _follow_event(text: str) -> Any:
    from reconciler.reconcile.events import Event

    return Event("follow", "info", text)


@cli.command(
    short_help="Converge, then follow edits of files and specs.",
    epilog="""\b
Examples:
  ukc watch                       the specs in the current directory
  ukc watch specs/ --down         delete the sessions when watch stops""",
)
@_paths_arg
@click.option("--prune", is_flag=True, help="Delete sessions removed from the specs.")
@click.option("--down", is_flag=True, help="Delete the sessions when watch exits.")
@click.option(
    "--resync",
    type=float,
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="How often to re-observe every session, edits or not (drift, TTLs).",
)
@_concurrency_option
@_debug_option
@_guard
def watch(
    paths: tuple[Path, ...],
    prune: bool,
    down: bool,
    resync: float,
    concurrency: int,
    debug: bool,
) -> None:
    """Converge, then keep sessions in step while files and specs change: an edit reaches
    the sandbox in well under a second. Ctrl-C stops.

    PATHS are spec files or directories (their *.yaml and *.yml files); default: the current
    directory.
    """
    from reconciler.reconcile.watch import Watcher, WatchOptions

    # an empty spec set is a wrong path, not something to follow: said before anything starts
    _require_sessions(_load(paths, None), paths)
    metros = _metros()
    reporter = _reporter("text")
    watcher = Watcher(
        WatchOptions(
            paths=list(paths) or [Path(".")],
            prune=prune,
            down=down,
            resync_s=resync,
            concurrency=concurrency,
        ),
        metros=metros,
        reporter=reporter,
        environ=os.environ,
    )
    watcher.install_signal_handlers()
    try:
        code = watcher.run()
    finally:
        reporter.close()
        metros.close()
    sys.exit(code)


def _file_option(fn: F) -> F:
    return click.option(
        "-f",
        "--file",
        "files",
        multiple=True,
        type=click.Path(path_type=Path),
        metavar="PATH",
        help="Spec file or directory declaring the session (repeatable; default: the "
        "current directory).",
    )(fn)


def _session_group(files: Sequence[Path], name: str) -> Group:
    """The group (status file) of the session `name` among the specs in `files`."""
    groups = _load(list(files), None)
    _require_sessions(groups, files)
    for group in groups:
        if any(s.spec.name == name for s in group.sessions):
            return group
    raise _no_session([name], _declared(groups))


def _write_fd(fd: int) -> Callable[[bytes], None]:
    def write(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    return write


@contextlib.contextmanager
def _ctrl_c_stops(stop: threading.Event, what: str) -> Iterator[None]:
    """Ctrl-C sets `stop` (the command in flight is stopped: TERM, grace, KILL) and says so;
    a second one quits at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        click.echo(f"interrupt: stopping {what}… (Ctrl-C again to quit now)", err=True)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


@cli.command(
    short_help="A shell (or a command) in a session's sandbox.",
    epilog="""\b
Examples:
  ukc ssh hello                       an interactive login shell in /workspace
  ukc ssh -f specs/ hello             the session declared under specs/
  ukc ssh hello -- uname -a           one command (no terminal unless -t)
  ukc ssh hello < script.sh           a script on stdin

It connects as apply does: through the metro's TLS edge with the session's key
(.ukc/keys/NAME), and only to the instance the status file records, presenting the host key
recorded there (a changed key is refused: `ukc apply` replaces a lost instance). The shell
gets the login environment, not the session's env (ukc exec has it). Ctrl-C of a COMMAND
without -t stops it (TERM, 5 s, KILL; exit 130). Exit code: the remote shell's or command's.""",
)
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@_file_option
@click.option("-t", "--tty", is_flag=True, help="A pseudo-terminal for COMMAND too (as ssh -t).")
@_debug_option
@_guard
def ssh(
    name: str, command: tuple[str, ...], files: tuple[Path, ...], tty: bool, debug: bool
) -> None:
    """Open a shell, or run COMMAND, in session NAME's sandbox over SSH through the TLS
    edge, with the session's key and pinned host key. With no COMMAND and a terminal, an
    interactive login shell in /workspace (keys, Ctrl-C and window size go to the sandbox);
    `exit` or Ctrl-D ends it."""
    from secrets import token_hex

    from reconciler.cli.terminal import StdioTerminal
    from reconciler.reconcile import access
    from reconciler.transport.base import STOP_GRACE_S, kill_group

    group = _session_group(files, name)
    metros = _metros()
    try:
        reached = access.reach(group, name, metros, os.environ)
        transport = access.connect(reached)
        try:
            terminal = StdioTerminal()
            size = terminal.size() if (tty or not command) else None
            if not command:
                line = access.LOGIN_SHELL
            elif size is not None:  # on a terminal, Ctrl-C goes to the sandbox as a key
                line = "cd /workspace 2>/dev/null; " + access.command_line(command)
            else:
                line, target = access.stoppable(access.command_line(command), token_hex(8))
            process = transport.start_terminal(line, term=terminal.term(), size=size)
            if size is not None:
                with terminal.raw():
                    code = access.interact(process, terminal)
            elif not command:
                code = access.interact(process, terminal)
            else:
                stop = threading.Event()
                with _ctrl_c_stops(stop, f"the command in session {name}"):
                    code = access.interact(
                        process,
                        terminal,
                        stop=stop.is_set,
                        on_stop=lambda: kill_group(transport, target, STOP_GRACE_S),
                    )
        finally:
            transport.close()
    finally:
        metros.close()
    sys.exit(code)


@cli.command(
    "exec",
    short_help="Run one command in a session, exit with its code.",
    epilog="""\b
Examples:
  ukc exec hello -- make test             output as it comes, its exit code
  ukc exec hello -- 'make && make test'   one argument: a shell command line
  ukc exec -f specs/ hello -- ls -la out  several: exactly those arguments
  ukc exec hello --timeout 60 -- ./slow   stopped after 60 s (exit 124)

The command runs in /workspace under the session's shell, with its env and the secret_env
values this environment has (sent on the command's stdin, never on a command line); secret
values in its output are masked (***). It is not recorded in the status file and does not
sync files: `ukc apply` does. Ctrl-C stops it (TERM, 5 s, KILL; exit 130).""",
)
@click.argument("name")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@_file_option
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    metavar="SECONDS",
    help="Stop the command after this long (TERM, then KILL); exit 124.",
)
@_debug_option
@_guard
def exec_cmd(
    name: str,
    command: tuple[str, ...],
    files: tuple[Path, ...],
    timeout: float | None,
    debug: bool,
) -> None:
    """Run COMMAND once in session NAME's sandbox, as apply runs the session's commands
    (same directory, shell, environment, redaction) but unrecorded; exit with its code."""
    from reconciler.reconcile import access

    line = access.command_line(command)
    group = _session_group(files, name)
    metros = _metros()
    stop = threading.Event()
    try:
        reached = access.reach(group, name, metros, os.environ)
        transport = access.connect(reached)
        try:
            with _ctrl_c_stops(stop, f"the command in session {name}"):
                code = access.exec_command(
                    reached,
                    transport,
                    line,
                    os.environ,
                    out=_write_fd(1),
                    err=_write_fd(2),
                    warn=lambda message: click.echo(f"warning: {message}", err=True),
                    stop=stop.is_set,
                    timeout_s=timeout,
                )
        finally:
            transport.close()
    finally:
        metros.close()
    sys.exit(code)


@cli.command(
    short_help="A session's console log and its commands' last output.",
    epilog="""\b
Examples:
  ukc logs hello                  the console, then each command's last output
  ukc logs hello --lines 50       the console's last 50 lines
  ukc logs hello -F               follow the console (Ctrl-C stops)
  ukc logs hello --no-commands    the console only

The console is the sandbox's (its services' output, boot messages) as the platform API
keeps it; the commands' output is what the last apply recorded (the status file keeps the
last 64 KiB of each stream). Control characters are shown escaped (the sandbox writes
them); secret values are masked.""",
)
@click.argument("name")
@_file_option
@click.option(
    "--lines",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="Only the console's last N lines.",
)
@click.option(
    "-F", "--follow", is_flag=True, help="Keep printing the console as it grows (Ctrl-C stops)."
)
@click.option("--no-commands", is_flag=True, help="Leave out the commands' recorded output.")
@_debug_option
@_guard
def logs(
    name: str,
    files: tuple[Path, ...],
    lines: int | None,
    follow: bool,
    no_commands: bool,
    debug: bool,
) -> None:
    """Show session NAME's console log (through the UKC API), then the last output of its
    commands from the status file."""
    from reconciler.cli.render import printable
    from reconciler.reconcile import access
    from reconciler.reconcile.desired import session_env
    from reconciler.reconcile.redaction import Redactor

    group = _session_group(files, name)
    loaded, record = access.recorded(group, name)
    _, secrets, _ = session_env(loaded.spec, os.environ)
    redact = Redactor(v for v in secrets.values() if v)
    metros = _metros()
    try:
        try:
            reached = access.reach(group, name, metros, os.environ, connecting=False)
        except errors.UsageError as err:
            if follow or no_commands:
                raise
            # the commands' output is in the status file even when the instance is gone
            click.echo(f"warning: no console: {err}", err=True)
            reached = None
        console = None
        if reached is not None:
            tail = None if lines is None else max(64 * 1024, lines * 512)
            console = access.console_log(reached, tail_bytes=tail)
            text = console.data.decode(errors="replace")
            if lines is not None:
                text = "\n".join(text.rstrip("\n").split("\n")[-lines:]) + "\n"
            inst = reached.instance
            click.echo(f"== console of {inst.name} (uuid {inst.uuid}, {inst.state}) ==")
            click.echo(printable(redact(text)), nl=False)
        if not no_commands:
            for cmd in access.last_outputs(record):
                state = f"exit {cmd.exit_code}"
                if cmd.timed_out:
                    state = "timed out"
                if cmd.interrupted:
                    state = "interrupted"
                when = f", finished {cmd.finished_at}" if cmd.finished_at else ""
                # why escaped: the status file is the checkout's, its names and times too
                click.echo(printable(f"== command {cmd.name} ({state}{when}) =="))
                for label, body in (("stdout", cmd.stdout), ("stderr", cmd.stderr)):
                    if body:
                        click.echo(f"-- {label} --")
                        click.echo(printable(redact(body)), nl=not body.endswith("\n"))
        if follow and reached is not None and console is not None:
            click.echo("== following the console (Ctrl-C stops) ==")
            stop = threading.Event()

            def quit_following(signum: int, frame: FrameType | None) -> None:
                stop.set()

            previous = signal.signal(signal.SIGINT, quit_following)
            try:
                for chunk in access.follow_log(reached, console.available_end, stop=stop.is_set):
                    click.echo(printable(redact(chunk.decode(errors="replace"))), nl=False)
            finally:
                signal.signal(signal.SIGINT, previous)
    finally:
        metros.close()


LS_COLUMNS = ("NAME", "PROJECT", "STATE", "AGE", "TTL LEFT", "OURS", "INSTANCE")


@cli.command(
    "ls",
    short_help="The sessions on a metro, across projects.",
    epilog="""\b
Examples:
  ukc ls                          the local metro (or $UKC_METRO)
  ukc ls --metro fra -o json      a UKC metro, machine-readable

Every instance ukc made on the metro, whatever its project, as its tags describe it:
NAME (the session), PROJECT (`(here)`: this directory's), STATE, AGE, TTL LEFT (by the ttl
it was created with), OURS (`yes` when its owner tag proves it is this checkout's or
UKC_SESSION_SECRET's), INSTANCE. Tags are claims: only OURS is a proof.""",
)
@click.option(
    "--metro",
    default=None,
    help="The metro to list: local, a code (fra) or a URL. Default: $UKC_METRO, else local.",
)
@_output_option
@_debug_option
@_guard
def ls(metro: str | None, output: str, debug: bool) -> None:
    """List the sessions ukc made on a metro, across projects: NAME PROJECT STATE AGE
    TTL LEFT OURS INSTANCE."""
    from reconciler.cli.render import render_table, span
    from reconciler.reconcile import access, identity
    from reconciler.reconcile.desired import Group
    from reconciler.reconcile.plan import parse_time

    chosen = metro or os.environ.get("UKC_METRO") or "local"
    here = Group(Path(".").resolve(), [])
    here_project = identity.project_id(here.base_dir, os.environ)
    metros = _metros()
    try:
        found = access.list_sessions(metros.get(chosen), os.environ, here)
    finally:
        metros.close()
    now = time.time()
    rows: list[dict[str, Any]] = []
    for item in found:
        created = parse_time(item.instance.created_at)
        ttl_left = None
        if created is not None and item.ttl_s is not None:
            ttl_left = int(created + item.ttl_s - now)
        rows.append(
            {
                "name": item.session,
                "project": item.project,
                "here": item.project == here_project,
                "state": item.instance.state,
                "age_s": None if created is None else int(now - created),
                "ttl_left_s": ttl_left,
                "ours": item.ours,
                "instance": item.instance.name,
                "uuid": item.instance.uuid,
                "metro": chosen,
            }
        )
    if output == "json":
        click.echo(json.dumps({"version": 1, "metro": chosen, "sessions": rows}, indent=2))
        return
    if not rows:
        click.echo(f"no ukc sessions on metro {chosen}")
        return
    table = [
        (
            r["name"],
            r["project"] + (" (here)" if r["here"] else ""),
            r["state"],
            "-" if r["age_s"] is None else span(r["age_s"]),
            _ttl_left(r["ttl_left_s"]),
            "yes" if r["ours"] else "no",
            r["instance"],
        )
        for r in rows
    ]
    for line in render_table(LS_COLUMNS, table):
        click.echo(line)


def _ttl_left(seconds: int | None) -> str:
    from reconciler.cli.render import span

    if seconds is None:
        return "-"
    return "expired" if seconds <= 0 else span(seconds)


@cli.group(short_help="The local metro daemon: start, stop, status, env.")
def local() -> None:
    """Manage the embedded local metro (an offline UKC emulator)."""


@local.command("start", short_help="Start the local metro daemon.")
@_guard
def local_start() -> None:
    """Start the local metro daemon (if it is not running)."""
    from reconciler.cloud import metros

    info = metros.start_local_metro()
    click.echo(f"local metro running: {info.api_url} (pid {info.pid}, state {info.state_dir})")


@local.command("stop", short_help="Stop the local metro and its sandboxes.")
@_guard
def local_stop() -> None:
    """Stop the local metro and every sandbox it runs (instances are kept on disk)."""
    from reconciler.cloud import metros

    stopped = metros.stop_local_metro()
    click.echo("local metro stopped" if stopped else "local metro was not running")


@local.command("status", short_help="Say whether the local metro runs (3: not).")
@_guard
def local_status() -> None:
    """Say whether the local metro runs, and where."""
    from reconciler.cloud import metros

    info = metros.local_metro_status()
    if info is None:
        click.echo("local metro: not running")
        sys.exit(3)
    click.echo(f"local metro: running, pid {info.pid}, api {info.api_url}, state {info.state_dir}")
    if info.sandbox:
        click.echo(f"sandboxes: {info.sandbox}")
    report = metros.local_metro_report(info)
    images = report.get("images")
    if isinstance(images, dict):
        for image, what in images.items():
            click.echo(f"image {image}: {what}")
    behaviour = report.get("behaviour")
    if isinstance(behaviour, dict):
        knobs = ", ".join(f"{k}={json.dumps(v)}" for k, v in behaviour.items())
        click.echo(f"behaviour (docs/local-metro.md): {knobs}")


@local.command("env", short_help="How tools outside ukc reach the local metro.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable.")
@_guard
def local_env(as_json: bool) -> None:
    """How a client outside ukc reaches the local metro (API URL, token, edge ports, CA)."""
    from reconciler.cloud import metros

    info = metros.start_local_metro()
    data: dict[str, Any] = {
        "api_url": info.api_url,
        "token": info.token,
        "ca": str(info.ca_path),
        "app_domain": info.app_domain,
        "edge_host": info.edge_host,
        "ports": {str(k): f"{info.edge_host}:{v}" for k, v in sorted(info.edge_ports.items())},
    }
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    # Not UKC_METRO/UKC_TOKEN: those would make `ukc` itself treat the local API as a remote
    # metro (no edge address mapping, no local CA). The SDK takes them from these on request.
    click.echo(f"export UKC_LOCAL_API={data['api_url']}")
    click.echo(f"export UKC_LOCAL_TOKEN={info.token}")
    click.echo(f"export UKC_LOCAL_CA={data['ca']}")
    click.echo("# official SDK: UKC_METRO=$UKC_LOCAL_API UKC_TOKEN=$UKC_LOCAL_TOKEN python ...")
    for port, addr in data["ports"].items():
        click.echo(f"# public port {port} -> {addr} (TLS, SNI = instance fqdn)")


@cli.group(short_help="The warm process: status, stop.")
def warm() -> None:
    """The warm process that runs short commands without import costs (UKC_WARM=0: off)."""


@warm.command("status", short_help="Say whether a warm process runs (3: not).")
@_guard
def warm_status() -> None:
    """Say whether a warm process serves this installation."""
    from reconciler.cli import warm as warm_process
    from reconciler.cli import warmclient

    found, warning = warmclient.locate_socket()
    if warning:
        click.echo(warning, err=True)
    path = Path(found) if found is not None else None
    info = warm_process.status(path) if path is not None else None
    if info is None:
        click.echo("warm process: not running" + ("" if path else " (no private socket dir)"))
        sys.exit(3)
    click.echo(
        f"warm process: pid {info.get('pid')}, up {info.get('uptime_s')} s, "
        f"{info.get('commands')} command(s), idle {info.get('idle_s')} s"
        + ("" if info.get("fresh") else ", stale (replaced at the next command)")
        + f", socket {path}"
    )


@warm.command("stop", short_help="Stop the warm process.")
@_guard
def warm_stop() -> None:
    """Stop the warm process (commands it runs finish; the next command starts a new one)."""
    from reconciler.cli import warm as warm_process

    path = warm_process.socket_path()
    stopped = path is not None and warm_process.request_stop(path)
    click.echo("warm process stopped" if stopped else "warm process was not running")


def _add_doctor() -> None:
    from reconciler.cli.doctor import doctor

    cli.add_command(doctor)


_add_doctor()


def main(argv: Sequence[str] | None = None) -> None:
    # why: paramiko imports `invoke` (with unittest.mock and asyncio, ~28 ms of every apply that
    # syncs) only to run ssh_config "Match exec" lines, which ukc never reads. Only this
    # process's entry point does it: a library user's `import invoke` keeps working.
    sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
    cli.main(args=list(argv) if argv is not None else None, prog_name="ukc")


if __name__ == "__main__":
    main()
