"""Which limit mechanism a daemon picks, and what a sandbox cgroup is given.

The kernel side (a fork bomb refused, a memory hog stopping its instance) is attacked in
tests/security/test_sandbox_escape.py; here the choice and the files written, with a plain
directory standing in for a cgroup fs where the machine cannot provide the real one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.local.sandbox.limits import Limiter, _cgroup_lines, _mounts, _own_dir

V1_CGROUP = "8:pids:/\n4:memory:/process_api/abc\n0::/\n"


def v1_mountinfo(root: Path) -> str:
    return (
        f"31 25 0:27 / {root}/memory rw,relatime shared:10 - cgroup cgroup rw,memory\n"
        f"35 25 0:31 / {root}/pids rw,relatime shared:14 - cgroup cgroup rw,pids\n"
        f"36 25 0:32 / {root}/unified rw,relatime shared:15 - cgroup2 cgroup2 rw\n"
    )


def test_mountinfo_and_proc_cgroup_are_read_with_their_roots() -> None:
    mounts = _mounts(
        "31 25 0:27 /process_api /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "40 25 0:99 / /proc rw - proc proc rw\n"
    )
    assert [(m.point, m.fstype, "memory" in m.options) for m in mounts] == [
        (Path("/sys/fs/cgroup/memory"), "cgroup", True)
    ]
    paths = _cgroup_lines("4:memory:/process_api/abc\n5:cpu,cpuacct:/x\n0::/user.slice\n")
    assert paths == {"memory": "/process_api/abc", "cpu": "/x", "cpuacct": "/x", "": "/user.slice"}
    assert _own_dir(mounts[0], "/process_api/abc") == Path("/sys/fs/cgroup/memory/abc")
    assert _own_dir(mounts[0], "/elsewhere") is None


def test_cgroup_v1_is_chosen_for_root_and_limits_memory_swap_and_tasks(tmp_path: Path) -> None:
    (tmp_path / "memory" / "process_api" / "abc").mkdir(parents=True)
    (tmp_path / "pids").mkdir()
    limiter = Limiter.detect(mountinfo=v1_mountinfo(tmp_path), cgroup=V1_CGROUP, euid=0)
    assert limiter.mechanism == "cgroup v1"
    cg = limiter.create(64 << 20, 100)
    mem, pids = cg.dirs
    assert mem.parent == tmp_path / "memory" / "process_api" / "abc"
    assert pids.parent == tmp_path / "pids"
    assert (mem / "memory.limit_in_bytes").read_text() == str(64 << 20)
    assert (mem / "memory.memsw.limit_in_bytes").read_text() == str(64 << 20)
    assert (pids / "pids.max").read_text() == "100"
    assert cg.procs == [mem / "cgroup.procs", pids / "cgroup.procs"]
    (mem / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    assert cg.oom_kills() == 2


def test_cgroup_v1_is_not_for_a_non_root_daemon(tmp_path: Path) -> None:
    (tmp_path / "memory" / "process_api" / "abc").mkdir(parents=True)
    (tmp_path / "pids").mkdir()
    limiter = Limiter.detect(mountinfo=v1_mountinfo(tmp_path), cgroup=V1_CGROUP, euid=1000)
    assert limiter.mechanism == "rlimit"
    assert not limiter.uses_cgroups


def test_a_delegated_cgroup_v2_is_preferred_and_kills_the_whole_group_on_oom(
    tmp_path: Path,
) -> None:
    own = tmp_path / "unified" / "user.slice" / "ukc.service"
    own.mkdir(parents=True)
    (own / "cgroup.controllers").write_text("cpu memory pids\n")
    (own / "cgroup.subtree_control").write_text("memory pids\n")
    mountinfo = f"36 25 0:32 / {tmp_path}/unified rw - cgroup2 cgroup2 rw\n"
    limiter = Limiter.detect(mountinfo=mountinfo, cgroup="0::/user.slice/ukc.service\n", euid=1000)
    assert limiter.mechanism == "cgroup v2"
    cg = limiter.create(128 << 20, 512)
    (d,) = cg.dirs
    assert d.parent == own
    assert (d / "memory.max").read_text() == str(128 << 20)
    assert (d / "memory.swap.max").read_text() == "0"
    assert (d / "memory.oom.group").read_text() == "1"
    assert (d / "pids.max").read_text() == "512"
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 0\noom_group_kill 1\n")
    assert cg.oom_kills() == 1
    assert cg.oom_eventfd() is None  # v2 needs no notification: the group dies together


def test_cgroup_v2_without_memory_and_pids_falls_back_to_rlimits(tmp_path: Path) -> None:
    own = tmp_path / "unified"
    own.mkdir()
    (own / "cgroup.controllers").write_text("hugetlb\n")
    mountinfo = f"36 25 0:32 / {own} rw - cgroup2 cgroup2 rw\n"
    assert Limiter.detect(mountinfo=mountinfo, cgroup="0::/\n", euid=1000).mechanism == "rlimit"


def test_this_machine_gives_a_root_daemon_cgroups() -> None:
    if os.geteuid() != 0:
        pytest.skip("cgroup v1 needs a root daemon")
    limiter = Limiter.detect()
    if not limiter.uses_cgroups:
        pytest.skip(f"no usable cgroups on this machine: {limiter.describe()}")
    cg = limiter.create(32 << 20, 16)
    try:
        assert all(d.is_dir() for d in cg.dirs)
        assert cg.oom_kills() == 0
    finally:
        cg.remove()
    assert not any(d.exists() for d in cg.dirs)
