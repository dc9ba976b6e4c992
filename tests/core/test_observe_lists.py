"""The observer's instance list runs on a thread kept between observations (a watch lists on
every pass: a thread started per list delayed every edit on a loaded machine)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from reconciler.cloud.model import Instance
from reconciler.reconcile import identity
from reconciler.reconcile import observe as observe_module
from reconciler.reconcile.desired import load_groups
from reconciler.reconcile.observe import observe, start_listing
from reconciler.status.schema import StatusDoc
from tests.support.planning import INST_HASH, OWNER, PROJECT, desired, instance
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


class _RunningApi(_Api):
    """A metro whose list shows the session's instance running and ours."""

    def __init__(self, inst: Instance) -> None:
        super().__init__()
        self.inst = inst

    def list_instances(self, tags: list[str]) -> list[Instance]:
        super().list_instances(tags)
        return [self.inst]


def test_an_observation_given_a_list_already_ended_lists_once_and_still_hints(
    tmp_path: Path,
) -> None:
    # the apply loop starts the first round's list as soon as it holds the lock; it may end
    # before the observation begins, and the hint "tree changed, instance running" still comes
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "a.txt").write_text("a\n")
    spec = tmp_path / "session.yaml"
    spec.write_text("name: web\ndirectory: ./tree\n")
    [group] = load_groups([spec], {})
    inst = instance(
        desired(
            name="web",
            instance_name=identity.instance_name(PROJECT, "web"),
            tags=tuple(identity.owner_tags(PROJECT, "web", INST_HASH, OWNER.id)),
        )
    )
    api = _RunningApi(inst)
    metros: Any = SimpleNamespace(get=lambda metro: SimpleNamespace(api=api))
    doc = StatusDoc()
    listing = start_listing(group, doc, metros, OWNER.project, None)
    listing.wait()
    hinted: list[str] = []
    obs = observe(
        group,
        doc,
        metros,
        {},
        owner=OWNER,
        salt=b"salt",
        listing=listing,
        on_tree_changed=lambda name, *_: hinted.append(name),
    )
    assert len(api.threads) == 1
    assert obs.claimed == {"web": inst}
    assert eventually(lambda: hinted == ["web"], 5)
