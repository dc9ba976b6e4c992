"""The project lease against the local metro's real API (in-process, no sandboxes): one
holder at a time, a bounded wait, a takeover after expiry, never another owner's lease."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler import errors
from reconciler.cloud.api import UkcApi
from reconciler.reconcile import identity, lease
from tests.support.inproc_metro import InProcessMetro

PROJECT = "abcd1234"
ME = identity.Owner(PROJECT, "1" * 32, frozenset({"1" * 32}), "UKC_SESSION_SECRET")
OTHER = identity.Owner(PROJECT, "2" * 32, frozenset({"2" * 32}), "UKC_SESSION_SECRET")
IMAGE = "ukc/local-sandbox:latest"


@pytest.fixture
def api(tmp_path: Path) -> Iterator[UkcApi]:
    metro = InProcessMetro(tmp_path)
    try:
        with UkcApi(metro.url, metro.token, metro="local") as client:
            yield client
    finally:
        metro.close()


def make(api: UkcApi, holder: str, owner: identity.Owner = ME, **kw: object) -> lease.Lease:
    return lease.Lease(api, project=PROJECT, owner=owner, image=IMAGE, holder=holder, **kw)  # type: ignore[arg-type]


def test_the_first_runner_holds_the_lease_and_the_second_is_told_who_does(api: UkcApi) -> None:
    first = make(api, "ci-a:pid1:aaaaaa")
    first.acquire()
    inst = api.get_instance(lease.lease_name(PROJECT))
    assert inst is not None and inst.uuid == first.uuid and inst.state == "stopped"
    with pytest.raises(errors.LockedError) as err:
        make(api, "ci-b:pid2:bbbbbb").acquire()
    text = str(err.value)
    assert "being applied by ci-a:pid1:aaaaaa" in text and "expires" in text
    assert "--lock-timeout" in text
    first.release()
    assert api.get_instance(lease.lease_name(PROJECT)) is None
    second = make(api, "ci-b:pid2:bbbbbb")
    second.acquire()
    second.release()


def test_a_waiting_runner_says_so_once_and_gets_the_lease_when_it_is_released(
    api: UkcApi,
) -> None:
    first = make(api, "ci-a:pid1:aaaaaa")
    first.acquire()
    said: list[str] = []
    second = make(api, "ci-b:pid2:bbbbbb", on_wait=said.append, poll_s=0.05)
    threading.Timer(0.3, first.release).start()
    second.acquire(timeout_s=10)
    assert second.uuid and second.uuid != first.uuid
    assert len(said) == 1 and "waiting for ci-a:pid1:aaaaaa" in said[0]
    second.release()


def test_an_expired_lease_is_taken_over_and_its_late_holder_learns_it_lost_it(
    api: UkcApi,
) -> None:
    lost: list[str] = []
    dead = make(api, "ci-a:pid1:aaaaaa", clock=lambda: time.time() - 200, on_lost=lost.append)
    dead.acquire()
    said: list[str] = []
    taker = make(api, "ci-b:pid2:bbbbbb", on_wait=said.append)
    taker.acquire()
    assert taker.uuid != dead.uuid
    assert "taking over the expired lease of ci-a:pid1:aaaaaa" in said[0]
    # the late holder's renewal finds its lease gone: it is told, and touches nothing else
    dead.renew_s = 0.05
    with dead:
        deadline = time.monotonic() + 10
        while not lost and time.monotonic() < deadline:
            time.sleep(0.02)
    assert lost and "taken over" in lost[0]
    inst = api.get_instance(lease.lease_name(PROJECT))
    assert inst is not None and inst.uuid == taker.uuid
    assert identity.tag_value(inst.tags, lease.HOLDER_TAG) == "ci-b:pid2:bbbbbb"


def test_renewing_moves_the_expiry_forward(api: UkcApi) -> None:
    now = [1_000_000.0]
    held = make(api, "ci-a:pid1:aaaaaa", clock=lambda: now[0])
    held.acquire()
    now[0] += 40
    held.renew()
    inst = api.get_instance(lease.lease_name(PROJECT))
    assert inst is not None
    assert identity.tag_value(inst.tags, lease.EXPIRES_TAG) == str(int(now[0] + lease.TTL_S))
    held.release()


def test_another_owners_lease_is_never_deleted_even_expired(api: UkcApi) -> None:
    theirs = make(api, "elsewhere:pid9:cccccc", owner=OTHER, clock=lambda: time.time() - 500)
    theirs.acquire()
    with pytest.raises(errors.LockedError) as err:
        make(api, "ci-b:pid2:bbbbbb").acquire(timeout_s=0.2)
    assert "another owner" in str(err.value) and "elsewhere:pid9:cccccc" in str(err.value)
    inst = api.get_instance(lease.lease_name(PROJECT))
    assert inst is not None and inst.uuid == theirs.uuid


def race(api: UkcApi, names: list[str]) -> tuple[list[str], list[str]]:
    """Runners started at once (a barrier), each trying once: who got it, what the rest heard."""
    held: list[str] = []
    refused: list[str] = []
    barrier = threading.Barrier(len(names))

    def run(who: str) -> None:
        one = make(api, who)
        barrier.wait()
        try:
            one.acquire()
        except errors.LockedError as err:
            refused.append(str(err))
            return
        held.append(who)

    threads = [threading.Thread(target=run, args=(n,)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return held, refused


def test_of_twenty_pairs_racing_for_the_lease_exactly_one_of_each_holds_it(api: UkcApi) -> None:
    for pair in range(20):
        held, refused = race(api, [f"r{pair}a:pid1:aaaaaa", f"r{pair}b:pid2:bbbbbb"])
        assert len(held) == 1 and len(refused) == 1, (held, refused)
        assert f"being applied by {held[0]}" in refused[0]
        inst = api.get_instance(lease.lease_name(PROJECT))
        assert inst is not None
        api.delete_instance(inst.name, uuid=inst.uuid)


def test_a_holder_renews_while_it_works_and_deletes_its_lease_when_done(api: UkcApi) -> None:
    now = [1_000_000.0]
    held = make(api, "ci-a:pid1:aaaaaa", clock=lambda: now[0], renew_s=0.05)
    held.acquire()
    now[0] += 40
    wanted = str(int(now[0] + lease.TTL_S))
    with held:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            inst = api.get_instance(lease.lease_name(PROJECT))
            assert inst is not None
            if identity.tag_value(inst.tags, lease.EXPIRES_TAG) == wanted:
                break
            time.sleep(0.02)
        else:
            raise AssertionError("the lease was not renewed")
    assert api.get_instance(lease.lease_name(PROJECT)) is None


class CountingCreates:
    """The API, counting create requests (how hard a waiting runner polls)."""

    def __init__(self, inner: UkcApi) -> None:
        self.inner = inner
        self.creates = 0

    def create_instance(self, request: object) -> object:
        self.creates += 1
        return self.inner.create_instance(request)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def lease_state(metro: InProcessMetro) -> str:
    with metro.client() as client:
        items = client.get("/v1/instances", params={"name": lease.lease_name(PROJECT)}).json()
    return str(items["data"]["instances"][0].get("state"))


def test_a_runner_right_after_a_release_gets_the_lease_without_a_lock_timeout_polling_gently(
    tmp_path: Path,
) -> None:
    metro = InProcessMetro(tmp_path)
    try:
        with UkcApi(metro.url, metro.token, metro="local") as api:
            first = make(api, "ci-a:pid1:aaaaaa")
            first.acquire()
            first.release()
            # the release did not wait: its lease still holds the name while it is deleted
            assert lease_state(metro) == "deleted"
            counting = CountingCreates(api)
            second = make(counting, "ci-b:pid2:bbbbbb")  # type: ignore[arg-type]
            second.acquire()  # no lock timeout: nobody holds the lease
            assert second.uuid and second.uuid != first.uuid
            # one create per poll while the name comes free, not a busy loop
            hold = metro.metro.behaviour.delete_hold_s
            assert counting.creates <= hold / lease.NAME_POLL_S + 5, counting.creates
            second.release()
    finally:
        metro.close()


def test_a_released_lease_the_platform_still_reads_as_there_is_taken_over_not_waited_for(
    tmp_path: Path,
) -> None:
    metro = InProcessMetro(tmp_path)
    try:
        with UkcApi(metro.url, metro.token, metro="local") as api:
            first = make(api, "ci-a:pid1:aaaaaa")
            first.acquire()
            first.release()
            # a platform that reads an instance being deleted as still stopping
            metro.faults.deleting_live_count = 1000
            assert lease_state(metro) == "stopping"
            said: list[str] = []
            second = make(api, "ci-b:pid2:bbbbbb", on_wait=said.append)
            second.acquire()  # no lock timeout: the released lease says it expired
            assert second.uuid and second.uuid != first.uuid
            assert said and "taking over the expired lease of ci-a:pid1:aaaaaa" in said[0]
            metro.faults.reset()
            second.release()
    finally:
        metro.close()
