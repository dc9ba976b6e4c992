"""Real sandboxes for the local metro: one bubblewrap sandbox per running instance.

`SandboxRuntime` starts, stops, freezes and thaws, destroys and prunes the sandboxes of one
daemon, and opens byte streams to ports inside them (what the TLS edge forwards to). Inside
each sandbox runs the agent (sshd, exec API, plugin API, relay).

A sandbox holds no host privilege. Every sandbox has its own user namespace and nothing in it
has a capability over the host. A root daemon gives each instance a host id range of its own
(`hostids`): `root` inside is an unprivileged host uid that owns the workspace and nothing
else, with a few capabilities that only count inside, and no user namespaces inside. A
non-root daemon runs sandboxes as its own uid with no capabilities at all. Memory and process
limits come from `limits`; a sandbox killed for lack of memory is reported as such.

Nothing host-visible names the instance: the runtime is never told the name, the hostname is
the uuid, bubblewrap's arguments travel through a pipe, and the instance env (which may hold
secrets, or `LD_PRELOAD`) reaches only the agent inside, through another pipe, never the
environment of a process that runs on the host side. The runtime creates the listening
sockets and hands them to the agent as inherited file descriptors, so nothing the sandbox
writes can replace them; the only host path a sandbox writes is its `/workspace`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from reconciler.errors import LocalMetroError
from reconciler.local.behaviour import BootOptions
from reconciler.local.sandbox import volumefs
from reconciler.local.sandbox.agent import envpipe
from reconciler.local.sandbox.box import Box, read_boot_id, read_init_pid
from reconciler.local.sandbox.bwrap import (
    BASE_ENV,
    BWRAP,
    bind_sources,
    bwrap_options,
    check_host,
    host_files,
    volume_source,
)
from reconciler.local.sandbox.files import (
    HOST_KEY,
    drop_memory_workspace,
    prepare_accounts,
    prepare_instance_dir,
    prepare_workspace,
    remove_tree,
    reset_memory_workspace,
)
from reconciler.local.sandbox.forkserver import LaunchServer
from reconciler.local.sandbox.handoff import listen_unix, pipe_with
from reconciler.local.sandbox.hostids import HostIds, IdRange
from reconciler.local.sandbox.layout import WORKSPACE, Mount, SandboxLayout
from reconciler.local.sandbox.limits import Cgroup, Limiter

__all__ = ["DEFAULT_MAX_PIDS", "DEFAULT_MEMORY_MB", "SandboxRuntime"]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

SSHD = "/usr/sbin/sshd"
READY_TIMEOUT_S = 15.0
CONNECT_ACK_TIMEOUT_S = 10.0
STREAM_LIMIT = 256 * 1024
DEFAULT_MEMORY_MB = 128
DEFAULT_MAX_PIDS = 512


@dataclass
class _Prepared:
    """What a boot's file work (`SandboxRuntime._prepare`) made for its launch."""

    ids: IdRange | None
    workspace: Path
    files: dict[str, str]
    sources: dict[str, str]
    cgroup: Cgroup | None = None
    plugin: socket.socket | None = None
    relay: socket.socket | None = None

    def discard(self) -> None:
        """Undo it when the launch never happens (a failure, or the boot was cancelled)."""
        for sock in (self.plugin, self.relay):
            if sock is not None:
                sock.close()
        if self.cgroup is not None:
            self.cgroup.remove()


async def _off_loop(work: Callable[[], _T], undo: Callable[[_T], None]) -> _T:
    """`work()` in a worker thread; when the waiting task is cancelled, `undo` what it made
    once it is done (a thread cannot be stopped, and what it made would be left behind)."""
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(None, work)

    def late(done: asyncio.Future[_T]) -> None:
        if not done.cancelled() and done.exception() is None:
            try:
                # why a thread again: undoing is file work too (a cgroup's rmdir)
                loop.run_in_executor(None, undo, done.result())
            except RuntimeError:  # the loop is shutting down: no more threads
                undo(done.result())

    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(late)
        raise


def _env_bytes(uuid: str, env: dict[str, str]) -> bytes:
    try:
        return envpipe.encode(env)
    except ValueError as exc:
        raise LocalMetroError(f"sandbox {uuid}: {exc}") from None


