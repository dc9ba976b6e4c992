"""The observer's "tree changed" hint opens a connection for the push to come, unless one is
kept (a watch's next pass): then it does nothing at all. why: it runs on the list's thread
just as the pass resumes, and its work (transport, target, credentials) held the pass up."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reconciler.reconcile.desired import load_groups, sync_options_for
from reconciler.reconcile.loop import _prefetcher
from reconciler.status.schema import InstanceRecord, SessionStatus, StatusDoc
from reconciler.transport.pool import TransportPool
from tests.support.planning import OWNER, desired, instance


class _Kept:
    """A kept connection (never used here)."""

    def close(self) -> None:
        pass


def test_a_hint_for_a_session_whose_connection_is_kept_asks_nothing_of_its_metro(
    tmp_path: Path,
) -> None:
    (tmp_path / "tree").mkdir()
    spec = tmp_path / "session.yaml"
    spec.write_text("name: web\ndirectory: ./tree\n")
    [group] = load_groups([spec], {})
    [loaded] = group.sessions
    inst = instance(desired(name="web"))
    doc = StatusDoc(
        sessions={
            "web": SessionStatus(
                instance=InstanceRecord(
                    name=inst.name, uuid=inst.uuid, start_count=inst.start_count, pin="sha256:x"
                )
            )
        }
    )
    asked: list[str] = []

    def get(metro: str) -> Any:
        asked.append(metro)
        raise AssertionError("the hint reached for the metro")

    metros: Any = SimpleNamespace(get=get)
    pool = TransportPool()
    kept: Any = _Kept()
    pool.keep("web", inst.uuid, kept)
    hint = _prefetcher(group, doc, metros, pool, OWNER)
    hint("web", "ssh", "local", inst, sync_options_for(group, loaded))
    assert asked == []
    assert pool.peek("web") == (inst.uuid, kept)
