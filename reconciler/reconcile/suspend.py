"""Suspending the instances of sessions that converged (`suspend: true`, a one-shot apply).

Their connections go first (a connection left open would keep a sandbox up), then one suspend
request per metro for all of them: the platform takes a list, and the apply waits for the
answer only (what each instance does then is the platform's work). A refused instance is a
warning for its session only: the work is done, the instance only stays up (scale-to-zero
may still put it to standby).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reconciler import errors
from reconciler._util.fanout import each
from reconciler.cloud.metros import MetroRegistry
from reconciler.reconcile import actions
from reconciler.reconcile.events import Event, Reporter
from reconciler.transport import links
from reconciler.transport.pool import TransportPool

__all__ = ["suspend_all"]


def suspend_all(
    todo: Sequence[actions.SuspendInstance],
    metros: MetroRegistry,
    pool: TransportPool,
    reporter: Reporter,
    concurrency: int,
    status_path: Path,
) -> set[str]:
    """Suspend the instances of `todo`; the sessions whose suspend was accepted."""

    def disconnect(item: actions.SuspendInstance) -> None:
        # the connection of this apply is to a sandbox about to sleep, and any an earlier
        # command kept: a connection left open would keep it up
        pool.drop(item.session)
        links.drop_session(status_path, item.session)

    each(todo, disconnect, concurrency=concurrency, name="ukc-suspend")
    by_metro: dict[str, list[actions.SuspendInstance]] = {}
    for item in todo:
        by_metro.setdefault(item.metro, []).append(item)

    def one_metro(items: list[actions.SuspendInstance]) -> set[str]:
        names = [item.instance_name for item in items]
        try:
            refused: dict[str, errors.UkcError] = dict(
                metros.get(items[0].metro).api.suspend_instances(names)
            )
        except errors.UkcError as err:
            refused = {name: err for name in names}
        accepted = set()
        for item in items:
            why = refused.get(item.instance_name)
            if why is not None:
                text = f"warning: instance {item.instance_name} not suspended (it stays up): {why}"
            else:
                accepted.add(item.session)
                text = (
                    f"suspended instance {item.instance_name}: idle until the next apply with work"
                )
            reporter.event(Event(item.session, "info", text))
        return accepted

    done = each(list(by_metro.values()), one_metro, concurrency=concurrency, name="ukc-suspend")
    return set().union(*done)
