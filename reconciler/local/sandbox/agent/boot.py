"""The agent's start: limits, environment, boot id, servers, sshd, and the ready line.

Runs as the sandbox's first process after bwrap's init. It reports `ready <boot id>` on the
inherited status fd once sshd accepts on 2222 (or, with `--ssh-delay`/`--key-delay`, first,
as UKC reports `running` before the image's sshd is up), then lives as long as sshd.
"""

from __future__ import annotations

import _socket
import _thread
import os
import resource
import select
import sys
import time

from . import envpipe, options
from .console import log, os_message, suppress
from .relay import serve_relay, spawn

# why not typing's, and why no argparse, json, subprocess or uuid here: every sandbox boot
# pays the agent's imports (argparse, json and subprocess pull in re, gettext, locale,
# selectors; uuid pulls in platform): they were two thirds of its start. Why _socket,
# _signal and _thread, and no contextlib: socket and signal load enum, threading and
# contextlib load functools and collections; with them the imports were still 60% of the
# agent's CPU to its ready line
TYPE_CHECKING = False
if TYPE_CHECKING:
    import signal as _signal  # the same functions and numbers as the built-in module
    import socket
    from collections.abc import Callable
    from http.server import ThreadingHTTPServer
else:
    import _signal

__all__ = ["main"]

SSH_PORT = 2222
SSHD_NOTIFY = "/run/ukc/sshd-notify"
EXEC_PORT = 8080
RUN_DIR = "/run/ukc"
READY_DEADLINE_S = 10.0

SSHD_CONFIG = """\
ListenAddress 127.0.0.1
HostKey {host_key}
AuthorizedKeysFile {run}/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
PidFile none
PrintLastLog no
PrintMotd no
UseDNS no
Subsystem sftp internal-sftp
MaxStartups 100
AcceptEnv none
"""


# why -r (no re-exec of sshd for each connection): the re-exec gives each connection a fresh
# address layout against an attacker who connects again and again; here only the metro's
# owner reaches the edge (peercred) and the sandbox's network is its own, so it guards against
# no one, and it was over a quarter of sshd's CPU per connection (an exec of sshd, linking
# its ~25 libraries again: 43 -> 31 ms per connection of three exec channels, perf, 20
# connections). OpenSSH 9.8 and later hand the connection to sshd-session and ignore -r
# (they log that it is deprecated).
SSHD_ARGV = [
    "/usr/sbin/sshd", "-D", "-e", "-r", "-f", f"{RUN_DIR}/sshd_config", "-p", str(SSH_PORT)
]  # fmt: skip


def _write(path: str, data: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data.encode())
    finally:
        os.close(fd)


def _listening(port: int) -> bool:
    """Whether 127.0.0.1:`port` is in LISTEN state in this network namespace.

    Reading /proc/net/tcp instead of connecting keeps sshd from logging a dropped connection
    on every boot; a listening socket queues connections, so sshd is accepting from here on.
    """
    want = f"0100007F:{port:04X}"
    try:
        with open("/proc/net/tcp") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 3 and fields[1] == want and fields[3] == "0A":
                    return True
    except OSError:
        pass
    return False


class Child:
    """A program the agent started (sshd): its pid, and its exit code once reaped."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        # why: whatever descriptors the agent inherited (the status pipe, the plugin and relay
        # sockets) stay the agent's; the child gets stdin from /dev/null and the console
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            if fd > 2:
                with suppress(OSError):
                    os.set_inheritable(fd, False)
        self.returncode: int | None = None
        self.pid = os.posix_spawn(
            argv[0],
            argv,
            env,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)],
            # why: Python ignores these two; a program and its children expect the default
            setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),
        )

    def poll(self) -> int | None:
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self) -> int:
        if self.returncode is None:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def signal(self, sig: int) -> None:
        if self.returncode is None:
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)


def boot_id() -> str:
    """A random (version 4) UUID, as `uuid.uuid4()` writes it."""
    b = bytearray(os.urandom(16))
    b[6] = (b[6] & 0x0F) | 0x40
    b[8] = (b[8] & 0x3F) | 0x80
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def notify_socket(path: str) -> _socket.socket | None:
    """A datagram socket at `path` for sshd's `READY=1` (sd_notify; None if it cannot bind).

    Why: Debian's sshd says when it listens; polling /proc/net/tcp to find out cost the most
    of the agent's CPU after its imports (reading that file walks the kernel's whole TCP
    hash table, every network namespace's, and the agent read it every 5 ms).
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        with suppress(FileNotFoundError):
            os.unlink(path)
        sock.bind(path)
        # why: the kernel then attaches each sender's pid, so only sshd's message counts
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_PASSCRED, 1)
    except OSError:
        sock.close()
        return None
    return sock


