"""A sandbox's pid namespace is known by a pinned fd, never by its reusable inode number.

Real pid namespaces, made by bubblewrap the way the runtime makes them (an outer bwrap whose
only child is the namespace's pid 1), without the rest of a sandbox.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from reconciler.local.sandbox.pidns import PidNamespace, proc_state
from tests.support.waiting import eventually

pytestmark = pytest.mark.skipif(shutil.which("bwrap") is None, reason="needs bubblewrap")

BOTH_PATHS = pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "no-pidfd"])


@dataclass
class Namespace:
    bwrap: subprocess.Popen[bytes]
    init_pid: int

    @property
    def link(self) -> tuple[int, int]:
        st = os.stat(f"/proc/{self.init_pid}/ns/pid")
        return st.st_dev, st.st_ino


def _start_namespace() -> Namespace:
    """`bwrap --unshare-pid ... sleep`: the outer bwrap and the namespace's pid 1 it names."""
    r, w = os.pipe()
    argv = ["bwrap", "--unshare-pid", "--die-with-parent", "--info-fd", str(w)]
    if os.geteuid() != 0:
        argv += ["--unshare-user"]
    argv += ["--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "sleep", "600"]
    proc = subprocess.Popen(argv, pass_fds=(w,), stdin=subprocess.DEVNULL)
    os.close(w)
    with os.fdopen(r, "rb") as info:
        data = b""
        while not data.rstrip().endswith(b"}"):
            chunk = info.read1(4096)
            if not chunk:
                break
            data += chunk
    return Namespace(proc, int(json.loads(data)["child-pid"]))


def _kill(ns: Namespace) -> None:
    ns.bwrap.kill()
    with_pidfd = os.pidfd_open(ns.init_pid) if proc_state(ns.init_pid) not in ("", "Z") else None
    if with_pidfd is not None:
        signal.pidfd_send_signal(with_pidfd, signal.SIGKILL)
        os.close(with_pidfd)
    ns.bwrap.wait()


@contextmanager
def namespaces() -> Iterator[list[Namespace]]:
    made: list[Namespace] = []
    try:
        yield made
    finally:
        for ns in made:
            if ns.bwrap.poll() is None:
                _kill(ns)


@BOTH_PATHS
def test_a_namespace_made_after_the_pinned_one_died_is_never_taken_for_it(
    use_pidfd: bool,
) -> None:
    with namespaces() as made:
        old = _start_namespace()
        made.append(old)
        pinned = PidNamespace.pin(old.init_pid, old.bwrap.pid, use_pidfd=use_pidfd)
        assert pinned is not None
        try:
            assert pinned.ident == old.link
            assert eventually(
                lambda: len(pinned.members()) == 2, 30.0
            )  # bwrap as pid 1, then sleep
            assert old.init_pid in pinned.members()
            _kill(old)
            assert eventually(lambda: pinned.members() == [], 30.0)
            # why: the kernel gives a freed namespace's number to the next one made; these are
            # the namespaces that would have got it, were it not pinned
            for _ in range(8):
                new = _start_namespace()
                made.append(new)
                assert new.link != pinned.ident
                assert not pinned.holds(new.init_pid)
            assert pinned.members() == []
            assert pinned.init_exited()
        finally:
            pinned.release()
        assert pinned.members() == []


@BOTH_PATHS
def test_the_reap_ends_when_pid_1_exits_though_it_lingers_as_a_zombie(use_pidfd: bool) -> None:
    with namespaces() as made:
        ns = _start_namespace()
        made.append(ns)
        pinned = PidNamespace.pin(ns.init_pid, ns.bwrap.pid, use_pidfd=use_pidfd)
        assert pinned is not None
        try:
            # why: a stopped parent does not reap, so the namespace's pid 1 stays a zombie
            os.kill(ns.bwrap.pid, signal.SIGSTOP)
            assert not pinned.init_exited()
            pinned.signal_init(signal.SIGKILL)
            assert asyncio.run(pinned.wait_init_exit(30.0)) is True
            assert proc_state(ns.init_pid) == "Z"
            assert pinned.members() == [ns.init_pid]
        finally:
            pinned.release()
            ns.bwrap.kill()
            ns.bwrap.wait()


def test_a_pid_whose_parent_is_not_the_namespaces_bwrap_is_not_pinned() -> None:
    with namespaces() as made:
        ns = _start_namespace()
        made.append(ns)
        # why: what a reused pid looks like: some process, but not the only child of the bwrap
        assert PidNamespace.pin(os.getpid(), ns.bwrap.pid) is None
        assert PidNamespace.pin(ns.bwrap.pid, ns.bwrap.pid) is None
        pinned = PidNamespace.pin(ns.init_pid, ns.bwrap.pid)
        assert pinned is not None
        pinned.release()


def test_members_looked_for_among_given_pids_are_those_of_them_in_the_namespace() -> None:
    with namespaces() as made:
        ns = _start_namespace()
        made.append(ns)
        pinned = PidNamespace.pin(ns.init_pid, ns.bwrap.pid)
        assert pinned is not None
        try:
            # why: the sandbox's cgroup also holds its outer bwrap, which is not a member
            among = [ns.bwrap.pid, ns.init_pid, os.getpid()]
            assert pinned.members(among) == [ns.init_pid]
        finally:
            pinned.release()
