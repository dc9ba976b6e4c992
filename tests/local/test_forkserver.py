"""The launch server, attacked: what a launched child holds, what it can reach, what it can
signal, and what happens when the server goes.

The children here run a stand-in for bwrap (a shell script) so each test sees exactly what
the launcher hands over at its exec; the tests at the end boot real sandboxes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reconciler.local.sandbox.bwrap import BASE_ENV
from reconciler.local.sandbox.forkserver import Launched, LaunchServer
from tests.support.sandbox_harness import EdgeHarness, needs_metro_tools
from tests.support.waiting import eventually

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def _fake_bwrap(tmp_path: Path, body: str) -> str:
    path = tmp_path / "bwrap"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _plan(bwrap: str, args_fd: int) -> dict[str, Any]:
    return {
        "bwrap": bwrap,
        "args_fd": args_fd,
        "command": [],
        "parent": 0,
        "cgroup_procs": [],
        "ids": None,
        "workspace": "",
        "files": {},
    }


def _fd_targets(proc_pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{proc_pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            out[int(name)] = os.readlink(f"/proc/{proc_pid}/fd/{name}")
    return out


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return False
    return data[data.rfind(b")") + 2 :][:1] not in (b"Z", b"X")


async def _until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def test_a_launched_child_holds_exactly_its_console_and_the_fds_it_was_given(
    tmp_path: Path,
) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> tuple[dict[int, str], dict[int, str], dict[int, str]]:
        server = LaunchServer(dict(BASE_ENV))
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        # why high numbers: the server receives them at low ones, so a copy left at the
        # received number would show
        a, b = os.dup2(w1, 60), os.dup2(r2, 61)
        try:
            child = await server.launch(_plan(bwrap, b), {a: a, b: b})
            await _until(lambda: _comm(child.pid) == "sleep")
            held = _fd_targets(child.pid)
            ours = {n: os.readlink(f"/proc/self/fd/{n}") for n in (a, b)}
            server_pid = server.pid
            assert server_pid is not None
            server_fds = _fd_targets(server_pid)
            child.killpg(signal.SIGKILL)
            assert await child.wait() == -signal.SIGKILL
            return held, ours, server_fds
        finally:
            await server.close()
            for fd in (r1, w1, r2, w2, a, b):
                os.close(fd)

    held, ours, server_fds = _run(go())
    assert set(held) == {0, 1, 2, 60, 61}, held
    assert held[60] == ours[60] and held[61] == ours[61]
    assert held[0] == "/dev/null"
    assert held[1] == held[2] and held[1].startswith("pipe:")
    # the server's socket (and everything else it holds) stayed behind
    assert not {t for t in server_fds.values() if t.startswith("socket:")} & set(held.values())


def test_the_launch_servers_socket_has_no_name_anything_could_connect_to(tmp_path: Path) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> list[str]:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            child = await server.launch(_plan(bwrap, r), {r: r})
            server_pid = server.pid
            assert server_pid is not None
            inodes = [
                m.group(1)
                for t in _fd_targets(server_pid).values()
                if (m := re.fullmatch(r"socket:\[(\d+)\]", t))
            ]
            child.killpg(signal.SIGKILL)
            await child.wait()
            return inodes
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    inodes = _run(go())
    assert inodes
    # /proc/net/unix: Num RefCount Protocol Flags Type St Inode [Path]
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[6] in inodes:
            assert len(fields) == 7, line  # no path, no abstract name


def test_the_server_signals_no_process_that_is_not_its_unreaped_child(tmp_path: Path) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")
    # a process group of someone else's (as a reused pid would be)
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)

    async def go() -> None:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            child = await server.launch(_plan(bwrap, r), {r: r})
            server.signal(bystander.pid, signal.SIGKILL)
            # a request after it proves the server has read (and ignored) the one before
            child.killpg(signal.SIGKILL)
            assert await child.wait() == -signal.SIGKILL
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    try:
        _run(go())
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_a_signal_sent_the_moment_a_launch_returns_reaches_the_child(tmp_path: Path) -> None:
    # why it matters: a sandbox stopped while it boots is signalled at once, and before the
    # child's setsid its pid names no process group
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> list[int]:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            codes = []
            for _ in range(50):
                child = await server.launch(_plan(bwrap, r), {r: r})
                child.killpg(signal.SIGKILL)
                codes.append(await asyncio.wait_for(child.wait(), 10))
            return codes
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    assert _run(go()) == [-signal.SIGKILL] * 50


def _children(pid: int) -> set[int]:
    out: set[int] = set()
    for task in os.listdir(f"/proc/{pid}/task"):
        text = Path(f"/proc/{pid}/task/{task}/children").read_text()
        out |= {int(c) for c in text.split()}
    return {c for c in out if _alive(c)}


def test_a_launch_given_up_while_it_forks_leaves_no_process_behind(tmp_path: Path) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> set[int]:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            first = await server.launch(_plan(bwrap, r), {r: r})
            first.killpg(signal.SIGKILL)
            await first.wait()
            server_pid = server.pid
            assert server_pid is not None
            task = asyncio.create_task(server.launch(_plan(bwrap, r), {r: r}))
            await asyncio.sleep(0)  # it has sent its request and waits for the pid
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await asyncio.sleep(0.3)
            return _children(server_pid)
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    assert _run(go()) == set()


def test_a_request_the_server_cannot_read_leaves_it_and_its_children_running(
    tmp_path: Path,
) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> tuple[int | None, int | None, int | None]:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            child = await server.launch(_plan(bwrap, r), {r: r})
            before = server.pid
            assert server._sock is not None
            server._send(server._sock, ("launch", "not a number"), [])
            again = await server.launch(_plan(bwrap, r), {r: r})
            after = server.pid
            code = child.returncode
            for c in (child, again):
                c.killpg(signal.SIGKILL)
                await c.wait()
            return before, after, code
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    before, after, code = _run(go())
    assert before == after and code is None


def test_a_childs_exit_code_is_reported_and_then_its_pid_is_never_signalled(
    tmp_path: Path,
) -> None:
    bwrap = _fake_bwrap(tmp_path, "exit 7")

    async def go() -> Launched:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            child = await server.launch(_plan(bwrap, r), {r: r})
            assert await child.wait() == 7
            sent: list[tuple[int, int]] = []
            server.signal = lambda pid, sig: sent.append((pid, sig))  # type: ignore[method-assign]
            child.killpg(signal.SIGKILL)
            assert sent == []
            return child
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    assert _run(go()).returncode == 7


def test_a_launch_error_reaches_the_console_as_one_line_and_code_125(tmp_path: Path) -> None:
    async def go() -> tuple[int, bytes]:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            child = await server.launch(_plan(str(tmp_path / "no-such-bwrap"), r), {r: r})
            assert child.stdout is not None
            out = await child.stdout.read()
            return await child.wait(), out
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    code, out = _run(go())
    assert code == 125
    assert out.startswith(b"launch: ") and out.count(b"\n") == 1, out


def test_launched_processes_die_with_the_server_and_their_waits_end(tmp_path: Path) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> tuple[int, int]:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            child = await server.launch(_plan(bwrap, r), {r: r})
            await _until(lambda: _comm(child.pid) == "sleep")
            server_pid = server.pid
            assert server_pid is not None
            os.kill(server_pid, signal.SIGKILL)
            code = await child.wait()
            await _until(lambda: not _alive(child.pid))
            # the next launch starts a new server
            again = await server.launch(_plan(bwrap, r), {r: r})
            again.killpg(signal.SIGKILL)
            await again.wait()
            return code, child.pid
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    code, _ = _run(go())
    assert code == -signal.SIGKILL


def test_an_fd_meant_for_a_console_number_fails_the_launch_and_is_never_placed(
    tmp_path: Path,
) -> None:
    bwrap = _fake_bwrap(tmp_path, "exec sleep 60")

    async def go() -> bytes:
        server = LaunchServer(dict(BASE_ENV))
        r, w = os.pipe()
        try:
            # fd number 1 is the console's: refused by the child, never placed over stdout
            child = await server.launch(_plan(bwrap, r), {1: r})
            assert child.stdout is not None
            out = await child.stdout.read()
            assert await child.wait() == 125
            return out
        finally:
            await server.close()
            os.close(r)
            os.close(w)

    assert _run(go()).startswith(b"launch: ")


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeHarness]:
    h = EdgeHarness(tmp_path_factory.mktemp("fs"))
    yield h
    h.close()


@needs_metro_tools
@pytest.mark.metro
class TestRealSandboxes:
    def test_no_process_of_a_sandbox_holds_the_launch_servers_socket(
        self, harness: EdgeHarness
    ) -> None:
        uuid = "fs-socket-uuid"
        harness.start(uuid, "fsock")
        try:
            server = harness.runtime.launch_server_pid()
            assert server is not None
            sockets = {t for t in _fd_targets(server).values() if t.startswith("socket:")}
            assert sockets
            pids = harness.runtime.pids(uuid)
            assert len(pids) >= 2
            for pid in pids:
                assert not set(_fd_targets(pid).values()) & sockets, pid
        finally:
            harness.lt.run(harness.runtime.destroy(uuid))

    def test_a_secret_env_value_is_nowhere_in_the_launch_servers_memory(
        self, harness: EdgeHarness
    ) -> None:
        value = "s3cr3t-" + secrets.token_hex(12)
        uuid = "fs-secret-uuid"
        harness.start(uuid, "fsecret", env={"API_SECRET": value})
        try:
            server = harness.runtime.launch_server_pid()
            assert server is not None
            memory = _memory(server)
            assert b"The launch server: one per daemon" in memory  # it does read the memory
            assert value.encode() not in memory
            assert value.encode() not in Path(f"/proc/{server}/environ").read_bytes()
            assert value.encode() not in Path(f"/proc/{server}/cmdline").read_bytes()
        finally:
            harness.lt.run(harness.runtime.destroy(uuid))

    def test_closing_the_runtime_ends_the_launch_server(self, tmp_path: Path) -> None:
        h = EdgeHarness(tmp_path)
        try:
            h.start("fs-close-uuid", "fclose")
            server = h.runtime.launch_server_pid()
            assert server is not None
        finally:
            h.close()
        assert eventually(lambda: not _alive(server), 10)


def _memory(pid: int) -> bytes:
    """Every readable mapping of a process (root reads another's memory through /proc)."""
    chunks = []
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "[vvar]" in line or "[vsyscall]" in line:
                continue
            lo, hi = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(lo)
                chunks.append(mem.read(hi - lo))
            except OSError:
                continue
    return b"".join(chunks)
