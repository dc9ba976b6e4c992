"""Lifecycle of the local metro daemon, and the composition it runs.

The controller (and `ukc local start|stop|status|env`) calls `ensure_running()`, `stop()` and
`status()`; they find the daemon through `metro.json` in the state dir and start it detached
(`python -m reconciler.local serve`) when needed, under an flock so two callers start one.
`serve()` is what that process runs: the API server (`local.server`) over the instance state
(`local.state`), the sandbox runtime (`local.sandbox`), the TLS edge (`local.edge`) and the CA
(`local.ca`), with SIGTERM/SIGINT leading to a graceful shutdown.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from reconciler.errors import LocalMetroError

if TYPE_CHECKING:
    from reconciler.local.state.validation import MetroLimits

__all__ = [
    "MetroInfo",
    "check_prerequisites",
    "default_state_dir",
    "ensure_running",
    "load_or_create_token",
    "private_dir",
    "serve",
    "status",
    "stop",
]

EDGE_HOST = "127.0.0.1"
_DEFAULT_PORTS = (2222, 443)
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class MetroInfo:
    """How to reach a running local metro."""

    api_url: str
    token: str
    ca_path: Path
    app_domain: str
    edge_host: str
    edge_ports: dict[int, int]
    pid: int
    state_dir: Path
    #: how sandboxes are isolated and limited (one line; empty from an older daemon)
    sandbox: str = ""

    def __repr__(self) -> str:
        # why: the token must never reach a log line through a stray repr()
        return (
            f"MetroInfo(api_url={self.api_url!r}, pid={self.pid}, "
            f"state_dir={str(self.state_dir)!r}, edge_ports={self.edge_ports!r})"
        )


def default_state_dir() -> Path:
    """$UKC_LOCAL_STATE_DIR, else $XDG_STATE_HOME/ukc/local, else ~/.local/state/ukc/local."""
    explicit = os.environ.get("UKC_LOCAL_STATE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "ukc" / "local"


def check_prerequisites() -> None:
    """Fail with one line naming the Debian package when bwrap or sshd is missing."""
    if shutil.which("bwrap") is None:
        raise LocalMetroError(
            "bubblewrap (bwrap) is not installed: run apt-get install -y bubblewrap"
        )
    if not Path("/usr/sbin/sshd").exists():
        raise LocalMetroError(
            "sshd (/usr/sbin/sshd) is not installed: run apt-get install -y openssh-server"
        )


def load_or_create_token(state_dir: Path) -> str:
    """The API bearer token, created once in `state_dir/token` (0600)."""
    path = state_dir / "token"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
            os.chmod(path, 0o600)
        token = path.read_text().strip()
        if not token:
            raise LocalMetroError(f"token file {path} is empty") from None
        return token
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    return token


def private_dir(path: Path) -> None:
    """Create `path` (0700) or check it: a directory of ours that no other user can enter.

    The state dir holds the API token, the CA key and every sandbox's `/workspace`; another
    user who could enter it would read them no matter how the files inside are locked.
    """
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = os.lstat(path)
    except PermissionError:
        raise LocalMetroError(
            f"cannot use local metro state dir {path}: permission denied (uid {os.getuid()}); "
            "set UKC_LOCAL_STATE_DIR to a directory of your own"
        ) from None
    if not stat.S_ISDIR(st.st_mode):
        raise LocalMetroError(f"local metro state path {path} is not a directory")
    if st.st_uid != os.getuid():
        raise LocalMetroError(
            f"local metro state dir {path} belongs to uid {st.st_uid}, not to you "
            f"(uid {os.getuid()}); set UKC_LOCAL_STATE_DIR to a directory of your own"
        )
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _open_private(path: Path, flags: int) -> int:
    """Open (creating 0600) a file of the state dir, and make an older, looser one 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def _write_atomic(path: Path, text: str, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# ------------------------------------------------------------------ client side


def _pid_alive(pid: int) -> bool:
    # why: a daemon this process spawned becomes a zombie when it exits; reap it first
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _is_metro_process(pid: int) -> bool:
    # why: a stale metro.json may name a pid the kernel has since given to someone else
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"reconciler.local" in cmdline and b"serve" in cmdline


def _read_info(state_dir: Path) -> MetroInfo | None:
    try:
        raw = json.loads((state_dir / "metro.json").read_text())
        token = (state_dir / "token").read_text().strip()
        return MetroInfo(
            api_url=str(raw["api_url"]),
            token=token,
            ca_path=Path(raw["ca"]),
            app_domain=str(raw["app_domain"]),
            edge_host=str(raw["edge_host"]),
            edge_ports={int(k): int(v) for k, v in raw["edge_ports"].items()},
            pid=int(raw["pid"]),
            state_dir=state_dir,
            sandbox=str(raw.get("sandbox", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _request(info: MetroInfo, method: str, path: str, timeout: float = 3.0) -> dict[str, Any]:
    req = urllib.request.Request(
        info.api_url + path,
        method=method,
        headers={"Authorization": f"Bearer {info.token}", "Accept": "application/json"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        data = json.loads(resp.read() or b"{}")
    return data if isinstance(data, dict) else {}


def status(state_dir: Path | None = None) -> MetroInfo | None:
    """The running metro of `state_dir`, or None when none answers."""
    sd = state_dir or default_state_dir()
    info = _read_info(sd)
    if info is None or not _pid_alive(info.pid):
        return None
    try:
        data = _request(info, "GET", "/_local/status")
    except (OSError, ValueError):
        return None
    if data.get("data", {}).get("pid") != info.pid:
        return None
    return info


def _log_tail(log: Path, offset: int) -> str:
    try:
        with log.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def ensure_running(state_dir: Path | None = None) -> MetroInfo:
    """Return the running metro of `state_dir`, starting a detached daemon if needed."""
    sd = (state_dir or default_state_dir()).resolve()
    private_dir(sd)
    info = status(sd)
    if info is not None:
        return info
    with os.fdopen(_open_private(sd / "daemon.lock", os.O_WRONLY | os.O_APPEND), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        info = status(sd)
        if info is not None:
            return info
        with contextlib.suppress(FileNotFoundError):
            (sd / "metro.json").unlink()
        log_path = sd / "daemon.log"
        with os.fdopen(_open_private(log_path, os.O_WRONLY | os.O_APPEND), "ab") as log:
            offset = log.tell()
            proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler.local", "serve", "--state-dir", str(sd)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                line = _log_tail(log_path, offset)
                raise LocalMetroError(
                    f"local metro exited with code {proc.returncode}: {line or 'no output'}"
                )
            info = _read_info(sd)
            if info is not None and info.pid == proc.pid:
                return info
            time.sleep(0.01)
        line = _log_tail(log_path, offset)
        raise LocalMetroError(
            f"local metro pid {proc.pid} did not come up within {_START_TIMEOUT_S:.0f} s"
            + (f": {line}" if line else "")
        )


def _wait_exit(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.02)
    return not _pid_alive(pid)


def stop(state_dir: Path | None = None) -> bool:
    """Stop the metro of `state_dir`; False when none was running."""
    sd = (state_dir or default_state_dir()).resolve()
    info = _read_info(sd)
    if info is None or not _pid_alive(info.pid) or not _is_metro_process(info.pid):
        return False
    with contextlib.suppress(OSError, ValueError):
        _request(info, "POST", "/_local/shutdown")
    if not _wait_exit(info.pid, _STOP_TIMEOUT_S) and _is_metro_process(info.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGTERM)
        if not _wait_exit(info.pid, 5.0):
            # why: SIGKILL of the daemon leaves sandboxes to --die-with-parent; kill the
            # whole session too (the daemon was started with start_new_session)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(info.pid, signal.SIGKILL)
            _wait_exit(info.pid, 5.0)
    with contextlib.suppress(FileNotFoundError):
        (sd / "metro.json").unlink()
    return True


# ------------------------------------------------------------------ daemon side


async def serve(
    state_dir: Path,
    *,
    port: int = 0,
    app_domain: str | None = None,
    limits: MetroLimits | None = None,
    max_pids: int | None = None,
) -> None:
    """Run the metro until /_local/shutdown, SIGTERM or SIGINT."""
    # Imported here, not at the top: the controller imports this module on every `ukc` run
    # (to find or start the daemon) and must not pay for asyncio, aiohttp or the state machine.
    import asyncio

    from aiohttp import web

    from reconciler.local.state.lifecycle import LocalMetro
    from reconciler.local.state.records import DEFAULT_APP_DOMAIN

    app_domain = app_domain or DEFAULT_APP_DOMAIN
    from reconciler.local.api.app import create_app
    from reconciler.local.ca import CertificateAuthority
    from reconciler.local.edge import Edge, Route
    from reconciler.local.faults import Faults
    from reconciler.local.sandbox.runtime import DEFAULT_MAX_PIDS, SandboxRuntime

    check_prerequisites()
    state_dir = state_dir.resolve()
    private_dir(state_dir)
    # why: belt and braces under the private state dir; the workspaces are the sandboxes' files
    for sub in ("workspaces", "sandboxes"):
        private_dir(state_dir / sub)
    token = load_or_create_token(state_dir)
    loop = asyncio.get_running_loop()
    metro = LocalMetro(state_dir, app_domain=app_domain, limits=limits)
    metro.bind_loop(loop)
    runtime = SandboxRuntime(
        state_dir, on_exit=metro.on_exit, max_pids=max_pids or DEFAULT_MAX_PIDS
    )
    metro.runtime = runtime
    ca = CertificateAuthority.load_or_create(state_dir, app_domain)
    faults = Faults()
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def resolve(fqdn: str, public_port: int) -> Route | None:
        found = await metro.route_for(fqdn, public_port)
        return None if found is None else Route(uuid=found[0], destination_port=found[1])

    edge = Edge(
        ca=ca,
        runtime=runtime,
        resolve=resolve,
        on_activity=metro.on_activity,
        should_drop=faults.take_edge_drop,
        host=EDGE_HOST,
    )
    stop_event = asyncio.Event()
    api_port = 0

    def write_metro_json() -> None:
        data = {
            "pid": os.getpid(),
            "api_url": f"http://127.0.0.1:{api_port}",
            "ca": str(ca.cert_path),
            "app_domain": app_domain,
            "edge_host": EDGE_HOST,
            "edge_ports": {str(k): v for k, v in sorted(edge.ports.items())},
            "started_at": started_at,
            "sandbox": sandbox_line,
        }
        _write_atomic(state_dir / "metro.json", json.dumps(data, indent=2) + "\n")

    async def open_ports(ports: set[int]) -> None:
        new = ports - set(edge.ports)
        for p in sorted(new):
            await edge.open_port(p)
        if new and api_port:
            write_metro_json()

    metro.on_ports = open_ports
    metro.load()
    sandbox_line = runtime.describe()
    print(f"sandboxes: {sandbox_line}", flush=True)
    # why: a delete whose teardown a stop or a kill cut short left files no record names
    await runtime.prune(metro.records)
    app = create_app(
        metro,
        faults,
        token,
        shutdown=stop_event.set,
        status_extra=lambda: {
            "edge_ports": {str(k): v for k, v in edge.ports.items()},
            "sandbox": sandbox_line,
        },
    )
    # why: open waits (timeout -1) must not hold a shutdown for aiohttp's default 60 s
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    api_port = int(runner.addresses[0][1])
    await open_ports(set(_DEFAULT_PORTS) | metro.public_ports())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    await metro.resume()
    write_metro_json()
    print(f"local metro listening on 127.0.0.1:{api_port} (pid {os.getpid()})", flush=True)
    try:
        await stop_event.wait()
    finally:
        print("local metro shutting down", flush=True)
        await runner.cleanup()
        await metro.close()
        await edge.close()
        await runtime.close()
        await runtime.prune(metro.records)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "metro.json").unlink()
