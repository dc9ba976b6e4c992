"""The first process of every local sandbox: joins its cgroups, gives up the host, execs bwrap.

Run as `python -I -S launch.py FD` (standard library only, as the daemon's interpreter); FD
carries the plan (`marshal`: the same interpreter writes and reads it, and unlike `json` it is
built in: every sandbox boot pays this program's imports), and bubblewrap's options travel in
another inherited pipe (`--args`), so no process's command line carries more than fd numbers
and the agent's fixed command. Steps:

1. join the sandbox's cgroups (so nothing of it ever runs outside its limits);
2. root daemon only: in a private mount namespace, stage what bwrap binds (the workspace, the
   agent's directory and a few files) on a fresh tmpfs over `/run`, where the sandbox's
   unprivileged host uid can reach it (the state dir itself stays 0700 root); have a helper
   create the sandbox's user namespace as that uid, map its 65536 ids onto the host range
   (setgroups allowed, so sshd's privilege separation works), and forbid user namespaces
   inside it; then drop to that uid;
3. exec bwrap (root daemon: `--userns` into that namespace).

Errors are one line on stderr (the sandbox console) and exit code 125.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import sys

TYPE_CHECKING = False  # why not typing's: importing typing was a fifth of this program's start
if TYPE_CHECKING:
    from typing import Any

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
PR_SET_PDEATHSIG = 1
SIGKILL = 9  # Linux; why not signal's: the signal module imports enum
STAGE = "/run"
EXIT_LAUNCH_FAILED = 125

_libc = ctypes.CDLL(None, use_errno=True)


class LaunchError(Exception):
    pass


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise LaunchError(f"{what}: {os.strerror(err)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str | None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {target}",
    )


def _join_cgroups(procs: list[str]) -> None:
    for path in procs:
        try:
            with open(path, "w") as f:
                f.write(str(os.getpid()))
        except OSError as exc:
            raise LaunchError(f"join cgroup {os.path.dirname(path)}: {exc.strerror}") from None


def _stage(workspace: str, files: dict[str, str]) -> None:
    """Private mount namespace; `STAGE/workspace` and `STAGE/<name>` (a file or a directory)
    bound from the host."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare mount namespace")
    _mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    _mount("ukc-stage", STAGE, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=1m")
    os.mkdir(f"{STAGE}/workspace", 0o755)
    _mount(workspace, f"{STAGE}/workspace", None, MS_BIND, None)
    for name, source in files.items():
        target = f"{STAGE}/{name}"
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.isdir(source):
            os.mkdir(target, 0o755)
        else:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        _mount(source, target, None, MS_BIND, None)


def _drop_to(uid: int) -> None:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def _user_namespace(base: int, count: int) -> int:
    """A user namespace owned by host uid `base`, ids 0..count-1 → base..; an fd to it."""
    up_r, up_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the helper: becomes the namespace's owner, then its root
        code = 1
        try:
            os.close(up_r)
            os.close(go_w)
            _drop_to(base)
            if _libc.unshare(CLONE_NEWUSER) != 0:
                os.write(up_w, f"E{ctypes.get_errno()}".encode())
                os._exit(1)
            os.write(up_w, b"U")
            if os.read(go_r, 1) == b"G":
                # why: the sandbox runs without CAP_SYS_RESOURCE here, so it cannot raise this
                # again: no user namespaces (and their kernel attack surface) inside
                with open("/proc/sys/user/max_user_namespaces", "w") as f:
                    f.write("0")
                os.write(up_w, b"D")
                code = 0
        except OSError:
            pass
        os._exit(code)
    os.close(up_w)
    os.close(go_r)
    try:
        answer = os.read(up_r, 16)
        if answer.startswith(b"E"):
            err = int(answer[1:] or b"0")
            hint = (
                "sysctl -w user.max_user_namespaces=15000"
                if err == 28
                else "allow unprivileged user namespaces (sysctl -w "
                "kernel.unprivileged_userns_clone=1 or "
                "kernel.apparmor_restrict_unprivileged_userns=0)"
            )
            raise LaunchError(f"cannot create a user namespace ({os.strerror(err)}): {hint}")
        if answer != b"U":
            raise LaunchError("user namespace helper died")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {base} {count}\n")
        fd = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY)
        os.write(go_w, b"G")
        if os.read(up_r, 1) != b"D":
            os.close(fd)
            raise LaunchError("could not disable user namespaces inside the sandbox")
        return fd
    finally:
        os.close(up_r)
        os.close(go_w)
        os.waitpid(pid, 0)


def launch(plan: dict[str, Any]) -> None:
    _join_cgroups(list(plan.get("cgroup_procs", [])))
    argv = [plan["bwrap"]]
    ids = plan.get("ids")
    if ids is not None:
        _stage(plan["workspace"], dict(plan["files"]))
        userns = _user_namespace(int(ids["base"]), int(ids["count"]))
        os.set_inheritable(userns, True)
        _drop_to(int(ids["base"]))
        argv += ["--userns", str(userns)]
    argv += ["--args", str(int(plan["args_fd"])), "--", *map(str, plan["command"])]
    # why: set after the uid change (which clears it); bwrap sets its own once it runs
    _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != int(plan["parent"]):
        raise LaunchError("the daemon went away")
    os.execv(argv[0], argv)


def main() -> int:
    try:
        fd = int(sys.argv[1])
        with os.fdopen(fd, "rb") as f:
            plan = marshal.loads(f.read())
        if not isinstance(plan, dict):
            raise ValueError("the plan must be a dict")
        launch(plan)
    except (LaunchError, OSError, ValueError, KeyError, IndexError, EOFError, TypeError) as exc:
        text = str(exc) if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
        sys.stderr.write(f"launch: {text}\n")
        sys.stderr.flush()
    return EXIT_LAUNCH_FAILED


if __name__ == "__main__":
    sys.exit(main())
