"""`ukc doctor`: probe the configured metro and say which of ukc's assumptions about it held."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import click

from reconciler import errors

if TYPE_CHECKING:
    from reconciler.reconcile.doctor import Budgets

__all__ = ["doctor", "run_doctor"]

#: the image a spec without one gets: $UKC_SANDBOX_IMAGE, on the local metro its own image
_IMAGE_VAR = "UKC_SANDBOX_IMAGE"
_TOKEN_VARS = ("UKC_TOKEN", "UKC_METRO_TOKEN")


def _metro_kind(metro: str) -> str:
    """What the report may say of the metro: its code, or only that it is a URL."""
    from reconciler._util.names import is_metro_code

    if metro == "local" or is_metro_code(metro):
        return metro
    return "url"


def run_doctor(
    metro: str,
    image: str,
    environ: Mapping[str, str],
    *,
    report: Path | None,
    echo: bool = True,
    budgets: Budgets | None = None,
    memory_mb: int | None = None,
) -> dict[str, object]:
    """Probe `metro`, print one line per check, write the JSON report; the report document."""
    from reconciler.cloud.metros import MetroRegistry, local_metro_status
    from reconciler.reconcile.doctor import Probe
    from reconciler.reconcile.doctor_report import render_lines

    secrets = [environ.get(v, "") for v in _TOKEN_VARS]
    metros = MetroRegistry(environ)
    try:
        conn = metros.get(metro)
        if conn.local:
            info = local_metro_status()
            secrets.append(info.token if info is not None else "")
        probe = Probe(
            conn.api,
            conn.reach,
            image=image,
            memory_mb=memory_mb,
            budgets=budgets,
        )
        results = probe.execute()
    finally:
        metros.close()
    document = probe.report(
        results,
        about={"metro": _metro_kind(metro), "image": image, "trust_store": conn.reach.trust_store},
        secrets=secrets,
    )
    if echo:
        for line in render_lines(document):
            click.echo(line)
    if report is not None:
        report.write_text(json.dumps(document, indent=2) + "\n")
        if echo:
            click.echo(f"report: {report} (no token, FQDN or uuid in it: safe to share)")
    return document


@click.command(
    short_help="Probe a metro: which of ukc's assumptions hold.",
    epilog="""\b
Examples:
  ukc doctor                         the local metro
  UKC_TOKEN=... ukc doctor --metro fra --report doctor.json""",
)
@click.option(
    "--metro",
    default=None,
    help="The metro to probe: local, a code (fra) or a URL. Default: $UKC_METRO, else local.",
)
@click.option(
    "--image",
    default=None,
    help=f"The image to boot. Default: ${_IMAGE_VAR}, else on the local metro its own image.",
)
@click.option(
    "--memory-mb",
    type=click.IntRange(min=16),
    default=None,
    help="Memory of the instance. Default: the platform's (the smallest instance).",
)
@click.option(
    "--report",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    metavar="FILE",
    help="Write the JSON report here (no token, FQDN or uuid: safe to share).",
)
@click.option("--debug", is_flag=True, help="Show the traceback of an error.")
def doctor(
    metro: str | None, image: str | None, memory_mb: int | None, report: Path | None, debug: bool
) -> None:
    """Create one tiny instance the way a session's is made (service group, tags,
    scale-to-zero), read what ukc relies on (states, FQDN, waits, tag filter, pages), reach it
    through the TLS edge and over ssh, look for python3, rsync and tar, let it scale to zero
    and wake it, delete it and time how long its name stays taken. One line per assumption:
    PASS, FAIL or SKIP with its figures; exit 1 on a FAIL (docs/PLATFORM.md, "Verified or
    assumed")."""
    chosen = metro or os.environ.get("UKC_METRO") or "local"
    from reconciler.spec.models import DEFAULT_LOCAL_IMAGE

    picked = image or os.environ.get(_IMAGE_VAR) or ""
    if not picked and chosen != "local":
        click.echo(
            f"error: name the image to probe on metro {chosen}: --image or ${_IMAGE_VAR}",
            err=True,
        )
        sys.exit(2)
    try:
        document = run_doctor(
            chosen, picked or DEFAULT_LOCAL_IMAGE, os.environ, report=report, memory_mb=memory_mb
        )
    except errors.UkcError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    sys.exit(1 if document.get("failed") else 0)
