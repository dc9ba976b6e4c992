"""Finding, starting and stopping the local metro daemon of a state dir.

`ensure_running()`, `stop()` and `status()` find the daemon through `metro.json` in the state
dir and start it detached (`python -m reconciler.local serve`, its own session) when none
answers, under an flock so that two callers start one. Standard library only: this is the part
of the emulator every `ukc` run loads.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler._util.pids import pid_alive
from reconciler._util.retry import RetryPolicy, poll
from reconciler.errors import LocalMetroError

__all__ = [
    "MetroInfo",
    "check_prerequisites",
    "default_state_dir",
    "ensure_running",
    "private_dir",
    "running",
    "status",
    "stop",
]

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


def private_dir(path: Path) -> None:
    """Create `path` (0700) or check it: a directory of ours that no other user can enter,
    write, or swap for another (every directory above it is ours or root's, and writable by
    nobody else unless sticky).

    The state dir holds the API token, the CA key and every sandbox's `/workspace`; another
    user who could enter it would read them no matter how the files inside are locked.
    """
    try:
        # why each missing parent 0700 too: made with the umask's mode (0775 under a umask
        # of 002), the check of the directories above would refuse what ukc itself made
        missing = [path, *(p for p in path.parents if not p.exists())]
        for made in reversed(missing):
            made.mkdir(exist_ok=True, mode=0o700)
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
    # why refused, not made 0700: others may already have put files there (a metro.json
    # naming their own metro), and it may be a shared one such as /tmp
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise LocalMetroError(
            f"local metro state dir {path} can be written by other users "
            f"(mode {stat.S_IMODE(st.st_mode):o}); "
            "set UKC_LOCAL_STATE_DIR to a directory of your own"
        )
    _check_ancestors(path)
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(path, 0o700)


def _check_ancestors(path: Path) -> None:
    """Refuse a state dir below a directory another user owns or can write (not sticky).

    why: whoever can rename entries above the state dir (a HOME another account owns, under
    `sudo -E`) swaps it, after any check of it, for a directory holding their metro.json:
    ukc then sends its requests, and the user's files, to their fake metro. A sticky
    directory (/tmp) lets nobody else rename what is ours in it.
    """
    for parent in path.resolve().parents:
        st = os.stat(parent)
        if st.st_uid not in (0, os.getuid()):
            raise LocalMetroError(
                f"local metro state dir {path} is inside {parent}, which belongs to uid "
                f"{st.st_uid}; set UKC_LOCAL_STATE_DIR to a directory of your own"
            )
        if stat.S_IMODE(st.st_mode) & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise LocalMetroError(
                f"local metro state dir {path} is inside {parent}, which other users can "
                f"write (mode {stat.S_IMODE(st.st_mode):o}); "
                "set UKC_LOCAL_STATE_DIR to a directory of your own"
            )


def _open_private(path: Path, flags: int) -> int:
    """Open (creating 0600) a file of the state dir, and make an older, looser one 0600."""
    fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
        os.fchmod(fd, 0o600)
    return fd


def _proc_state(pid: int) -> str:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    # why: the command name may contain spaces and parentheses; the state follows the last ')'
    return data[data.rfind(b")") + 2 :][:1].decode("ascii", "replace")


def _daemon_alive(pid: int) -> bool:
    """Whether the daemon process `pid` still runs (a zombie does not)."""
    # why: a daemon this process spawned becomes a zombie when it exits; reap it first
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    return pid_alive(pid) and _proc_state(pid) not in ("Z", "")


def _cmdline(pid: int) -> list[bytes]:
    """`pid`'s argv ([] when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _started_for(pid: int, state_dir: Path) -> bool:
    """Whether `pid` is a metro daemon of ours started for `state_dir` (as `ensure_running`
    starts one): a stale metro.json's pid may since be another process, or another dir's
    metro, or another user's process that took the pid and the port the record names (and
    would be sent the token): a command line is anyone's to choose, the uid is not."""
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
    except OSError:
        return False
    args = _cmdline(pid)
    want = [b"reconciler.local", b"serve", b"--state-dir", os.fsencode(state_dir)]
    return any(args[i : i + 4] == want for i in range(len(args) - 3))


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


