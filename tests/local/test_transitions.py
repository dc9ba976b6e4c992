"""The metro's background transitions at shutdown: teardowns finish, the rest is cancelled."""

from __future__ import annotations

import asyncio
import gc
import warnings

from reconciler.local.state.tasks import Transitions


def test_a_transition_cancelled_before_its_first_step_leaves_no_coroutine_unawaited() -> None:
    started: list[str] = []

    async def notify() -> None:
        started.append("notify")

    async def main() -> None:
        transitions = Transitions()
        transitions.spawn(notify())
        await transitions.close()  # before the loop ever ran the task

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        asyncio.run(main())
        gc.collect()
    assert started == []
    assert [str(w.message) for w in caught if w.category is RuntimeWarning] == []


def test_a_teardown_spawned_just_before_close_still_runs_to_its_end() -> None:
    done: list[str] = []

    async def teardown() -> None:
        await asyncio.sleep(0.01)
        done.append("torn down")

    async def main() -> None:
        transitions = Transitions()
        transitions.spawn_teardown(teardown())
        await transitions.close()

    asyncio.run(main())
    assert done == ["torn down"]
