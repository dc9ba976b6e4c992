"""`instances.json`: the metro's records are written off the event loop, newest last."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

from reconciler._util.atomic import write_atomic
from reconciler.local.state.records import LocalInstance
from reconciler.local.state.store import InstanceStore


def _record(name: str) -> LocalInstance:
    return LocalInstance(uuid=f"{name}-uuid", name=name, seq=1, created_at=0.0, image="img")


def _names(path: Path) -> list[str]:
    return [item["name"] for item in json.loads(path.read_text())["instances"]]


class HeldWrite:
    """A file write that waits, inside the write, until released (a slow disk's fsync)."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()
        #: whether every held write was released (rather than given up on after 10 s)
        self.released = True

    def __call__(self, path: Path, data: bytes) -> None:
        self.entered.set()
        self.released &= self.release.wait(10)
        write_atomic(path, data, mode=0o600)


def test_the_event_loop_runs_on_while_the_records_are_being_written(tmp_path: Path) -> None:
    held = HeldWrite()
    records = [_record("a")]
    store = InstanceStore(tmp_path, lambda: records, save_delay_s=0.01, write=held)

    async def scenario() -> None:
        store.mark_dirty()
        while not held.entered.is_set():
            await asyncio.sleep(0.01)
        # the loop itself releases the write: it can only if the write does not block it
        held.release.set()
        await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert held.released, "the write held the event loop"
    assert _names(tmp_path / "instances.json") == ["a"]


def test_a_write_still_running_at_close_does_not_land_over_the_newer_records(
    tmp_path: Path,
) -> None:
    held = HeldWrite()
    records = [_record("old")]
    store = InstanceStore(tmp_path, lambda: list(records), save_delay_s=0.01, write=held)

    async def scenario() -> None:
        store.mark_dirty()
        while not held.entered.is_set():
            await asyncio.sleep(0.01)
        records.append(_record("new"))
        # why a timer: the write in flight ends while close waits for it
        threading.Timer(0.2, held.release.set).start()
        await store.close()

    asyncio.run(asyncio.wait_for(scenario(), 20))
    assert _names(tmp_path / "instances.json") == ["old", "new"]


def test_a_change_made_while_the_records_are_written_is_saved_by_the_next_round(
    tmp_path: Path,
) -> None:
    held = HeldWrite()
    records = [_record("a")]
    store = InstanceStore(tmp_path, lambda: list(records), save_delay_s=0.01, write=held)

    async def scenario() -> None:
        store.mark_dirty()
        while not held.entered.is_set():
            await asyncio.sleep(0.01)
        records.append(_record("b"))
        store.mark_dirty()
        held.release.set()
        for _ in range(500):
            await asyncio.sleep(0.01)
            path = tmp_path / "instances.json"
            if path.exists() and _names(path) == ["a", "b"]:
                return
        raise AssertionError("the change made during the write was never saved")

    asyncio.run(asyncio.wait_for(scenario(), 20))