#: why no proxy: one the environment names would get the request whole, bearer token
#: included, and could not reach this machine's loopback anyway
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _request(info: MetroInfo, method: str, path: str, timeout: float = 3.0) -> dict[str, Any]:
    req = urllib.request.Request(
        info.api_url + path,
        method=method,
        headers={"Authorization": f"Bearer {info.token}", "Accept": "application/json"},
        data=b"" if method == "POST" else None,
    )
    with _DIRECT.open(req, timeout=timeout) as resp:
        data = json.loads(resp.read() or b"{}")
    return data if isinstance(data, dict) else {}


def status(state_dir: Path | None = None) -> MetroInfo | None:
    """The running metro of `state_dir`, or None when none answers."""
    sd = (state_dir or default_state_dir()).resolve()
    info = _read_info(sd)
    if info is None or not _daemon_alive(info.pid) or not _started_for(info.pid, sd):
        return None
    try:
        data = _request(info, "GET", "/_local/status")
    except (OSError, ValueError):
        return None
    if data.get("data", {}).get("pid") != info.pid:
        return None
    return info


def running(state_dir: Path | None = None) -> MetroInfo | None:
    """The metro `state_dir`'s metro.json names while the daemon that wrote it runs, asked
    nothing (`status` asks it; None here means: ask, or start one as `ensure_running` does).

    why: the daemon writes metro.json once it listens, and it names its own pid; a live
    process with that pid, started for this state dir, is that daemon (a request to it cost
    a command 5-10 ms before its instance list could go)."""
    sd = (state_dir or default_state_dir()).resolve()
    private_dir(sd)
    info = _read_info(sd)
    if info is None or not _daemon_alive(info.pid) or not _started_for(info.pid, sd):
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
            # why -P and cwd /: `-m` puts the working directory first on sys.path, so a
            # `reconciler` directory where ukc was run (a cloned repository's) would be what
            # the daemon imports and runs, as root; and a detached daemon keeps no user's
            # directory busy
            proc = subprocess.Popen(
                [sys.executable, "-P", "-m", "reconciler.local", "serve", "--state-dir", str(sd)],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )

        def came_up() -> MetroInfo | None:
            if proc.poll() is not None:
                line = _log_tail(log_path, offset)
                raise LocalMetroError(
                    f"local metro exited with code {proc.returncode}: {line or 'no output'}"
                )
            found = _read_info(sd)
            return found if found is not None and found.pid == proc.pid else None

        info = poll(
            lambda _: came_up(), policy=RetryPolicy.every(0.01, deadline_s=_START_TIMEOUT_S)
        )
        if info is not None:
            return info
        line = _log_tail(log_path, offset)
        raise LocalMetroError(
            f"local metro pid {proc.pid} did not come up within {_START_TIMEOUT_S:.0f} s"
            + (f": {line}" if line else "")
        )


def _wait_exit(pid: int, timeout: float) -> bool:
    gone = poll(
        lambda _: True if not _daemon_alive(pid) else None,
        policy=RetryPolicy.every(0.02, deadline_s=timeout),
    )
    return gone is not None


def stop(state_dir: Path | None = None) -> bool:
    """Stop the metro of `state_dir`; False when none was running."""
    sd = (state_dir or default_state_dir()).resolve()
    info = _read_info(sd)
    if info is None or not _daemon_alive(info.pid) or not _started_for(info.pid, sd):
        return False
    with contextlib.suppress(OSError, ValueError):
        _request(info, "POST", "/_local/shutdown")
    if not _wait_exit(info.pid, _STOP_TIMEOUT_S) and _started_for(info.pid, sd):
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
