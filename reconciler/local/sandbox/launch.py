"""The first process of every local sandbox: joins its cgroups, gives up the host, execs bwrap.

The daemon runs it once as `python -I -S launch.py --serve SOCK DAEMON_PID`, the launch
server (`serve`), which forks a child per sandbox that does what follows; `python -I -S
launch.py FD` does it once, in this process. Standard library only, as the daemon's
interpreter. The plan is `marshal`led (the same interpreter writes and reads it; built in,
unlike `json`), and bubblewrap's options travel in an inherited pipe (`--args`), so no
process's command line carries more than fd numbers and the agent's fixed command. Steps:

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
MAX_FDS = 16

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


def _place_fds(fds: list[int], targets: list[int]) -> None:
    """A launched child's fds: `fds[0]` (the console) as stdout and stderr, /dev/null as
    stdin, `fds[1:]` at the numbers `targets` (those the plan and bwrap's options name), and
    nothing else: every other fd the server had (its socket above all) is closed."""
    import fcntl

    if not fds:
        raise LaunchError("no console")
    above = max([*fds, *targets, 2]) + 1
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in fds]
    null = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.dup2(null, 0)
    os.dup2(moved[0], 1)
    os.dup2(moved[0], 2)
    # why after the console: so that the error is on it
    if len(fds) != len(targets) + 1 or len(set(targets)) != len(targets):
        raise LaunchError("the fds do not match their numbers")
    if any(t <= 2 for t in targets):
        raise LaunchError("an fd number below 3")
    for fd, target in zip(moved[1:], targets, strict=True):
        os.dup2(fd, target)
    low = 3
    for keep in sorted(targets):
        os.closerange(low, keep)
        low = keep + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX"))


def serve(sock_fd: int, parent: int) -> int:
    """The launch server: one per daemon, started once instead of this program per sandbox
    (its interpreter start and imports were ~10 ms a boot).

    Reads requests from the daemon on `sock_fd` (a SOCK_SEQPACKET socket, marshalled tuples):
    `("launch", id, plan, numbers)` with the console and the plan's fds passed along
    (SCM_RIGHTS) forks a child that places those fds, drops everything else, and does what
    `launch` does; answered `("pid", id, pid)` or `("error", id, text)`. `("signal", pid,
    sig)` signals a child's process group. Each child's end is sent as `("exit", pid, code)`.
    This server is the only reaper of its children, so a pid it has not reported gone is
    still that child's: it alone signals them, and only those not yet reaped.
    """
    import contextlib
    import select
    import signal
    import socket

    _check(_libc.prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0), "prctl")
    if os.getppid() != parent:
        return 1
    sock = socket.socket(fileno=sock_fd)
    sock.set_inheritable(False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    live: set[int] = set()

    def send(msg: tuple[Any, ...]) -> None:
        sock.send(marshal.dumps(msg))

    def reap() -> None:
        while live:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            live.discard(pid)
            send(("exit", pid, os.waitstatus_to_exitcode(status)))

    def start(rid: int, plan: dict[str, Any], numbers: list[int], fds: list[int]) -> None:
        plan = {**plan, "parent": os.getpid()}
        grouped_r, grouped_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            os.close(grouped_r)
            os.close(grouped_w)
            send(("error", rid, f"fork: {exc.strerror}"))
            return
        if pid == 0:
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.setsid()
                os.close(grouped_w)
                _place_fds(fds, numbers)
                launch(plan)
            except BaseException as exc:  # why so broad: the child must never return
                text = str(exc) if isinstance(exc, LaunchError) else f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(OSError):
                    os.write(2, f"launch: {text}\n".encode())
            os._exit(EXIT_LAUNCH_FAILED)
        live.add(pid)
        # why wait: until the child's setsid its pid names no process group, and a signal
        # to the group the daemon sends at once would miss it
        os.close(grouped_w)
        os.read(grouped_r, 1)
        os.close(grouped_r)
        send(("pid", rid, pid))

    poller = select.poll()
    poller.register(sock, select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    fd_space = socket.CMSG_SPACE(MAX_FDS * 4)
    while True:
        for fd, _ in poller.poll():
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                reap()
                continue
            data, ancillary, _, _ = sock.recvmsg(65536, fd_space)
            fds: list[int] = []
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    usable = len(payload) - len(payload) % 4
                    fds += memoryview(payload[:usable]).cast("i").tolist()
            try:
                if not data:
                    return 0  # the daemon is gone; the children die with this server
                msg = marshal.loads(data)
                if msg[0] == "launch":
                    start(int(msg[1]), dict(msg[2]), [int(n) for n in msg[3]], fds)
                elif msg[0] == "signal" and int(msg[1]) in live:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(int(msg[1]), int(msg[2]))
            except (ValueError, TypeError, IndexError, KeyError, EOFError) as exc:
                # why not exit: every sandbox dies with this server
                sys.stderr.write(f"launch server: a bad request ({type(exc).__name__})\n")
                sys.stderr.flush()
            finally:
                for fd in fds:
                    os.close(fd)
            reap()


def main() -> int:
    if sys.argv[1:2] == ["--serve"]:
        return serve(int(sys.argv[2]), int(sys.argv[3]))
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
