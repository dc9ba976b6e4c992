"""What bubblewrap is told: the sandbox's mounts, namespaces and capabilities, and the agent.

Every sandbox sees the host's `/usr` and `/etc` read-only (its own account files in them),
size-bounded private `/tmp` `/run` `/var` `/root`, its workspace at `/workspace`, and
`/run/ukc-host` (the agent and its host key, read-only). It has its own user, mount, pid, net,
ipc, uts and cgroup namespaces, and dies with the daemon. The options travel through a pipe
(`--args`), so no command line names an instance.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from reconciler.errors import LocalMetroError
from reconciler.local.behaviour import BootOptions
from reconciler.local.sandbox.files import HOST_KEY

__all__ = [
    "AGENT",
    "BASE_ENV",
    "BWRAP",
    "HOST_DIR",
    "PYTHON",
    "SANDBOX_CAPS",
    "STAGE",
    "bind_sources",
    "bwrap_options",
    "check_host",
    "host_files",
]

BWRAP = "/usr/bin/bwrap"
PYTHON = "/usr/bin/python3"
#: the agent package, bound read-only into every sandbox as HOST_DIR/agent
AGENT = Path(__file__).resolve().with_name("agent")
HOST_DIR = "/run/ukc-host"  # read-only binds from the host: agent, host key
STAGE = "/run"  # where the launcher of a root daemon stages what bwrap binds (launch.py)
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


def _userns_disabled() -> str | None:
    """The one-line fix when this kernel has user namespaces turned off, else None."""
    try:
        limit = Path("/proc/sys/user/max_user_namespaces").read_text().strip()
    except OSError:
        return None
    if limit == "0":
        return "sysctl -w user.max_user_namespaces=15000"
    return None


def check_host(bwrap: str, sshd: str) -> None:
    """Refuse to start a sandbox where a tool is missing or user namespaces are off, naming
    the fix."""
    if not os.access(bwrap, os.X_OK):
        raise LocalMetroError("bwrap not found: apt-get install -y bubblewrap")
    if not os.access(sshd, os.X_OK):
        raise LocalMetroError("sshd not found: apt-get install -y openssh-server")
    if not os.access(PYTHON, os.X_OK):
        raise LocalMetroError("/usr/bin/python3 not found: apt-get install -y python3")
    fix = _userns_disabled()
    if fix is not None:
        raise LocalMetroError(f"sandboxes need user namespaces, which are off: {fix}")


def host_files(inst: Path, accounts: Path) -> dict[str, str]:
    """The host files (and the agent's directory) bound into the sandbox, by their name under
    the launcher's stage: the instance's own from `inst`, the shared account files from
    `accounts`."""
    return {
        "etc/passwd": str(accounts / "passwd"),
        "etc/group": str(accounts / "group"),
        "etc/shadow": str(inst / "shadow"),
        "host/agent": str(AGENT),
        f"host/{HOST_KEY}": str(inst / HOST_KEY),
    }


def volume_source(at: str) -> str:
    """The name under which the host directory of the volume mounted at `at` is bound."""
    return "volume" + at.replace("/", "_")


def bind_sources(files: dict[str, str], workspace: Path, *, staged: bool) -> dict[str, str]:
    """Where bwrap finds each bound file and the workspace.

    `staged`: a root daemon's sandbox runs as a host uid that cannot reach the 0700 state dir,
    so the launcher first binds them into a tmpfs over `/run` of its own mount namespace.
    """
    if staged:
        sources = {name: f"{STAGE}/{name}" for name in files}
        sources["workspace"] = f"{STAGE}/workspace"
        return sources
    return {**files, "workspace": str(workspace)}


#: the sandbox's own account files, in place of the host's
OWN_ETC = ("passwd", "group", "shadow")
# why at the top: a relative link in the host's /etc (fonts/conf.d → ../../../usr/...)
# resolves the same from any directory one level below /
HOST_ETC = "/.host-etc"


#: the last listing of the host's /etc: (its dir's device, inode, mtime) and the options
_etc_seen: tuple[tuple[int, int, int], list[str]] | None = None
#: a listing is kept only once the directory has been unchanged this long. why: an mtime
#: moves in coarse clock ticks, so a change in the tick of the listing could keep its mtime
_ETC_SETTLED_NS = 2_000_000_000


def _etc_links(etc: str) -> list[str]:
    """`--symlink` options for every entry of the host's `etc` but the sandbox's own files.

    Why kept between boots: every sandbox boot listed and lstat'ed the whole of /etc (~200
    entries). An entry added, removed, renamed or re-linked changes the directory's mtime,
    so a listing is reused only while that (and the directory itself) is unchanged.
    """
    global _etc_seen
    st = os.stat(etc)
    key = (st.st_dev, st.st_ino, st.st_mtime_ns)
    if _etc_seen is not None and _etc_seen[0] == key:
        return _etc_seen[1]
    out: list[str] = []
    for name in sorted(os.listdir(etc)):
        if name in OWN_ETC:
            continue
        host = os.path.join(etc, name)
        target = os.readlink(host) if os.path.islink(host) else f"{HOST_ETC}/{name}"
        out += ["--symlink", target, f"/etc/{name}"]
    if time.time_ns() - st.st_mtime_ns > _ETC_SETTLED_NS:
        _etc_seen = (key, out)
    return out


def _etc_options(sources: dict[str, str]) -> list[str]:
    """`/etc` as the host's, read-only, with the sandbox's own account files.

    Why not the host's `/etc` with files bound over it: a mount on a host file goes away when
    the host replaces that file (useradd renames a new `/etc/passwd` into place), and the
    sandbox then sees the host's accounts, where root's login is locked. So the host's `/etc`
    is bound aside and the sandbox's `/etc` is a directory of links into it.
    """
    args = ["--ro-bind", "/etc", HOST_ETC, "--dir", "/etc", *_etc_links("/etc")]
    for name in OWN_ETC:
        args += ["--ro-bind", sources[f"etc/{name}"], f"/etc/{name}"]
    return args


def bwrap_options(
    uuid: str,
    sources: dict[str, str],
    fds: dict[str, int],
    *,
    own_ids: bool,
    memory_mb: int,
    max_pids: int,
    rlimits: bool,
    boot: BootOptions | None = None,
    mounts: list[tuple[str, bool]] | None = None,
    workspace_tmpfs: bool = False,
) -> tuple[list[str], list[str]]:
    """bwrap's options (they go through `--args`) and the agent's command line.

    `own_ids`: the sandbox has a host id range of its own (root daemon) and the launcher hands
    bwrap the user namespace it made; else bwrap makes one and the sandbox is the daemon's uid.
    `rlimits`: no cgroup limits the sandbox, so the agent sets rlimits itself.
    `mounts`: the volumes, as (mount point, read-only); the host directory of each but one at
    `/workspace` (which is `sources["workspace"]`) is among `sources` under `volume_source`.
    `workspace_tmpfs`: `/workspace` is a tmpfs of `memory_mb` that bwrap makes inside the
    sandbox (a daemon that cannot mount one on the host: its files live as long as the
    sandbox, as RAM does on UKC) instead of the bound host directory.
    """
    # why: tmpfs lives in memory; bound it even where no cgroup charges it to the sandbox
    size = str(memory_mb * 1024 * 1024)
    if own_ids:
        # why: the launcher passes --userns (the namespace it made); map root to root
        args = ["--uid", "0", "--gid", "0", "--cap-drop", "ALL"]
        for cap in SANDBOX_CAPS:
            args += ["--cap-add", cap]
    else:
        args = ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
    args += [
        "--ro-bind", "/usr", "/usr",
        "--symlink", "usr/bin", "/bin",
        "--symlink", "usr/sbin", "/sbin",
        "--symlink", "usr/lib", "/lib",
    ]  # fmt: skip
    if os.path.isdir("/usr/lib64"):
        args += ["--symlink", "usr/lib64", "/lib64"]
    args += _etc_options(sources)
    args += [
        "--dev", "/dev",
        "--proc", "/proc",
        "--size", size, "--tmpfs", "/tmp",
        "--size", size, "--tmpfs", "/run",
        "--size", size, "--tmpfs", "/var",
        "--dir", "/var/tmp",
        "--dir", "/var/empty",
        "--size", size, "--tmpfs", "/root",
        "--ro-bind", sources["host/agent"], f"{HOST_DIR}/agent",
        "--ro-bind", sources[f"host/{HOST_KEY}"], f"{HOST_DIR}/{HOST_KEY}",
    ]  # fmt: skip
    if workspace_tmpfs:
        args += ["--size", size, "--tmpfs", "/workspace"]
    else:
        args += ["--bind", sources["workspace"], "/workspace"]
    # why shortest first: a volume mounted inside another one must go on top of it
    for at, readonly in sorted(mounts or [], key=lambda m: len(m[0])):
        if at == "/workspace":
            args += ["--remount-ro", at] if readonly else []
            continue
        args += ["--ro-bind" if readonly else "--bind", sources[volume_source(at)], at]
    args += [
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
        PYTHON, "-I", "-S", f"{HOST_DIR}/agent/__main__.py",
        "--status-fd", str(fds["status"]),
        "--plugin-fd", str(fds["plugin"]),
        "--relay-fd", str(fds["relay"]),
        "--env-fd", str(fds["env"]),
        "--host-key", f"{HOST_DIR}/{HOST_KEY}",
    ]  # fmt: skip
    python = PYTHON
    if boot is not None and boot.no_python:
        # the minimal image has no python3: every interpreter on the PATH reads as a file
        # that cannot run, and the agent runs its own copy from the host dir
        python = f"{HOST_DIR}/python3"
        args += ["--ro-bind", os.path.realpath(PYTHON), python]
        for entry in sorted(os.listdir("/usr/bin")):
            if entry.startswith("python") and not os.path.islink(f"/usr/bin/{entry}"):
                args += ["--ro-bind", "/dev/null", f"/usr/bin/{entry}"]
    command[0] = python
    if boot is not None and (boot.ssh_delay_s or boot.key_delay_s):
        command += [
            "--ssh-delay", f"{boot.ssh_delay_s:g}",
            "--key-delay", f"{boot.key_delay_s:g}",
        ]  # fmt: skip
    if rlimits:
        command += [
            "--max-procs", str(max_pids),
            "--max-data", str(memory_mb * 1024 * 1024),
        ]  # fmt: skip
    return args, command
