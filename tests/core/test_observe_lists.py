"""The observer's instance list runs on a thread kept between observations (a watch lists on
every pass: a thread started per list delayed every edit on a loaded machine)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reconciler.cloud.model import Instance
from reconciler.reconcile import observe as observe_module
from reconciler.reconcile.desired import load_groups
from reconciler.reconcile.observe import observe
from reconciler.status.schema import StatusDoc
from tests.support.planning import OWNER
from tests.support.waiting import eventually


class _Api:
    """A metro whose list is empty and says on which thread it was asked."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []

    def list_instances(self, tags: list[str]) -> list[Instance]:
        self.threads.append(threading.current_thread())
        return []


def test_successive_observations_list_on_one_kept_thread(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_text("a\n")
    spec = tmp_path / "session.yaml"
    spec.write_text("name: web\ndirectory: ./tree\n")
    [group] = load_groups([spec], {})
    api = _Api()
    metros: Any = SimpleNamespace(get=lambda metro: SimpleNamespace(api=api))
    for _ in range(3):
        obs = observe(group, StatusDoc(), metros, {}, owner=OWNER, salt=b"salt")
        assert obs.instances == {}
        # the list's thread goes back to wait for the next one once it has told its hints
        assert eventually(lambda: observe_module._LIST_THREADS.idle >= 1, 5)
    assert len(api.threads) == 3
    assert api.threads[0] is api.threads[1] is api.threads[2]
    assert api.threads[0] is not threading.current_thread()
