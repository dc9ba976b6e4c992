"""`ukc`: the command line. Parses, builds the metro registry (composition root), calls the
reconcile loop, renders. No policy of its own.

Exit codes: 0 success (for `plan --detailed-exitcode`: nothing to do), 1 an action or a
command failed (for `plan`: would fail), 2 invalid usage or spec (with `--detailed-exitcode`:
changes pending, and every error is 1, as in Terraform), 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from reconciler import errors
from reconciler.cli.render import plan_json, render_plan, render_status
from reconciler.reconcile.desired import Group, load_groups
from reconciler.spec.loader import LoadedSession, load_specs
from reconciler.status import journal

__all__ = ["main"]

F = TypeVar("F", bound=Callable[..., Any])

_paths_arg = click.argument(
    "paths", nargs=-1, type=click.Path(path_type=Path, exists=False, dir_okay=True)
)


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
        except Exception as err:  # an internal bug: still one line, the traceback on demand
            if debug:
                traceback.print_exc()
            click.echo(
                f"internal error: {type(err).__name__}: {err} (run with --debug for details)",
                err=True,
            )
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


def _debug_option(fn: F) -> F:
    return click.option("--debug", is_flag=True, help="Show tracebacks.")(fn)


def _load(paths: Sequence[Path], status_override: Path | None) -> list[Group]:
    return load_groups(paths, os.environ, status_override)


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ukc")
def cli() -> None:
    """Declarative Unikraft Cloud sandbox sessions."""


@cli.command()
@_paths_arg
@_debug_option
@_guard
def validate(paths: tuple[Path, ...], debug: bool) -> None:
    """Check spec files without contacting anything."""
    specset = load_specs(list(paths) or [Path(".")], os.environ)
    _warn_short_secrets(specset.sessions)
    _warn_missing_secrets(specset.sessions)
    for loaded in specset.sessions:
        click.echo(f"ok  {loaded.spec.name}  ({loaded.file}:{loaded.line})")
    click.echo(f"{len(specset.sessions)} session(s) valid")


@cli.command()
@_paths_arg
@click.option("--prune", is_flag=True, help="Also plan deleting owned sessions no spec declares.")
@click.option("--allow-empty", is_flag=True, help="Allow --prune with no sessions declared.")
@click.option(
    "--detailed-exitcode",
    is_flag=True,
    help="Exit 0 when nothing to do, 1 on an error, 2 when changes are pending.",
)
@click.option("--output", type=click.Choice(["text", "json"]), default="text")
@click.option("--status", "status_path", type=click.Path(path_type=Path), default=None)
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
    """Show what apply would do, and why (files to send, commands to re-run), and what it
    would fail on."""
    try:
        pending, failing = _plan(paths, prune, allow_empty, output, status_path, verbose)
    except errors.UkcError as err:
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
    from reconciler.reconcile.loop import check_prune, plan_group

    groups = _load(paths, status_path)
    # apply refuses such a prune before doing anything: so does its plan
    check_prune(groups, prune=prune, allow_empty=allow_empty, only=())
    metros = _metros()
    try:
        pending = False
        failing = False
        doc_out: dict[str, Any] = {}
        for group in groups:
            the_plan, _ = plan_group(group, metros=metros, environ=os.environ, prune=prune)
            pending = pending or not the_plan.empty
            failing = failing or bool(the_plan.errors)
            if output == "json":
                doc_out[str(group.base_dir)] = plan_json(the_plan)
            else:
                for line in render_plan(the_plan, verbose):
                    click.echo(line)
        if output == "json":
            click.echo(json.dumps({"api_requests": metros.request_count(), **doc_out}, indent=2))
    finally:
        metros.close()
    return pending, failing


@cli.command()
@_paths_arg
@click.option("--prune", is_flag=True, help="Delete owned sessions that no spec declares.")
@click.option("--allow-empty", is_flag=True, help="Allow --prune with no sessions declared.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=8, show_default=True)
@click.option("--output", type=click.Choice(["text", "json"]), default="text")
@click.option("--status", "status_path", type=click.Path(path_type=Path), default=None)
@click.option(
    "--lock-timeout",
    type=float,
    default=0.0,
    help="Seconds to wait for another applier's lock.",
)
@click.option("--session", "only", multiple=True, help="Only these sessions (partial run).")
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
    """Converge sessions to their specs: create, sync, run, bring back; write the status file."""
    from reconciler.reconcile.loop import apply_group, check_prune

    groups = _load(paths, status_path)
    check_prune(groups, prune=prune, allow_empty=allow_empty, only=only)
    _warn_short_secrets([s for g in groups for s in g.sessions])
    reporter = _reporter(output)
    metros = _metros()
    ok = True
    interrupted = False
    summary: dict[str, Any] = {}
    try:
        for group in groups:
            result = apply_group(
                group,
                metros=metros,
                reporter=reporter,
                environ=os.environ,
                prune=prune,
                concurrency=concurrency,
                lock_timeout_s=lock_timeout,
                only=set(only) or None,
            )
            ok = ok and result.ok
            summary[str(group.base_dir)] = {
                "ok": result.ok,
                "rounds": result.rounds,
                "failed": {
                    k: v
                    for k, v in result.failed.items()
                    if not (k in result.outcomes and result.outcomes[k].interrupted)
                },
                "interrupted": sorted(k for k, o in result.outcomes.items() if o.interrupted),
                "plan": plan_json(result.plan),
                "status": str(group.status_path),
            }
            if result.interrupted:
                interrupted = True
                break  # Ctrl-C: no other group starts
        requests = metros.request_count()
    finally:
        reporter.close()
        metros.close()
    if output == "json":
        click.echo(
            json.dumps(
                {"ok": ok, "interrupted": interrupted, "api_requests": requests, "groups": summary},
                indent=2,
            )
        )
    else:
        for item in summary.values():
            for warning in item["plan"]["warnings"]:
                click.echo(f"warning: {warning}", err=True)
            for name in item["plan"]["orphans"]:
                click.echo(f"note: session {name}: not declared (use --prune to delete)", err=True)
            for name, why in item["failed"].items():
                click.echo(f"[{name}] FAILED: {why}", err=True)
            click.echo(f"status: {item['status']}")
    if interrupted:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if not ok:
        sys.exit(1)


@cli.command()
@_paths_arg
@click.option("--output", type=click.Choice(["text", "json"]), default="text")
@click.option("--status", "status_path", type=click.Path(path_type=Path), default=None)
@_debug_option
@_guard
def status_cmd(paths: tuple[Path, ...], output: str, status_path: Path | None, debug: bool) -> None:
    """Show the status file (what the last apply recorded)."""
    groups = _load(paths, status_path)
    docs = {str(g.status_path): journal.load(g.status_path) for g in groups}
    if output == "json":
        click.echo(json.dumps({p: d.model_dump(mode="json") for p, d in docs.items()}, indent=2))
        return
    for line in render_status(docs):
        click.echo(line)


cli.add_command(status_cmd, name="status")


@cli.command()
@_paths_arg
@click.option("--status", "status_path", type=click.Path(path_type=Path), default=None)
@click.option("--lock-timeout", type=float, default=0.0)
@_debug_option
@_guard
def delete(
    paths: tuple[Path, ...], status_path: Path | None, lock_timeout: float, debug: bool
) -> None:
    """Delete the sessions the given specs declare (instances, keys, sync records)."""
    from reconciler.reconcile.loop import delete_group

    metros = _metros()
    reporter = _reporter("text")
    ok = True
    try:
        for group in _load(paths, status_path):
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


@cli.command()
@_paths_arg
@click.option("--prune", is_flag=True, help="Delete sessions removed from the specs.")
@click.option("--down", is_flag=True, help="Delete the sessions when watch exits.")
@click.option("--resync", type=float, default=30.0, show_default=True, help="Seconds.")
@click.option("--concurrency", type=click.IntRange(1, 64), default=8, show_default=True)
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
    """Converge, then keep sessions in step while files and specs change (Ctrl-C stops)."""
    from reconciler.reconcile.watch import Watcher, WatchOptions

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


@cli.group()
def local() -> None:
    """Manage the embedded local metro (an offline UKC emulator)."""


@local.command("start")
@_guard
def local_start() -> None:
    """Start the local metro daemon (if it is not running)."""
    from reconciler.cloud import metros

    info = metros.start_local_metro()
    click.echo(f"local metro running: {info.api_url} (pid {info.pid}, state {info.state_dir})")


@local.command("stop")
@_guard
def local_stop() -> None:
    """Stop the local metro and every sandbox it runs (instances are kept on disk)."""
    from reconciler.cloud import metros

    stopped = metros.stop_local_metro()
    click.echo("local metro stopped" if stopped else "local metro was not running")


@local.command("status")
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


@local.command("env")
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


@cli.group()
def warm() -> None:
    """The warm process that runs short commands without import costs (UKC_WARM=0: off)."""


@warm.command("status")
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


@warm.command("stop")
@_guard
def warm_stop() -> None:
    """Stop the warm process (commands it runs finish; the next command starts a new one)."""
    from reconciler.cli import warm as warm_process

    path = warm_process.socket_path()
    stopped = path is not None and warm_process.request_stop(path)
    click.echo("warm process stopped" if stopped else "warm process was not running")


def main(argv: Sequence[str] | None = None) -> None:
    # why: paramiko imports `invoke` (with unittest.mock and asyncio, ~28 ms of every apply that
    # syncs) only to run ssh_config "Match exec" lines, which ukc never reads. Only this
    # process's entry point does it: a library user's `import invoke` keeps working.
    sys.modules.setdefault("invoke", None)  # type: ignore[arg-type]
    cli.main(args=list(argv) if argv is not None else None, prog_name="ukc")


if __name__ == "__main__":
    main()