def _said_ready(notify: _socket.socket, pid: int) -> bool:
    """Whether the datagram waiting on `notify` is `READY=1` from process `pid`."""
    try:
        data, ancillary, _, _ = notify.recvmsg(4096, _socket.CMSG_SPACE(12))
    except OSError:
        return False
    sender = next(
        (
            int.from_bytes(cdata[:4], sys.byteorder)
            for level, kind, cdata in ancillary
            if level == _socket.SOL_SOCKET and kind == _socket.SCM_CREDENTIALS and len(cdata) >= 4
        ),
        0,
    )
    return sender == pid and b"READY=1" in data.split(b"\n")


#: how often /proc/net/tcp is read while sshd may still say it is ready. why so seldom: each
#: read walks the kernel's TCP table of every network namespace (~4 ms of a sandbox's CPU
#: per boot in a 50-sandbox fan-out, at a read every 50 ms); an sshd that says it is ready
#: never needs it, and one that does not is found listening within this
LISTEN_POLL_NOTIFIED_S = 0.5


def _wait_accepting(
    port: int,
    sshd: Child,
    deadline: float,
    notify: _socket.socket | None = None,
    listening: Callable[[int], bool] = _listening,
) -> bool:
    """Wait until sshd listens on `port`: its `READY=1` on `notify`, or (an sshd that does
    not say) LISTEN in /proc/net/tcp, checked every 50 ms (every
    `LISTEN_POLL_NOTIFIED_S` while `notify` may still get the message)."""
    next_look = time.monotonic() + (LISTEN_POLL_NOTIFIED_S if notify is not None else 0)
    while time.monotonic() < deadline:
        if sshd.poll() is not None:
            return False
        if notify is None:
            time.sleep(0.05)
        elif select.select([notify], [], [], 0.05)[0]:
            if _said_ready(notify, sshd.pid):
                return True
            continue
        if notify is not None and time.monotonic() < next_look:
            continue
        if listening(port):
            return True
        if notify is not None:
            next_look = time.monotonic() + LISTEN_POLL_NOTIFIED_S
    return False