class SandboxRuntime:
    """Starts, stops, freezes and connects to the bubblewrap sandboxes of one daemon."""

    def __init__(
        self,
        state_dir: Path,
        on_exit: Callable[[str, int, bool], None],
        *,
        bwrap: str = BWRAP,
        sshd: str = SSHD,
        max_pids: int = DEFAULT_MAX_PIDS,
        limiter: Limiter | None = None,
        host_ids: HostIds | None = None,
    ) -> None:
        # why: bwrap/sshd paths are injectable so the "not installed" answers can be tested
        self._bwrap = bwrap
        self._sshd = sshd
        self.state_dir = state_dir
        self.layout = SandboxLayout(state_dir)
        self.max_pids = max_pids
        self._on_exit = on_exit
        self._privileged = os.geteuid() == 0
        self._ids = host_ids if host_ids is not None else HostIds() if self._privileged else None
        self._limiter = limiter
        self._boxes: dict[str, Box] = {}
        #: the shared account files are written once per runtime, by the first boot
        self._accounts_lock = threading.Lock()
        self._accounts_written = False
        self._launcher = LaunchServer(dict(BASE_ENV))
        self._consoles: dict[str, bytearray] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: sandboxes whose /workspace lives in memory: a stop loses it
        self._in_memory: set[str] = set()

    # ---- queries

    def workspace(self, uuid: str) -> Path:
        """`state_dir/workspaces/<uuid>`: the host side of the sandbox's `/workspace`."""
        return self.layout.workspace(uuid)

    def plugin_socket(self, uuid: str) -> Path:
        """The unix socket on which the sandbox's plugin HTTP API answers."""
        return self.layout.plugin_socket(uuid)

    @property
    def limiter(self) -> Limiter:
        if self._limiter is None:
            self._limiter = Limiter.detect()
        return self._limiter

    def describe(self) -> str:
        """One line: how sandboxes are isolated and limited (daemon log, `ukc local status`)."""
        if self._privileged:
            isolation = "user namespace, own host uid range per instance"
        else:
            isolation = f"user namespace, daemon uid {os.getuid()}, no capabilities"
        return f"{isolation}; limits: {self.limiter.describe()}, at most {self.max_pids} tasks"

    def is_running(self, uuid: str) -> bool:
        box = self._boxes.get(uuid)
        return box is not None and box.proc.returncode is None and not box.stopping

    def boot_id(self, uuid: str) -> str | None:
        """The boot id of the running sandbox, or None."""
        box = self._boxes.get(uuid)
        return box.boot_id if box is not None and self.is_running(uuid) else None

    def console(self, uuid: str) -> bytes:
        """Recent console output (agent and sshd stderr), at most 64 KiB, newest last."""
        return bytes(self._consoles.get(uuid, b""))

    def pids(self, uuid: str) -> list[int]:
        """Host pids of every process of the sandbox (bwrap monitor included); for tests."""
        box = self._boxes.get(uuid)
        if box is None:
            return []
        members = box.members()
        if box.proc.returncode is None:
            members.append(box.proc.pid)
        return sorted(set(members))

    def launch_server_pid(self) -> int | None:
        """The pid of the process that forks every sandbox's launcher; for tests."""
        return self._launcher.pid

    def is_frozen(self, uuid: str) -> bool:
        box = self._boxes.get(uuid)
        return box is not None and box.frozen

    # ---- start

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    async def start(
        self,
        uuid: str,
        *,
        env: dict[str, str],
        memory_mb: int = DEFAULT_MEMORY_MB,
        boot: BootOptions | None = None,
        volumes: list[Mount] | None = None,
    ) -> str:
        """Boot the sandbox; returns its boot id once the agent is up (and sshd accepts on
        2222 inside, unless `boot` delays sshd past the boot as on UKC).

        `volumes`: host directories mounted inside; one at `/workspace` takes the place of
        the instance's own workspace."""
        boot = boot or BootOptions()
        self.layout.check_uuid(uuid)
        async with self._lock(uuid):
            box = self._boxes.get(uuid)
            if box is not None and self.is_running(uuid):
                return box.boot_id
            started = time.monotonic()
            on_volume = any(m.at == WORKSPACE for m in volumes or [])
            # why: a volume at /workspace takes the place of the memory store, as on UKC
            if boot.workspace_in_memory and not on_volume:
                self._in_memory.add(uuid)
            else:
                self._in_memory.discard(uuid)
            box, status_r, info_r = await self._launch(uuid, env, memory_mb, boot, volumes or [])
            await self._await_ready(box, status_r, info_r, started)
            return box.boot_id

    def _prepare(
        self, uuid: str, volumes: list[Mount], memory_mb: int, boot: BootOptions, limiter: Limiter
    ) -> _Prepared:
        """Everything of a boot that touches the file system, in one worker thread: the checks
        of the host, the workspace (emptied for a cold boot), the id range (claimed the first
        time), the instance dir, the volumes' directories made the sandbox's, the cgroup and
        the plugin and relay sockets.

        why not on the event loop: a mkdir, a bind of a unix socket or a cgroup write waits
        for the file system (a journal commit, a directory lock) and for the GIL after it; in
        a 50-sandbox fan-out those waits held the loop (every API answer, every byte through
        the edge, every other boot's ready line) for 100-300 ms at a time."""
        check_host(self._bwrap, self._sshd)
        if uuid in self._in_memory:
            reset_memory_workspace(self.layout.workspace(uuid), memory_mb << 20)
        if boot.fresh_host_key:
            # a cold boot starts from the image: its sshd makes new host keys
            with contextlib.suppress(FileNotFoundError):
                (self.layout.instance_dir(uuid) / HOST_KEY).unlink()
        with self._accounts_lock:
            if not self._accounts_written:
                prepare_accounts(self.layout.accounts_dir(), own_ids=self._ids is not None)
                self._accounts_written = True
        inst = self.layout.instance_dir(uuid)
        ids = self._ids.claim(inst) if self._ids is not None else None
        ws = self.layout.workspace(uuid)
        for mount in volumes:
            if mount.size_mb:
                # why before the hand-over: the files the sandbox owns are those in the image
                volumefs.mount_volume(
                    mount.source, self.layout.volume_image(mount.source.name), mount.size_mb
                )
            prepare_workspace(mount.source, ids)
            if mount.at == WORKSPACE:
                ws = mount.source
        if ws == self.layout.workspace(uuid):
            prepare_workspace(ws, ids)
        prepare_instance_dir(inst, ids)
        files = host_files(inst, self.layout.accounts_dir())
        files.update({volume_source(m.at): str(m.source) for m in volumes if m.at != WORKSPACE})
        prepared = _Prepared(ids, ws, files, bind_sources(files, ws, staged=ids is not None))
        try:
            if limiter.uses_cgroups:
                try:
                    prepared.cgroup = limiter.create(memory_mb * 1024 * 1024, self.max_pids)
                except OSError as exc:
                    raise LocalMetroError(
                        f"sandbox {uuid}: cannot set up its {limiter.mechanism} limits: "
                        f"{exc.strerror}"
                    ) from None
                # why here: cgroup v1's out-of-memory eventfd is armed by writing a cgroup
                # file (the box asks again on the loop and finds it made)
                with contextlib.suppress(OSError):
                    prepared.cgroup.oom_eventfd()
            self.layout.control_dir(uuid).mkdir(mode=0o700, exist_ok=True)
            prepared.plugin = listen_unix(self.layout.plugin_socket(uuid))
            prepared.relay = listen_unix(self.layout.relay_socket(uuid))
        except BaseException:
            prepared.discard()
            raise
        return prepared

    async def _launch(
        self,
        uuid: str,
        env: dict[str, str],
        memory_mb: int,
        boot: BootOptions,
        volumes: list[Mount],
    ) -> tuple[Box, int, int]:
        """Start the launcher (which execs bwrap); the box and its status and info pipes."""
        limiter = self.limiter
        prepared = await _off_loop(
            lambda: self._prepare(uuid, volumes, memory_mb, boot, limiter), _Prepared.discard
        )
        ids, files, cgroup = prepared.ids, prepared.files, prepared.cgroup
        assert prepared.plugin is not None and prepared.relay is not None
        plugin, relay = prepared.plugin, prepared.relay
        status_r, status_w = os.pipe()
        info_r, info_w = os.pipe()
        owned = [status_r, status_w, info_r, info_w]
        try:
            # why: env values may be secrets, and `LD_PRELOAD` and friends must not reach the
            # host-side processes (a root launcher!): the env goes to the agent in a pipe
            owned.append(pipe_with(_env_bytes(uuid, {**BASE_ENV, **env})))
            fds = {
                "status": status_w,
                "info": info_w,
                "plugin": plugin.fileno(),
                "relay": relay.fileno(),
                "env": owned[-1],
            }
            options, command = bwrap_options(
                uuid,
                prepared.sources,
                fds,
                own_ids=ids is not None,
                memory_mb=memory_mb,
                max_pids=self.max_pids,
                rlimits=not limiter.uses_cgroups,
                boot=boot,
                mounts=[(m.at, m.readonly) for m in volumes],
                # why: a root daemon mounted the tmpfs on the host side (reset_memory_workspace)
                workspace_tmpfs=uuid in self._in_memory and not self._privileged,
            )
            owned.append(pipe_with(b"".join(a.encode() + b"\0" for a in options)))
            plan = {
                "bwrap": self._bwrap,
                "args_fd": owned[-1],
                "command": command,
                "parent": os.getpid(),
                "cgroup_procs": [str(p) for p in cgroup.procs] if cgroup else [],
                "ids": {"base": ids.base, "count": ids.count} if ids else None,
                "workspace": str(prepared.workspace),
                "files": files,
            }
            passed = (*fds.values(), owned[-1])
            proc = await self._launcher.launch(plan, {fd: fd for fd in passed})
        except (OSError, LocalMetroError) as exc:
            for fd in owned:
                with contextlib.suppress(OSError):
                    os.close(fd)
            plugin.close()
            relay.close()
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)
            if isinstance(exc, LocalMetroError):
                raise
            raise LocalMetroError(
                f"sandbox {uuid}: bwrap failed to start: {exc.strerror}"
            ) from None
        for fd in owned:
            if fd not in (status_r, info_r):
                os.close(fd)
        plugin.close()
        relay.close()
        console = self._consoles[uuid] = bytearray()
        box = self._boxes[uuid] = Box(uuid=uuid, proc=proc, console=console, cgroup=cgroup)
        box.start_console()
        return box, status_r, info_r

    async def _await_ready(self, box: Box, status_r: int, info_r: int, started: float) -> None:
        """Wait for the agent's ready line; kill the sandbox and raise when it does not come."""
        proc = box.proc
        readers: list[asyncio.Task[object]] = []
        try:
            box.watch_memory()
            info_task = asyncio.create_task(read_init_pid(info_r))
            status_task = asyncio.create_task(read_boot_id(status_r))
            readers += [info_task, status_task]
            exit_task = asyncio.create_task(proc.wait())
            done, _ = await asyncio.wait(
                {status_task, exit_task},
                timeout=READY_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            # why: bwrap reports its child's pid before that child runs the agent, so once the
            # agent is ready (or bwrap is gone) the info pipe has its answer or its EOF
            with contextlib.suppress(OSError, ValueError, TimeoutError):
                box.adopt_init(await asyncio.wait_for(info_task, 5.0))
            if status_task in done and status_task.result():
                box.boot_id = status_task.result()
            else:
                status_task.cancel()
                # why: also when bwrap is gone already: its pid 1 may be ours to reap
                await box.kill()
                code = proc.returncode
                exit_task.cancel()
                await box.console_done()
                last = box.last_launch_error()
                raise LocalMetroError(
                    f"sandbox {box.uuid} not ready after {time.monotonic() - started:.1f} s "
                    f"(exit code {code})" + (f": {last}" if last else "; see its console")
                )
            exit_task.cancel()
        except BaseException:
            box.stopping = True
            await box.kill()
            await box.release_cgroup()
            self._boxes.pop(box.uuid, None)
            raise
        finally:
            # why: the readers watch the pipes on the loop; each must be gone from its selector
            # before the fd is closed (the number is reused at once)
            for task in readers:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            for fd in (status_r, info_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
        box.watcher = asyncio.create_task(self._watch(box))
        log.debug("sandbox %s booted in %.3f s", box.uuid, time.monotonic() - started)

    async def _watch(self, box: Box) -> None:
        code = await box.proc.wait()
        if box.stopping:
            return
        # why: a sandbox that died on its own leaves stragglers only if bwrap's init survived
        await box.reap_namespace()
        out_of_memory = box.oom_killed()
        await box.release_cgroup()
        if self._boxes.get(box.uuid) is not box:
            return  # why: a newer boot already replaced this one; its death is old news
        del self._boxes[box.uuid]
        try:
            self._on_exit(box.uuid, code, out_of_memory)
        except Exception:
            log.exception("on_exit callback for sandbox %s failed", box.uuid)

    # ---- stop, destroy, prune

    async def stop(self, uuid: str) -> None:
        """Kill the sandbox and every process in it; the workspace is kept."""
        self.layout.check_uuid(uuid)
        async with self._lock(uuid):
            box = self._boxes.pop(uuid, None)
            if box is None:
                return
            box.stopping = True
            await box.kill()
            if box.watcher is not None:
                box.watcher.cancel()
            await box.release_cgroup()
            for sock in (self.layout.plugin_socket(uuid), self.layout.relay_socket(uuid)):
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
            if uuid in self._in_memory:
                self._in_memory.discard(uuid)
                await asyncio.to_thread(drop_memory_workspace, self.layout.workspace(uuid))

    async def destroy(self, uuid: str) -> None:
        """Stop the sandbox and remove its workspace, host key, id range and control dir."""
        await self.stop(uuid)
        async with self._lock(uuid):
            await asyncio.to_thread(self._remove_files, uuid)
            self._consoles.pop(uuid, None)
        self._locks.pop(uuid, None)

    def _remove_files(self, uuid: str) -> None:
        inst = self.layout.instance_dir(uuid)
        if self._ids is not None:
            self._ids.release(inst)
        # a tmpfs a killed daemon left mounted there goes first
        drop_memory_workspace(self.layout.workspace(uuid))
        for path in (self.layout.workspace(uuid), inst, self.layout.control_dir(uuid)):
            remove_tree(path)

    async def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove what stopped sandboxes of instances not in `keep` left on disk.

        A delete whose teardown was cut short (the daemon stopped or was killed) leaves a
        workspace no record names any more: pruned at the daemon's start and at its shutdown.
        """
        pruned = sorted(self.layout.known_uuids() - set(keep) - set(self._boxes))
        for uuid in pruned:
            async with self._lock(uuid):
                await asyncio.to_thread(self._remove_files, uuid)
            self._locks.pop(uuid, None)
        return pruned

    async def close(self) -> None:
        """Stop every sandbox (the daemon's shutdown) and unmount the volumes' filesystems."""
        await asyncio.gather(*(self.stop(u) for u in list(self._boxes)), return_exceptions=True)
        await self._launcher.close()
        self.layout.remove_control_dirs()
        await asyncio.to_thread(self._unmount_volumes)

    def _unmount_volumes(self) -> None:
        base = self.state_dir / "volumes"
        with contextlib.suppress(FileNotFoundError):
            for source in base.iterdir():
                try:
                    volumefs.unmount_volume(source)
                except OSError as exc:
                    log.warning("volume %s: %s", source.name, exc.strerror)

    # ---- freeze, thaw, connect

    def _running_box(self, uuid: str) -> Box:
        box = self._boxes.get(uuid)
        if box is None or box.proc.returncode is not None:
            raise LocalMetroError(f"sandbox {uuid} is not running")
        return box

    async def freeze(self, uuid: str) -> None:
        """Stateful standby: SIGSTOP every process of the sandbox (memory and sockets kept)."""
        await self._running_box(uuid).freeze()

    async def thaw(self, uuid: str) -> None:
        """Resume a frozen sandbox."""
        await self._running_box(uuid).thaw()

    async def open_connection(
        self, uuid: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to 127.0.0.1:`port` inside the sandbox; ConnectionRefusedError if down.

        The agent's relay: send `PORT\\n`, get `OK\\n` once it reached the port inside.
        """
        if not self.is_running(uuid):
            raise ConnectionRefusedError(f"sandbox {uuid} is not running")
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self.layout.relay_socket(uuid)), limit=STREAM_LIMIT
            )
        except FileNotFoundError:
            raise ConnectionRefusedError(f"sandbox {uuid} is not running") from None
        try:
            writer.write(f"{int(port)}\n".encode())
            # why: exactly three bytes; whatever else the (untrusted) agent sends is not read here
            ack = await asyncio.wait_for(reader.readexactly(3), CONNECT_ACK_TIMEOUT_S)
        except asyncio.IncompleteReadError:
            ack = b""
        except BaseException:
            writer.close()
            raise
        if ack != b"OK\n":
            writer.close()
            raise ConnectionRefusedError(f"port {port} of sandbox {uuid} refused the connection")
        return reader, writer

    async def remove_volume(self, source: Path) -> None:
        """Remove a deleted volume's directory (what a sandbox wrote there is never followed)
        and its filesystem image."""
        await asyncio.to_thread(self._remove_volume, source)

    def _remove_volume(self, source: Path) -> None:
        volumefs.unmount_volume(source)
        remove_tree(source)
        with contextlib.suppress(LocalMetroError):  # not a volume's name: it has no image
            volumefs.remove_image(self.layout.volume_image(source.name))
