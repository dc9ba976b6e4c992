"""The client half of the warm process's protocol: what every `ukc` command runs first.

Why a module of its own: `launcher` imports it before anything else on every command, so it
uses only what the interpreter has built in or `site` already loaded (`os`, `sys`, `_socket`,
`_signal`, `_struct`, `_json`, `_sha256`). The friendly modules cost more than the command:
`socket`, `signal`, `json`, `pathlib`, `hashlib` and `typing` pull in enum, re, urllib and
OpenSSL, ~35 ms together, while the warm process answers a no-op apply in ~30 ms.

The server half and the protocol are in `warm`; both halves share this module's constants
and socket helpers.

Where the socket lives: a private 0700 directory that is ours alone (`locate`); the first
candidate that qualifies wins and every refused one is named in a warning line.
"""

from __future__ import annotations

import _json
import _socket
import _struct
import os
import sys

from reconciler._util.unixsock import peer_pid, peer_uid, recv_exact

TYPE_CHECKING = False  # why not typing's: importing typing costs ~3 ms on every command
if TYPE_CHECKING:
    import signal as _signal  # the same names, typed
    from collections.abc import Callable, Mapping, Sequence
else:
    import _signal  # why: `signal` imports enum (~5 ms); `_signal` is loaded at start-up

__all__ = [
    "FORWARDED",
    "HANDSHAKE_S",
    "WARM_COMMANDS",
    "connect",
    "locate",
    "locate_socket",
    "peer_pid",
    "peer_uid",
    "private_dir",
    "recv_exact",
    "run",
    "socket_path",
    "worthy",
]

#: the commands worth a warm start (short ones); `watch`, `local` and `ssh` run in-process,
#: but `ssh NAME -- CMD` without -t (see `worthy`): a shell drives its terminal (raw mode, and
#: window changes reach only the terminal's foreground process group)
WARM_COMMANDS = frozenset({"apply", "plan", "status", "delete", "validate", "exec", "logs", "ls"})
#: signals a client passes on to its command
FORWARDED = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGHUP)
HANDSHAKE_S = 5.0