def tcp_listener(port: int) -> _socket.socket:
    """127.0.0.1:`port`, listening (with socketserver's backlog and address reuse)."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(5)
    except OSError:
        sock.close()
        raise
    return sock


def _plugin_server(sock: socket.socket) -> ThreadingHTTPServer:
    from .commands import Registry
    from .httpd import UnixHTTPServer
    from .plugin import PluginHandler

    handler = type("PluginHandler", (PluginHandler,), {"plugin": Registry()})
    return UnixHTTPServer(sock, handler)


def _exec_server(sock: socket.socket) -> ThreadingHTTPServer:
    from .execapi import ExecHandler
    from .httpd import TcpHTTPServer

    return TcpHTTPServer(sock, ExecHandler)


def _serve_when_asked(
    sock: _socket.socket, server: Callable[[socket.socket], ThreadingHTTPServer]
) -> None:
    """Serve an HTTP API on its listening socket from its first connection on.

    Why not from boot: http.server (with email, ssl and http.client) is most of the agent's
    start (~30 ms of CPU per sandbox), and most sandboxes never call either API; the socket
    listens from boot all the same, so a client sees no difference but the first answer's
    import. The thread is started at boot, so a sandbox that later runs out of processes
    still gets its servers.
    """
    select.select([sock], [], [])
    import socket

    # why: socketserver wants the socket module's class (its accept returns one)
    server(socket.socket(fileno=sock.detach())).serve_forever()


def _load_env(fd: int) -> None:
    """The instance env (`envpipe` pairs on `fd`) becomes this process's environment.

    It comes through a pipe, not bwrap's environment, so nothing on the host side of the
    sandbox ever runs with it (secret values, or an `LD_PRELOAD` aimed at the host).
    """
    with os.fdopen(fd, "rb") as f:
        env = envpipe.decode(f.read())
    os.environ.clear()
    os.environ.update(env)


def _limit(max_procs: int, max_data: int) -> None:
    """The rlimit fallback (no usable cgroups): set before anything else of the sandbox runs.

    Soft and hard alike: raising a hard limit needs CAP_SYS_RESOURCE in the host's user
    namespace, which nothing in the sandbox has. RLIMIT_NPROC counts the processes of the
    sandbox's user inside this user namespace only.
    """
    if max_procs:
        resource.setrlimit(resource.RLIMIT_NPROC, (max_procs, max_procs))
    if max_data:
        # why: thread stacks count as data; the agent's many small threads need little
        _thread.stack_size(1024 * 1024)
        resource.setrlimit(resource.RLIMIT_DATA, (max_data, max_data))


def main(argv: list[str]) -> int:
    try:
        args = options.parse(argv)
    except ValueError as exc:
        log(f"bad arguments: {exc}")
        return 2
    if args.max_procs or args.max_data:
        _limit(args.max_procs, args.max_data)

    _load_env(args.env_fd)
    boot = boot_id()
    os.makedirs(RUN_DIR, mode=0o755, exist_ok=True)
    _write(f"{RUN_DIR}/boot_id", boot + "\n", 0o644)
    # why: sshd reads the key as the sandbox user; the value never leaves this 0600 file
    key_line = os.environ.get("PUBKEY", "").strip() + "\n"
    _write(f"{RUN_DIR}/authorized_keys", "" if args.key_delay > 0 else key_line, 0o600)
    _write(
        f"{RUN_DIR}/sshd_config",
        SSHD_CONFIG.format(host_key=args.host_key, run=RUN_DIR),
        0o644,
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    # why: sshd records each login in /var/log/lastlog, as an image's sshd can; the
    # sandbox's /var starts empty, and without the file every interactive login prints an error
    with suppress(OSError):
        os.makedirs("/var/log", mode=0o755, exist_ok=True)
        os.close(os.open("/var/log/lastlog", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))

    plugin_sock = _socket.socket(fileno=args.plugin_fd)
    relay_sock = _socket.socket(fileno=args.relay_fd)
    try:
        exec_sock = tcp_listener(EXEC_PORT)
    except OSError as exc:
        log(f"exec api cannot listen on {EXEC_PORT}: {exc.strerror}")
        return 1
    for sock, server in ((plugin_sock, _plugin_server), (exec_sock, _exec_server)):
        spawn(_serve_when_asked, sock, server)
    spawn(serve_relay, relay_sock)

    late = args.ssh_delay > 0 or args.key_delay > 0
    if late:
        _ready(args.status_fd, boot)
        time.sleep(args.ssh_delay)
    sshd_env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
    notify = notify_socket(SSHD_NOTIFY)
    if notify is not None:
        sshd_env["NOTIFY_SOCKET"] = SSHD_NOTIFY
    try:
        sshd = Child(SSHD_ARGV, sshd_env)
    except OSError as exc:
        log(f"sshd failed to start: {os_message(exc)}")
        return 1

    def _terminate(signum: int, _frame: object) -> None:
        sshd.signal(_signal.SIGTERM)
        os._exit(128 + signum)

    _signal.signal(_signal.SIGTERM, _terminate)
    _signal.signal(_signal.SIGINT, _terminate)

    accepting = _wait_accepting(SSH_PORT, sshd, time.monotonic() + READY_DEADLINE_S, notify)
    if notify is not None:
        notify.close()
        with suppress(OSError):
            os.unlink(SSHD_NOTIFY)
    if not accepting:
        log(f"sshd not accepting on {SSH_PORT} (exit code {sshd.poll()})")
        sshd.signal(_signal.SIGKILL)
        return 1
    if late:
        time.sleep(args.key_delay)
        _write(f"{RUN_DIR}/authorized_keys", key_line, 0o600)
    else:
        _ready(args.status_fd, boot)
    code = sshd.wait()
    log(f"sshd exited with code {code}")
    return 1 if code == 0 else (code if code > 0 else 128 - code)


def _ready(status_fd: int, boot: str) -> None:
    """Tell the runtime the sandbox is up (then the metro says `running`)."""
    with suppress(OSError):
        os.write(status_fd, f"ready {boot}\n".encode())
        os.close(status_fd)
