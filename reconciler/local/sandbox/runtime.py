"""Real sandboxes for the local metro: one bubblewrap sandbox per running instance.

The daemon (`local/daemon.py`, via the state machine) drives a `SandboxRuntime`: start, stop,
freeze/thaw (stateful standby), destroy, prune. The TLS edge (`local/edge.py`) reaches ports
inside a sandbox with `open_connection`, and the platform API server proxies the sandbox plugin
route to `plugin_socket`. Inside each sandbox runs `local/agent.py` (sshd, exec API, plugin API,
relay).

A sandbox holds no host privilege. Every sandbox has its own user namespace and nothing in it
has a capability over the host. A root daemon gives each instance a host id range of its own
(`local/hostids.py`): `root` inside is an unprivileged host uid that owns the workspace and
nothing else, with a few capabilities that only count inside (what sshd's privilege
separation needs: no CAP_SYS_ADMIN, so no mount or remount), and no user namespaces inside. A
non-root daemon runs sandboxes as its own uid with no capabilities at all. Memory and process
limits come from `local/limits.py`; a sandbox killed for lack of memory is reported as such.

Nothing host-visible names the instance: the runtime is never told the name, the hostname is
the uuid, bubblewrap's arguments travel through a pipe (`--args`), and the instance env (which
may hold secrets, or `LD_PRELOAD`) reaches only the agent inside, through another pipe, never
the environment of a process that runs on the host side.

Layout in the state dir: `workspaces/<uuid>/` is `/workspace` (kept across stop/start, removed by
destroy); `sandboxes/<uuid>/` holds the persistent ssh host key, the generated account files and
the instance's id range. The sockets live in a host-only control dir (`run/<uuid>/`, or a short
`/tmp/ukc-*` dir when the state dir is too deep for a unix socket path); the runtime creates the
listening sockets and hands them to the agent as inherited file descriptors, so nothing the
sandbox writes can replace them. The sandbox only ever writes to `/workspace` on the host.
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
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from reconciler.errors import LocalMetroError
from reconciler.local.sandbox.hostids import HostIds, IdRange
from reconciler.local.sandbox.limits import Cgroup, Limiter

__all__ = ["DEFAULT_MAX_PIDS", "DEFAULT_MEMORY_MB", "SandboxRuntime"]

log = logging.getLogger(__name__)

BWRAP = "/usr/bin/bwrap"
SSHD = "/usr/sbin/sshd"
PYTHON = "/usr/bin/python3"
AGENT = Path(__file__).resolve().with_name("agent.py")
LAUNCHER = Path(__file__).resolve().with_name("launch.py")
HOST_DIR = "/run/ukc-host"  # read-only binds from the host: agent, host key
STAGE = "/run"  # where the launcher of a root daemon stages what bwrap binds (launch.py)
READY_TIMEOUT_S = 15.0
GONE_TIMEOUT_S = 5.0
CONNECT_ACK_TIMEOUT_S = 10.0
CONSOLE_MAX = 64 * 1024
STREAM_LIMIT = 256 * 1024
DEFAULT_MEMORY_MB = 128
DEFAULT_MAX_PIDS = 512
# why: what sshd's privilege separation needs (chroot, setuid/setgid to its unprivileged user)
# plus root's ordinary file powers; all of them count only inside the sandbox's user namespace
# and only on files whose owner is mapped there (its own). Not CAP_SYS_ADMIN: no (re)mounts.
SANDBOX_CAPS = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
)
# the environment of the host-side processes (launcher, bwrap) and the base of the agent's
BASE_ENV = {
    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
}
# why: unix socket paths are limited to 108 bytes; leave room for the file name
_SOCK_PATH_MAX = 100
_UUID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_BOOT_RE = re.compile(r"^ready ([0-9a-f-]{36})$")
_PIPE_MAX = 60000


@dataclass
class _Box:
    uuid: str
    proc: asyncio.subprocess.Process
    cgroup: Cgroup | None = None
    boot_id: str = ""
    init_pid: int = 0
    pid_ns: str = ""
    stopping: bool = False
    frozen: bool = False
    out_of_memory: bool = False
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


def _make_searchable(path: str) -> None:
    """chmod 0700 the directory at `path` itself: never a symlink, never what one points to."""
    try:
        fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            # why: chmod through the fd's /proc link acts on exactly the inode opened above
            os.chmod(f"/proc/self/fd/{fd}", 0o700)
    except OSError:
        pass
    finally:
        os.close(fd)


def _rmtree(path: Path) -> None:
    """Remove a tree a sandbox wrote; symlinks in it are removed, never followed."""

    def _fix(func: Callable[..., object], p: str, _exc: object) -> None:
        # why: a sandbox may leave directories without write or search permission, which a
        # non-root owner must chmod; a symlink planted there must not redirect that chmod
        _make_searchable(os.path.dirname(p))
        _make_searchable(p)
        with contextlib.suppress(FileNotFoundError):
            func(p)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path, onerror=_fix)


def _shift_owner(root: Path, ids: IdRange) -> None:
    """Give every entry under `root` (and `root` last) to `ids`, keeping the inner id.

    A workspace written by an older daemon (as host root) or under another range becomes the
    sandbox's own; `root` goes last so an interrupted walk is redone at the next start.
    """
    for top, dirs, files, dfd in os.fwalk(root, follow_symlinks=False):
        for name in dirs + files:
            with contextlib.suppress(FileNotFoundError):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                os.chown(
                    name,
                    ids.host_id(st.st_uid),
                    ids.host_id(st.st_gid),
                    dir_fd=dfd,
                    follow_symlinks=False,
                )
        del top
    st = os.lstat(root)
    os.chown(root, ids.host_id(st.st_uid), ids.host_id(st.st_gid), follow_symlinks=False)


def _pipe_with(data: bytes) -> int:
    """The read end of a pipe that holds `data` and is closed for writing."""
    if len(data) > _PIPE_MAX:
        raise LocalMetroError(f"sandbox setup of {len(data)} bytes exceeds a pipe buffer")
    r, w = os.pipe()
    try:
        os.write(w, data)
    except OSError:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def _userns_disabled() -> str | None:
    """The one-line fix when this kernel has user namespaces turned off, else None."""
    try:
        limit = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    except OSError:
        return None
    if limit == "0":
        return "sysctl -w user.max_user_namespaces=15000"
    return None


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
        self.max_pids = max_pids
        self._on_exit = on_exit
        self._privileged = os.geteuid() == 0
        self._ids = host_ids if host_ids is not None else HostIds() if self._privileged else None
        self._limiter = limiter
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
        self._check_uuid(uuid)
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
        members = _ns_members(box.pid_ns)
        if box.proc.returncode is None:
            members.append(box.proc.pid)
        return sorted(set(members))

    # ---- lifecycle

    def _lock(self, uuid: str) -> asyncio.Lock:
        return self._locks.setdefault(uuid, asyncio.Lock())

    async def start(
        self, uuid: str, *, env: dict[str, str], memory_mb: int = DEFAULT_MEMORY_MB
    ) -> str:
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
            fix = _userns_disabled()
            if fix is not None:
                raise LocalMetroError(f"sandboxes need user namespaces, which are off: {fix}")
            return await self._start(uuid, env, memory_mb)

    def _prepare_instance_dir(self, uuid: str, ids: IdRange | None) -> Path:
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
        if ids is not None:
            # why: root of a sandbox is plain root in its own namespace
            uid = gid = 0
        else:
            # why: an unprivileged sshd only authenticates its own uid, so `root` must be that
            # uid; the login shell is sh, home /root
            uid, gid = os.getuid(), os.getgid()
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
        if ids is not None:
            # why: sshd (root inside) must read these; host root's files are not its own
            for fname in ("ssh_host_ed25519_key", "shadow"):
                os.chown(inst / fname, ids.base, ids.base)
        return inst

    def _prepare_workspace(self, uuid: str, ids: IdRange | None) -> Path:
        ws = self.workspace(uuid)
        ws.mkdir(mode=0o755, parents=True, exist_ok=True)
        if ids is not None and os.lstat(ws).st_uid != ids.base:
            _shift_owner(ws, ids)
        return ws

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

    def _bwrap_args(
        self,
        uuid: str,
        sources: dict[str, str],
        fds: dict[str, int],
        ids: IdRange | None,
        memory_mb: int,
        rlimits: bool,
    ) -> tuple[list[str], list[str]]:
        """bwrap's options (they go through `--args`) and the agent's command line."""
        # why: tmpfs lives in memory; bound it even where no cgroup charges it to the sandbox
        size = str(memory_mb * 1024 * 1024)
        if ids is not None:
            # why: the launcher passes --userns (the namespace it made); map root to root
            args = ["--uid", "0", "--gid", "0"]
        else:
            args = ["--unshare-user", "--disable-userns"]
        args += ["--cap-drop", "ALL"]
        if ids is not None:
            for cap in SANDBOX_CAPS:
                args += ["--cap-add", cap]
        args += [
            "--ro-bind", "/usr", "/usr",
            "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/sbin", "/sbin",
            "--symlink", "usr/lib", "/lib",
        ]  # fmt: skip
        if os.path.isdir("/usr/lib64"):
            args += ["--symlink", "usr/lib64", "/lib64"]
        args += [
            "--ro-bind", "/etc", "/etc",
            "--ro-bind", sources["etc/passwd"], "/etc/passwd",
            "--ro-bind", sources["etc/group"], "/etc/group",
            "--ro-bind", sources["etc/shadow"], "/etc/shadow",
            "--dev", "/dev",
            "--proc", "/proc",
            "--size", size, "--tmpfs", "/tmp",
            "--size", size, "--tmpfs", "/run",
            "--size", size, "--tmpfs", "/var",
            "--dir", "/var/tmp",
            "--dir", "/var/empty",
            "--size", size, "--tmpfs", "/root",
            "--ro-bind", sources["host/agent.py"], f"{HOST_DIR}/agent.py",
            "--ro-bind", sources["host/ssh_host_ed25519_key"],
            f"{HOST_DIR}/ssh_host_ed25519_key",
            "--bind", sources["workspace"], "/workspace",
            "--chdir", "/workspace",
            "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname", uuid,
            # why: bwrap's own root is a tmpfs with no size limit; only the mounts on it are
            # for writing
            "--remount-ro", "/",
            "--die-with-parent",
            "--new-session",
            "--info-fd", str(fds["info"]),
        ]  # fmt: skip
        command = [
            PYTHON, "-I", "-S", f"{HOST_DIR}/agent.py",
            "--status-fd", str(fds["status"]),
            "--plugin-fd", str(fds["plugin"]),
            "--relay-fd", str(fds["relay"]),
            "--env-fd", str(fds["env"]),
            "--host-key", f"{HOST_DIR}/ssh_host_ed25519_key",
        ]  # fmt: skip
        if rlimits:
            command += [
                "--max-procs", str(self.max_pids),
                "--max-data", str(memory_mb * 1024 * 1024),
            ]  # fmt: skip
        return args, command

    def _claim_ids(self, uuid: str) -> IdRange | None:
        if self._ids is None:
            return None
        return self._ids.claim(self._instance_dir(uuid))

    async def _start(self, uuid: str, env: dict[str, str], memory_mb: int) -> str:
        started = time.monotonic()
        ids = await asyncio.to_thread(self._claim_ids, uuid)
        ws = await asyncio.to_thread(self._prepare_workspace, uuid, ids)
        inst = self._prepare_instance_dir(uuid, ids)
        host_files = {
            "etc/passwd": str(inst / "passwd"),
            "etc/group": str(inst / "group"),
            "etc/shadow": str(inst / "shadow"),
            "host/agent.py": str(AGENT),
            "host/ssh_host_ed25519_key": str(inst / "ssh_host_ed25519_key"),
        }
        if ids is not None:
            # why: the sandbox's host uid cannot reach the 0700 state dir; the launcher binds
            # these into a tmpfs over /run of its own mount namespace first
            sources = {name: f"{STAGE}/{name}" for name in host_files}
            sources["workspace"] = f"{STAGE}/workspace"
        else:
            sources = {**host_files, "workspace": str(ws)}
        limiter = self.limiter
        cgroup: Cgroup | None = None
        if limiter.uses_cgroups:
            try:
                cgroup = limiter.create(memory_mb * 1024 * 1024, self.max_pids)
            except OSError as exc:
                raise LocalMetroError(
                    f"sandbox {uuid}: cannot set up its {limiter.mechanism} limits: {exc.strerror}"
                ) from None
        control = self._control_dir(uuid)
        control.mkdir(mode=0o700, exist_ok=True)
        plugin = self._listen(self.plugin_socket(uuid))
        relay = self._listen(self._relay_socket(uuid))
        status_r, status_w = os.pipe()
        info_r, info_w = os.pipe()
        owned = [status_r, status_w, info_r, info_w]
        try:
            # why: env values may be secrets, and `LD_PRELOAD` and friends must not reach the
            # host-side processes (a root launcher!): the env goes to the agent in a pipe
            owned.append(_pipe_with(json.dumps({**BASE_ENV, **env}).encode()))
            fds = {
                "status": status_w,
                "info": info_w,
                "plugin": plugin.fileno(),
                "relay": relay.fileno(),
                "env": owned[-1],
            }
            bwrap_args, command = self._bwrap_args(
                uuid, sources, fds, ids, memory_mb, rlimits=not limiter.uses_cgroups
            )
            owned.append(_pipe_with(b"".join(a.encode() + b"\0" for a in bwrap_args)))
            plan = {
                "bwrap": self._bwrap,
                "args_fd": owned[-1],
                "command": command,
                "parent": os.getpid(),
                "cgroup_procs": [str(p) for p in cgroup.procs] if cgroup else [],
                "ids": {"base": ids.base, "count": ids.count} if ids else None,
                "workspace": str(ws),
                "files": host_files,
            }
            owned.append(_pipe_with(json.dumps(plan).encode()))
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", "-S", str(LAUNCHER), str(owned[-1]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=dict(BASE_ENV),
                pass_fds=(*fds.values(), owned[-2], owned[-1]),
                start_new_session=True,
                limit=STREAM_LIMIT,
            )  # fmt: skip
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
        box = _Box(uuid=uuid, proc=proc, cgroup=cgroup)
        self._consoles[uuid] = bytearray()
        self._boxes[uuid] = box
        box.console_task = asyncio.create_task(self._read_console(box))
        try:
            self._watch_memory(box)
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
                if box.console_task is not None:
                    with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                        await asyncio.wait_for(box.console_task, 1.0)
                last = self._last_console_line(uuid)
                raise LocalMetroError(
                    f"sandbox {uuid} not ready after {time.monotonic() - started:.1f} s "
                    f"(exit code {code})" + (f": {last}" if last else "; see its console")
                )
            exit_task.cancel()
        except BaseException:
            box.stopping = True
            if proc.returncode is None:
                await self._kill(box)
            await self._release_cgroup(box)
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

    def _last_console_line(self, uuid: str) -> str:
        lines = [ln.strip() for ln in self.console(uuid).decode("utf-8", "replace").splitlines()]
        found = [ln for ln in lines if ln.startswith(("launch:", "bwrap:"))]
        return found[-1][:300] if found else ""

    def _watch_memory(self, box: _Box) -> None:
        """cgroup v1: stop the whole sandbox when the kernel kills a process of it for memory."""
        if box.cgroup is None:
            return
        try:
            efd = box.cgroup.oom_eventfd()
        except OSError as exc:
            log.warning("sandbox %s: no out-of-memory notification: %s", box.uuid, exc.strerror)
            return
        if efd is None:
            return
        loop = asyncio.get_running_loop()

        def on_event() -> None:
            with contextlib.suppress(BlockingIOError, OSError):
                os.eventfd_read(efd)
            # why: the kernel signals when the cgroup runs out of memory, before it picks and
            # counts a victim; the only other signal, removal, comes after stop() set stopping
            if box.stopping or box.cgroup is None:
                return
            box.out_of_memory = True
            loop.remove_reader(efd)
            self._signal_all(box, signal.SIGKILL)

        loop.add_reader(efd, on_event)

    def _signal_all(self, box: _Box, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(box.proc.pid, sig)
        if box.init_pid:
            # why: killing a pid namespace's init kills every process in it at once
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(box.init_pid, sig)

    async def _release_cgroup(self, box: _Box) -> None:
        cgroup, box.cgroup = box.cgroup, None
        if cgroup is None:
            return
        if cgroup.armed_fd is not None:
            asyncio.get_running_loop().remove_reader(cgroup.armed_fd)
        await asyncio.to_thread(cgroup.remove)

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
        cgroup = box.cgroup
        out_of_memory = box.out_of_memory or (cgroup is not None and cgroup.oom_kills() > 0)
        await self._release_cgroup(box)
        if self._boxes.get(box.uuid) is not box:
            return  # why: a newer boot already replaced this one; its death is old news
        del self._boxes[box.uuid]
        try:
            self._on_exit(box.uuid, code, out_of_memory)
        except Exception:
            log.exception("on_exit callback for sandbox %s failed", box.uuid)

    async def _kill(self, box: _Box) -> None:
        """SIGKILL the bwrap process group and the sandbox's pid 1; wait until all are gone."""
        self._signal_all(box, signal.SIGKILL)
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
            await self._release_cgroup(box)
            for sock in (self.plugin_socket(uuid), self._relay_socket(uuid)):
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()

    async def destroy(self, uuid: str) -> None:
        """Stop the sandbox and remove its workspace, host key, id range and control dir."""
        await self.stop(uuid)
        async with self._lock(uuid):
            await asyncio.to_thread(self._remove_files, uuid)
            self._consoles.pop(uuid, None)
        self._locks.pop(uuid, None)

    def _remove_files(self, uuid: str) -> None:
        if self._ids is not None:
            self._ids.release(self._instance_dir(uuid))
        for path in (self.workspace(uuid), self._instance_dir(uuid), self._control_dir(uuid)):
            _rmtree(path)

    async def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove what stopped sandboxes of instances not in `keep` left on disk.

        A delete whose teardown was cut short (the daemon stopped or was killed) leaves a
        workspace no record names any more; the daemon calls this at start and at shutdown.
        """
        wanted = set(keep) | set(self._boxes)
        found: set[str] = set()
        for sub in (self.state_dir / "workspaces", self.state_dir / "sandboxes"):
            with contextlib.suppress(FileNotFoundError):
                found |= {p.name for p in sub.iterdir() if _UUID_RE.match(p.name)}
        pruned = sorted(found - wanted)
        for uuid in pruned:
            async with self._lock(uuid):
                await asyncio.to_thread(self._remove_files, uuid)
            self._locks.pop(uuid, None)
        return pruned

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
