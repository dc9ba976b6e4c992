"""Real sandboxes for the local metro: one bubblewrap sandbox per running instance.

The daemon (`local/daemon.py`, via the state machine) drives a `SandboxRuntime`: start, stop,
freeze/thaw (stateful standby), destroy. The TLS edge (`local/edge.py`) reaches ports inside a
sandbox with `open_connection`, and the platform API server proxies the sandbox plugin route to
`plugin_socket`. Inside each sandbox runs `local/agent.py` (sshd, exec API, plugin API, relay).

Layout in the state dir: `workspaces/<uuid>/` is `/workspace` (kept across stop/start, removed by
destroy); `sandboxes/<uuid>/` holds the persistent ssh host key and the generated account files.
The sockets live in a host-only control dir (`run/<uuid>/`, or a short `/tmp/ukc-*` dir when the
state dir is too deep for a unix socket path); the runtime creates the listening sockets and
hands them to the agent as inherited file descriptors, so nothing the sandbox writes can replace
them. The sandbox only ever writes to `/workspace` on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import stat
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler.errors import LocalMetroError

__all__ = ["SandboxRuntime"]

log = logging.getLogger(__name__)

BWRAP = "/usr/bin/bwrap"
SSHD = "/usr/sbin/sshd"
PYTHON = "/usr/bin/python3"
AGENT = Path(__file__).resolve().with_name("agent.py")
HOST_DIR = "/run/ukc-host"  # read-only binds from the host: agent, host key
READY_TIMEOUT_S = 15.0
GONE_TIMEOUT_S = 5.0
CONNECT_ACK_TIMEOUT_S = 10.0
CONSOLE_MAX = 64 * 1024
STREAM_LIMIT = 256 * 1024
# why: unix socket paths are limited to 108 bytes; leave room for the file name
_SOCK_PATH_MAX = 100
_UUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BOOT_RE = re.compile(r"^ready ([0-9a-f-]{36})$")


@dataclass
class _Box:
    uuid: str
    proc: asyncio.subprocess.Process
    boot_id: str = ""
    init_pid: int = 0
    pid_ns: str = ""
    stopping: bool = False
    frozen: bool = False
    watcher: asyncio.Task[None] | None = None
    console_task: asyncio.Task[None] | None = None


def _proc_pid_ns(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return ""


def _ns_members(pid_ns: str) -> list[int]:
    """Host pids of every process in the pid namespace `pid_ns` (a /proc walk, no cgroups)."""
    if not pid_ns:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _proc_pid_ns(int(entry)) == pid_ns:
            found.append(int(entry))
    return found


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return ""
    # why: the command name may contain spaces and parentheses; the state follows the last ')'
    return data[data.rfind(b")") + 2 :][:1].decode("ascii", "replace")


def _rmtree(path: Path) -> None:
    def _fix(func: Callable[..., object], p: str, _exc: object) -> None:
        # why: a sandbox may leave read-only directories behind; a non-root owner must chmod
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
        with contextlib.suppress(FileNotFoundError):
            func(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=_fix)


class SandboxRuntime:
    """Starts, stops, freezes and connects to the bubblewrap sandboxes of one daemon."""

    def __init__(
        self,
        state_dir: Path,
        on_exit: Callable[[str, int], None],
        *,
        bwrap: str = BWRAP,
        sshd: str = SSHD,
    ) -> None:
        # why: bwrap/sshd paths are injectable so the "not installed" answers can be tested
        self._bwrap = bwrap
        self._sshd = sshd
        self.state_dir = state_dir
        self._on_exit = on_exit
        self._boxes: dict[str, _Box] = {}
        self._consoles: dict[str, bytearray] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._run_base: Path | None = None

    # ---- paths

    def _check_uuid(self, uuid: str) -> None:
        if not _UUID_RE.match(uuid):
            raise LocalMetroError(f"sandbox id {uuid[:80]!r} is not a valid instance uuid")

    def workspace(self, uuid: str) -> Path:
        """`state_dir/workspaces/<uuid>`: the host side of the sandbox's `/workspace`."""
        self._check_uuid(uuid)
        return self.state_dir / "workspaces" / uuid

    def _instance_dir(self, uuid: str) -> Path:
        return self.state_dir / "sandboxes" / uuid

    def _control_base(self) -> Path:
        if self._run_base is not None:
            return self._run_base
        base = self.state_dir / "run"
        if len(str(base.absolute())) + 1 + 36 + len("/plugin.sock") > _SOCK_PATH_MAX:
            digest = hashlib.sha256(str(self.state_dir.absolute()).encode()).hexdigest()[:10]
            base = Path(tempfile.gettempdir()) / f"ukc-{os.getuid()}-{digest}"
        base.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.lstat(base)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
            raise LocalMetroError(
                f"control dir {base} is not a directory owned by uid {os.getuid()}"
            )
        os.chmod(base, 0o700)
        self._run_base = base.absolute()
        return self._run_base

    def _control_dir(self, uuid: str) -> Path:
        self._check_uuid(uuid)
        return self._control_base() / uuid

    def plugin_socket(self, uuid: str) -> Path:
        """The unix socket on which the sandbox's plugin HTTP API answers."""
        return self._control_dir(uuid) / "plugin.sock"

    def _relay_socket(self, uuid: str) -> Path:
        return self._control_dir(uuid) / "relay.sock"

    # ---- queries

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
        members = _ns_members(box.pid_ns)
        if box.proc.returncode is None:
            members.append(box.proc.pid)
        return sorted(set(members))

    # ---- lifecycle

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    async def start(self, uuid: str, *, name: str, env: dict[str, str]) -> str:
        """Boot the sandbox; returns its boot id once sshd accepts on 2222 inside."""
        self._check_uuid(uuid)
        async with self._lock(uuid):
            box = self._boxes.get(uuid)
            if box is not None and self.is_running(uuid):
                return box.boot_id
            if not os.access(self._bwrap, os.X_OK):
                raise LocalMetroError("bwrap not found: apt-get install -y bubblewrap")
            if not os.access(self._sshd, os.X_OK):
                raise LocalMetroError("sshd not found: apt-get install -y openssh-server")
            if not os.access(PYTHON, os.X_OK):
                raise LocalMetroError("/usr/bin/python3 not found: apt-get install -y python3")
            return await self._start(uuid, name, env)

    def _prepare_instance_dir(self, uuid: str) -> Path:
        inst = self._instance_dir(uuid)
        inst.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = inst / "ssh_host_ed25519_key"
        if not key.exists():
            pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            )
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, pem)
            finally:
                os.close(fd)
        uid, gid = os.getuid(), os.getgid()
        # why: an unprivileged sshd only authenticates its own uid, so `root` must be that uid
        # (for a root daemon this is plain root); the login shell is sh, home /root
        sshd_line = "sshd:x:65534:65534::/run/sshd:/usr/sbin/nologin"
        with contextlib.suppress(OSError), open("/etc/passwd") as f:
            for line in f:
                if line.startswith("sshd:"):
                    sshd_line = line.strip()
        passwd = (
            f"root:x:{uid}:{gid}:root:/root:/bin/sh\n{sshd_line}\n"
            "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"
        )
        group = f"root:x:{gid}:\nnogroup:x:65534:\n"
        shadow = "root:*:19000:0:99999:7:::\nsshd:*:19000:0:99999:7:::\n"
        for fname, text, mode in (
            ("passwd", passwd, 0o644),
            ("group", group, 0o644),
            ("shadow", shadow, 0o600),
        ):
            path = inst / fname
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            try:
                os.write(fd, text.encode())
            finally:
                os.close(fd)
        return inst

    def _listen(self, path: Path) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        return sock

    def _bwrap_argv(self, uuid: str, name: str, inst: Path, fds: dict[str, int]) -> list[str]:
        hostname = re.sub(r"[^A-Za-z0-9.-]", "-", name)[:63] or "sandbox"
        argv = [
            self._bwrap,
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
        ]  # fmt: skip
        if os.path.isdir("/usr/lib64"):
            argv += ["--symlink", "usr/lib64", "/lib64"]
        argv += [
            "--ro-bind", "/etc", "/etc",
            "--ro-bind", str(inst / "passwd"), "/etc/passwd",
            "--ro-bind", str(inst / "group"), "/etc/group",
            "--ro-bind", str(inst / "shadow"), "/etc/shadow",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",
            "--tmpfs", "/run",
            "--tmpfs", "/var",
            "--dir", "/var/tmp",
            "--dir", "/var/empty",
            "--tmpfs", "/root",
            "--ro-bind", str(AGENT), f"{HOST_DIR}/agent.py",
            "--ro-bind", str(inst / "ssh_host_ed25519_key"), f"{HOST_DIR}/ssh_host_ed25519_key",
            "--bind", str(self.workspace(uuid)), "/workspace",
            "--chdir", "/workspace",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname", hostname,
            "--die-with-parent",
            "--new-session",
            "--info-fd", str(fds["info"]),
            PYTHON, "-I", "-S", f"{HOST_DIR}/agent.py",
            "--status-fd", str(fds["status"]),
            "--plugin-fd", str(fds["plugin"]),
            "--relay-fd", str(fds["relay"]),
            "--host-key", f"{HOST_DIR}/ssh_host_ed25519_key",
        ]  # fmt: skip
        return argv

    async def _start(self, uuid: str, name: str, env: dict[str, str]) -> str:
        started = time.monotonic()
        ws = self.workspace(uuid)
        ws.mkdir(mode=0o755, parents=True, exist_ok=True)
        inst = self._prepare_instance_dir(uuid)
        control = self._control_dir(uuid)
        control.mkdir(mode=0o700, exist_ok=True)
        plugin = self._listen(self.plugin_socket(uuid))
        relay = self._listen(self._relay_socket(uuid))
        status_r, status_w = os.pipe()
        info_r, info_w = os.pipe()
        fds = {
            "status": status_w,
            "info": info_w,
            "plugin": plugin.fileno(),
            "relay": relay.fileno(),
        }
        # why: env values may be secrets: they travel in the environment, never in argv
        child_env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
            "HOME": "/root",
            "USER": "root",
            "LOGNAME": "root",
            "LANG": "C.UTF-8",
            "HOSTNAME": name,
        }
        child_env.update(env)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self._bwrap_argv(uuid, name, inst, fds),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=child_env,
                pass_fds=tuple(fds.values()),
                start_new_session=True,
                limit=STREAM_LIMIT,
            )
        except OSError as exc:
            for fd in (status_r, status_w, info_r, info_w):
                os.close(fd)
            plugin.close()
            relay.close()
            raise LocalMetroError(
                f"sandbox {uuid}: bwrap failed to start: {exc.strerror}"
            ) from None
        os.close(status_w)
        os.close(info_w)
        plugin.close()
        relay.close()
        box = _Box(uuid=uuid, proc=proc)
        self._consoles[uuid] = bytearray()
        self._boxes[uuid] = box
        box.console_task = asyncio.create_task(self._read_console(box))
        try:
            info_task = asyncio.create_task(self._read_info(info_r))
            status_task = asyncio.create_task(self._read_status(status_r))
            exit_task = asyncio.create_task(proc.wait())
            done, _ = await asyncio.wait(
                {status_task, exit_task},
                timeout=READY_TIMEOUT_S,
                return_when=asyncio.FIRST_COMPLETED,
            )
            # why: bwrap reports its child's pid before that child runs the agent, so once the
            # agent is ready (or bwrap is gone) the info pipe has its answer or its EOF
            with contextlib.suppress(OSError, ValueError, TimeoutError):
                box.init_pid = await asyncio.wait_for(info_task, 5.0)
            if status_task in done and status_task.result():
                box.boot_id = status_task.result()
            else:
                status_task.cancel()
                if not exit_task.done():
                    box.pid_ns = _proc_pid_ns(box.init_pid) if box.init_pid else ""
                    await self._kill(box)
                code = proc.returncode
                exit_task.cancel()
                raise LocalMetroError(
                    f"sandbox {uuid} not ready after {time.monotonic() - started:.1f} s "
                    f"(exit code {code}); see its console"
                )
            exit_task.cancel()
        except BaseException:
            box.stopping = True
            if proc.returncode is None:
                await self._kill(box)
            self._boxes.pop(uuid, None)
            raise
        finally:
            for fd in (status_r, info_r):
                with contextlib.suppress(OSError):
                    os.close(fd)
        box.pid_ns = _proc_pid_ns(box.init_pid) if box.init_pid else ""
        box.watcher = asyncio.create_task(self._watch(box))
        log.debug("sandbox %s booted in %.3f s", uuid, time.monotonic() - started)
        return box.boot_id

    async def _read_info(self, fd: int) -> int:
        """The host pid of the sandbox's pid 1, from bwrap's --info-fd JSON."""
        buf = b""
        while len(buf) < 4096:
            chunk = await asyncio.to_thread(os.read, fd, 4096)
            if not chunk:
                break
            buf += chunk
            with contextlib.suppress(ValueError):
                return int(json.loads(buf)["child-pid"])
        raise ValueError("no child pid")

    async def _read_status(self, fd: int) -> str:
        """The boot id from the agent's `ready <boot id>` line ('' if the pipe closed)."""
        buf = b""
        while b"\n" not in buf and len(buf) < 256:
            chunk = await asyncio.to_thread(os.read, fd, 256)
            if not chunk:
                return ""
            buf += chunk
        m = _BOOT_RE.match(buf.split(b"\n", 1)[0].decode("ascii", "replace"))
        return m.group(1) if m else ""

    async def _read_console(self, box: _Box) -> None:
        stream = box.proc.stdout
        if stream is None:
            return
        ring = self._consoles[box.uuid]
        while True:
            data = await stream.read(65536)
            if not data:
                return
            ring += data
            if len(ring) > CONSOLE_MAX:
                del ring[: len(ring) - CONSOLE_MAX]

    async def _watch(self, box: _Box) -> None:
        code = await box.proc.wait()
        if box.stopping:
            return
        # why: a sandbox that died on its own leaves stragglers only if bwrap's init survived
        await self._reap_namespace(box)
        if self._boxes.get(box.uuid) is not box:
            return  # why: a newer boot already replaced this one; its death is old news
        del self._boxes[box.uuid]
        try:
            self._on_exit(box.uuid, code)
        except Exception:
            log.exception("on_exit callback for sandbox %s failed", box.uuid)

    async def _kill(self, box: _Box) -> None:
        """SIGKILL the bwrap process group and the sandbox's pid 1; wait until all are gone."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(box.proc.pid, signal.SIGKILL)
        if box.init_pid:
            # why: killing a pid namespace's init kills every process in it at once
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(box.init_pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            await box.proc.wait()
        await self._reap_namespace(box)
        if box.console_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(box.console_task, 1.0)

    async def _reap_namespace(self, box: _Box) -> None:
        deadline = time.monotonic() + GONE_TIMEOUT_S
        while True:
            members = _ns_members(box.pid_ns)
            if not members:
                return
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            if time.monotonic() > deadline:
                log.warning("sandbox %s: pids %s survive SIGKILL", box.uuid, members)
                return
            await asyncio.sleep(0.01)

    async def stop(self, uuid: str) -> None:
        """Kill the sandbox and every process in it; the workspace is kept."""
        self._check_uuid(uuid)
        async with self._lock(uuid):
            box = self._boxes.pop(uuid, None)
            if box is None:
                return
            box.stopping = True
            await self._kill(box)
            if box.watcher is not None:
                box.watcher.cancel()
            for sock in (self.plugin_socket(uuid), self._relay_socket(uuid)):
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()

    async def destroy(self, uuid: str) -> None:
        """Stop the sandbox and remove its workspace, host key and control dir."""
        await self.stop(uuid)
        async with self._lock(uuid):
            for path in (self.workspace(uuid), self._instance_dir(uuid), self._control_dir(uuid)):
                await asyncio.to_thread(_rmtree, path)
            self._consoles.pop(uuid, None)
        self._locks.pop(uuid, None)

    async def freeze(self, uuid: str) -> None:
        """Stateful standby: SIGSTOP every process of the sandbox (memory and sockets kept)."""
        box = self._running_box(uuid)
        box.frozen = True
        # why: a process may fork while we walk /proc; repeat until every member is stopped
        for _ in range(50):
            members = _ns_members(box.pid_ns)
            pending = [p for p in members if _proc_state(p) not in ("T", "t", "Z", "X", "")]
            if not pending:
                return
            for pid in pending:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(0.002)
        raise LocalMetroError(f"sandbox {uuid} could not be frozen: processes keep appearing")

    async def thaw(self, uuid: str) -> None:
        """Resume a frozen sandbox."""
        box = self._running_box(uuid)
        for pid in _ns_members(box.pid_ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        box.frozen = False

    def is_frozen(self, uuid: str) -> bool:
        box = self._boxes.get(uuid)
        return box is not None and box.frozen

    def _running_box(self, uuid: str) -> _Box:
        box = self._boxes.get(uuid)
        if box is None or box.proc.returncode is not None:
            raise LocalMetroError(f"sandbox {uuid} is not running")
        return box

    async def open_connection(
        self, uuid: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A byte stream to 127.0.0.1:`port` inside the sandbox; ConnectionRefusedError if down."""
        if not self.is_running(uuid):
            raise ConnectionRefusedError(f"sandbox {uuid} is not running")
        try:
            reader, writer = await asyncio.open_unix_connection(
                str(self._relay_socket(uuid)), limit=STREAM_LIMIT
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

    async def close(self) -> None:
        """Stop every sandbox (the daemon calls this on shutdown)."""
        await asyncio.gather(*(self.stop(u) for u in list(self._boxes)), return_exceptions=True)
        # why: stopped sandboxes leave empty control dirs (and maybe a /tmp fallback base)
        base = self._run_base
        if base is not None and base.is_dir():
            for child in base.iterdir():
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                base.rmdir()
            self._run_base = None
