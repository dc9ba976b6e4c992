"""`ukc delete`: remove the sessions that the given specs declare.

Observes first (one list per metro), deletes what still exists and is provably ours, and
cleans the local side (private key, sync records) and records `Deleted`, so a delete
interrupted half-way is finished by running it again. An instance under the session's name
that is not provably ours is left alone, with the local side: the session fails instead.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from reconciler import actions, observer, planner, status
from reconciler.executor import Executor
from reconciler.metro import MetroRegistry
from reconciler.reporting import Event, Reporter

__all__ = ["delete_group"]


def delete_group(
    group: observer.Group,
    *,
    metros: MetroRegistry,
    reporter: Reporter,
    environ: Mapping[str, str],
    lock_timeout_s: float = 0.0,
) -> bool:
    """Delete every session of `group`; True when all are gone."""
    with status.lock(group.status_path, timeout_s=lock_timeout_s):
        doc = status.load(group.status_path)
        obs = observer.observe(group, doc, metros, environ)
        triples = [(d.name, d.instance_name, d.metro) for d in obs.desired]
        the_plan = planner.plan_delete(triples, obs.instances, doc, obs.owner)
        executor = Executor(
            group=group,
            doc=doc,
            observation=obs,
            metros=metros,
            reporter=reporter,
            doc_lock=threading.Lock(),
        )
        ok = True
        for splan in the_plan.sessions:
            if splan.refusal is not None:
                ok = False
                record = doc.sessions.setdefault(splan.session, status.SessionStatus())
                record.phase = "Failed"
                record.message = splan.refusal.reason
                reporter.event(Event(splan.session, "failed", splan.refusal.reason))
                continue
            if splan.actions:
                ok = executor.run_session(splan).ok and ok
                if ok:
                    reporter.event(Event(splan.session, "done", "deleted"))
                continue
            # Already gone in the cloud: finish the local half of the delete.
            desired = next(d for d in obs.desired if d.name == splan.session)
            gone = actions.DeleteInstance(
                splan.session, desired.instance_name, desired.metro, "already gone"
            )
            executor.forget_local(gone)
            reporter.event(Event(splan.session, "done", "already deleted"))
        status.save(group.status_path, doc)
        return ok