def worthy(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether `ukc argv` should go to the warm process (short commands, not opted out)."""
    env = os.environ if environ is None else environ
    if env.get("UKC_WARM", "1") == "0" or not argv:
        return False
    if argv[0] == "ssh":
        # a command without a terminal is as short as `exec`; a shell or -t drives a terminal
        ahead = argv[1 : argv.index("--")] if "--" in argv else argv[1:]
        return "--" in argv and not any(a in ("-t", "--tty", "-h", "--help") for a in ahead)
    if argv[0] not in WARM_COMMANDS:
        return False
    return not any(a in ("-h", "--help") for a in argv[1:])


#: the longest socket path a Unix socket address holds (108 bytes with the final NUL)
_SUN_PATH_MAX = 107
#: room for the longest name bound in the directory: the server binds
#: ".warm-<12 hex>.sock.<pid, up to 7 digits>.tmp" and renames it to "warm-<12 hex>.sock"
_NAME_ROOM = 35


def _candidates(environ: Mapping[str, str]) -> list[str]:
    """Where the socket directory may be, best first.

    `UKC_WARM_DIR` alone when set. Otherwise the login session's runtime directory, then a
    per-user name in the temp directory, then the user's cache directory: the temp name is
    the one another local user can take first, and the cache is under the user's home where
    nobody else can create it.
    """
    configured = environ.get("UKC_WARM_DIR")
    if configured:
        # absolute: the server, started with "/" as its directory, binds this very path
        return [os.path.abspath(configured)]
    found = []
    runtime = environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime):
        found.append(os.path.join(runtime, "ukc"))
    tmp = environ.get("TMPDIR", "")
    found.append(os.path.join(tmp if os.path.isabs(tmp) else "/tmp", f"ukc-{os.getuid()}"))
    home = environ.get("HOME", "")
    cache = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(cache):
        cache = os.path.join(home, ".cache") if os.path.isabs(home) else ""
    if cache:
        found.append(os.path.join(cache, "ukc", "warm"))
    return found


def _refusal(base: str) -> str | None:
    """Why `base` cannot hold our socket (None: it is ours alone), creating it 0700."""
    if len(os.fsencode(base)) + 1 + _NAME_ROOM > _SUN_PATH_MAX:
        return "is too long a path for a unix socket"
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        st = os.lstat(base)
    except OSError as err:
        return f"cannot be created ({err.strerror or err})"
    # why: the socket carries the client's environment (tokens included); a directory another
    # user created or can write could hold their listener under our socket's name
    if (st.st_mode & 0o170000) != 0o040000:
        return "is not a directory"
    if st.st_uid != os.getuid():
        return f"belongs to uid {st.st_uid}"
    if st.st_mode & 0o077:
        return f"can be entered by other users (mode {st.st_mode & 0o777:o})"
    return None


def locate(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(the socket directory, created 0700, or None; a warning line when one was refused).

    A refused directory is never used; the next candidate is (see `_candidates`), and the
    warning says which was refused and why: a directory another user took first must not
    silently make every command run cold, nor go unnoticed.
    """
    refused: list[str] = []
    for base in _candidates(environ):
        why = _refusal(base)
        if why is None:
            if not refused:
                return base, ""
            return base, f"ukc: warning: {'; '.join(refused)}; the warm process uses {base}"
        refused.append(f"{base} {why}")
    return None, (
        f"ukc: warning: {'; '.join(refused)}; commands run without the warm process "
        "(set UKC_WARM_DIR to a private directory, or UKC_WARM=0)"
    )


def private_dir(environ: Mapping[str, str]) -> str | None:
    """The socket directory, created 0700; None when no candidate is ours alone."""
    return locate(environ)[0]


def _sha256_hex(data: bytes) -> str:
    if TYPE_CHECKING:
        from hashlib import sha256
    else:
        try:
            from _sha256 import sha256  # built in on 3.11; hashlib would load OpenSSL (~3 ms)
        except ImportError:  # 3.12+ renamed it; hashlib is the slower, always-there way
            from hashlib import sha256
    return sha256(data).hexdigest()


def socket_path(environ: Mapping[str, str] | None = None) -> str | None:
    """This interpreter's and this installation's server socket (None: no safe place)."""
    return locate_socket(environ)[0]


def locate_socket(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(`socket_path`, a warning line when a directory was refused: see `locate`)."""
    base, warning = locate(os.environ if environ is None else environ)
    if base is None:
        return None, warning
    here = os.path.dirname(os.path.abspath(__file__))
    # why not the real path: venvs link to one base interpreter; sys.prefix tells them apart;
    # the host name: a home directory shared between machines holds one socket per machine
    key = _sha256_hex(f"{sys.executable}\0{sys.prefix}\0{here}\0{os.uname().nodename}".encode())
    return os.path.join(base, f"warm-{key[:12]}.sock"), warning


def connect(path: str) -> _socket.socket | None:
    """A connection to the server at `path` if one listens there and runs as us, else None."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(HANDSHAKE_S)
    try:
        sock.connect(str(path))
        if peer_uid(sock) != os.getuid():
            raise OSError("warm server runs as another user")
    except OSError:
        sock.close()
        return None
    return sock


def _dumps(obj: object) -> str:
    """JSON for the request's plain values, as `json.dumps` (ASCII, lone surrogates escaped)
    writes it, without importing `json` (whose decoder imports `re`)."""
    if isinstance(obj, str):
        return str(_json.encode_basestring_ascii(obj))
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, int):
        return str(int(obj))
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(_dumps(v) for v in obj) + "]"
    if isinstance(obj, dict):
        return "{" + ",".join(f"{_dumps(str(k))}:{_dumps(v)}" for k, v in obj.items()) + "}"
    raise TypeError(f"not a plain JSON value: {type(obj).__name__}")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _streams() -> dict[str, list[str | None]]:
    out: dict[str, list[str | None]] = {}
    for name in ("stdin", "stdout", "stderr"):
        stream = getattr(sys, name)
        out[name] = [getattr(stream, "encoding", None), getattr(stream, "errors", None)]
    return out


def run(argv: Sequence[str], path: str | os.PathLike[str]) -> int | None:
    """Run `ukc argv` in the warm server at `path`: its exit code, or None when no server took
    it (none listening, stale, or it failed before the command started: run it here instead).
    """
    sock = connect(os.fspath(path))
    if sock is None:
        return None
    request = {
        "op": "run",
        "argv": list(argv),
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "umask": _umask(),
        "streams": _streams(),
    }
    payload = _dumps(request).encode("ascii")
    try:
        head = _struct.pack(">I", len(payload))
        fds = _struct.pack("3i", 0, 1, 2)
        sock.sendmsg([head], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
        sock.sendall(payload)
        if recv_exact(sock, 1) != b"R":
            raise EOFError("stale (b'S') or refused: nothing ran")
        child, server = _struct.unpack(">ii", recv_exact(sock, 8))
        # why the check: the pids are the server's view; they are ours only if its pid is
        # the one the kernel reports for the socket's peer (no pid namespace in between)
        pidfd = _pidfd(child) if server == peer_pid(sock) else None
        sock.sendall(b"G")
    except (OSError, EOFError):
        sock.close()
        return None
    try:
        return _follow(sock, pidfd)
    finally:
        sock.close()
        if pidfd is not None:
            os.close(pidfd)


def _pidfd(pid: int) -> int | None:
    """A pidfd for the child (it cannot be a recycled pid: the child is waiting for our go)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):  # not Linux >= 5.3: signals go as bytes instead
        return None


def _follow(sock: _socket.socket, pidfd: int | None) -> int:
    """Pass signals on to the running command and wait for its exit code."""
    sock.settimeout(None)
    received: list[int] = []

    def forward(signum: int, _frame: object) -> None:
        received.append(signum)
        if pidfd is not None:
            try:
                _signal.pidfd_send_signal(pidfd, signum)
                return
            except OSError:
                pass  # refused (a seccomp filter...): the byte below still carries it
        try:
            sock.send(bytes([signum]))
        except OSError:
            return  # the command is gone; its exit code (or EOF) follows

    handler: Callable[[int, object], None] = forward
    for sig in FORWARDED:
        _signal.signal(sig, handler)
    try:
        tail = bytearray()
        while len(tail) < 5:
            chunk = sock.recv(5 - len(tail))
            if not chunk:
                break
            tail += chunk
    finally:
        for sig in FORWARDED:
            default = _signal.default_int_handler if sig == _signal.SIGINT else _signal.SIG_DFL
            _signal.signal(sig, default)
    if len(tail) == 5 and tail[:1] == b"X":
        code: int = _struct.unpack(">i", bytes(tail[1:]))[0]
        return code
    if received:
        # the command died of a signal we passed on: die of it too, as it would have here
        _signal.signal(received[-1], _signal.SIG_DFL)
        os.kill(os.getpid(), received[-1])
    sys.stderr.write("ukc: the warm process running this command ended without an exit code\n")
    return 1
