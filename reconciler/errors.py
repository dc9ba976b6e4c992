"""The one error tree of `ukc`.

Every error the controller raises on purpose is a `UkcError`; its `str()` is one line that
names the object and gives the numbers, and never contains a secret (tokens, secret env
values, private keys). The CLI prints that line and maps the class to an exit code.

    UkcError
    ├── SpecError                 user input is invalid (file, line, field); exit 2, never retried
    ├── UsageError                bad command-line usage; exit 2
    ├── LockedError               another applier holds the status file lock
    ├── OwnershipError            an instance ukc cannot prove it owns is in the way; untouched
    ├── BackendError              talking to the cloud or a sandbox failed; `retryable` says if
    │   ├── ApiError              the platform answered with an error (HTTP status, item code)
    │   │   ├── AuthError         401/403: wrong or missing token
    │   │   ├── NotFoundError     item code 8 / empty list
    │   │   ├── AlreadyExistsError item code 23 / 409
    │   │   └── RateLimitedError  429 (retry_after seconds when the server said so)
    │   ├── TransportError        connection refused/reset, TLS, timeouts (retryable)
    │   ├── BootFailedError       the instance stopped while booting (stop reason and code named)
    │   └── RemoteError           the sandbox side misbehaved (a command channel, the exec API)
    │       ├── KeyRejectedError  the sandbox still refused our key after the boot grace period
    │       └── MissingToolError  the image lacks a program ukc needs inside it (named)
    ├── SandboxNotReadyError      the sandbox did not accept its transport in time (a TimeoutError)
    ├── SyncError                 the sync engine refused or failed
    │   ├── SyncHaltedError       a safety guard tripped (missing/emptied root); nothing deleted
    │   ├── HostileEntryError     the sandbox sent a path we refuse to write
    │   ├── SyncStalledError      the sync helper stalled, or the sync outlived `sync.timeout`
    │   └── SyncLimitError        a sync-back stopped at one of its `sync.back_max_*` caps
    ├── CommandFailedError        a session command exited non-zero or timed out
    ├── LocalMetroError           the embedded local metro could not start or answer
    ├── SourceError               the followed git repository could not be fetched or read
    └── ConvergenceError          apply did not converge within its round cap
"""

from __future__ import annotations

__all__ = [
    "MALFORMED_JSON",
    "AlreadyExistsError",
    "ApiError",
    "AuthError",
    "BackendError",
    "BootFailedError",
    "CommandFailedError",
    "ConvergenceError",
    "HostileEntryError",
    "KeyRejectedError",
    "LocalMetroError",
    "LockedError",
    "MissingToolError",
    "NotFoundError",
    "OwnershipError",
    "QuotaError",
    "RateLimitedError",
    "RemoteError",
    "SandboxNotReadyError",
    "SourceError",
    "SpecError",
    "SyncError",
    "SyncHaltedError",
    "SyncLimitError",
    "SyncStalledError",
    "TransportError",
    "UkcError",
    "UsageError",
]


#: what decoding JSON that a sandbox (or any peer not trusted) sent may raise: bad bytes or
#: syntax (ValueError, UnicodeDecodeError among them), or nesting deeper than the decoder's
#: stack (50 KB of "[" is enough), which must not end the whole run as an internal error
MALFORMED_JSON = (ValueError, RecursionError)


class UkcError(Exception):
    """Base of every deliberate `ukc` error; `str()` is one secret-free line."""

    exit_code: int = 1


class SpecError(UkcError):
    """A spec file is invalid. Carries where, so the message can point at it."""

    exit_code = 2

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        line: int | None = None,
        field: str | None = None,
    ) -> None:
        self.file = file
        self.line = line
        self.field = field
        self.reason = message
        where = file or "<spec>"
        if line is not None:
            where += f":{line}"
        if field:
            where += f": {field}"
        super().__init__(f"{where}: {message}")


class UsageError(UkcError):
    """The command line asks for something impossible."""

    exit_code = 2


class LockedError(UkcError):
    """Another applier holds the lock on the same status file."""


class OwnershipError(UkcError):
    """An instance under our name is not provably ours: nothing was done to it."""


class BackendError(UkcError):
    """Talking to a backend failed. `retryable` carries the retry semantics in the value."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ApiError(BackendError):
    """The platform API answered with an error."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        self.status = status
        self.code = code
        if retryable is None:
            retryable = status is not None and (status == 429 or status >= 500)
        super().__init__(message, retryable=retryable)


class AuthError(ApiError):
    """401/403: the token is missing, wrong or revoked."""


class NotFoundError(ApiError):
    """The referenced object does not exist (item code 8 or an empty list)."""


class AlreadyExistsError(ApiError):
    """The name is taken (item code 23 or HTTP 409)."""


class RateLimitedError(ApiError):
    """429. `retry_after` is the server's hint in seconds, when it gave one."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, status=429, retryable=True)
        self.retry_after = retry_after


class TransportError(BackendError):
    """Connection refused/reset, TLS failure, timeout: worth retrying."""

    retryable = True


class BootFailedError(BackendError):
    """The instance stopped before it ran (a missing image, out of memory, a crash): what the
    platform's stop reason and code say, instead of waiting out a boot deadline."""


class RemoteError(BackendError):
    """The sandbox side failed or sent something we do not accept."""


class KeyRejectedError(RemoteError):
    """The sandbox refused the session's key for longer than a booting sshd may need."""


class MissingToolError(RemoteError):
    """The sandbox's image lacks a program ukc needs inside it; `tool` names it."""

    def __init__(self, message: str, *, tool: str) -> None:
        super().__init__(message, retryable=False)
        self.tool = tool


class SandboxNotReadyError(UkcError, TimeoutError):
    """The sandbox did not accept its transport's connection within the readiness deadline."""


class SyncError(UkcError):
    """The sync engine failed."""


class SyncHaltedError(SyncError):
    """A safety guard tripped; the sync stopped before deleting anything."""


class HostileEntryError(SyncError):
    """The sandbox offered an entry we refuse to write locally."""


class SyncStalledError(SyncError):
    """The sync helper sent or read nothing for `sync.idle_timeout`, or the push or pull
    outlived `sync.timeout`; the helper was stopped. Not retried: a stalled sandbox stays so."""


class SyncLimitError(SyncError):
    """A sync-back stopped early: a `sync.back_max_*` cap was reached, or the sandbox broke
    its stream. What was written stays; no remote deletion was mirrored."""


class CommandFailedError(UkcError):
    """A session command exited non-zero or timed out."""

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.command_exit_code = exit_code


class StoppedByUserError(UkcError):
    """Ctrl-C stopped the work: a command in flight was stopped, nothing new started."""

    exit_code = 130


class LocalMetroError(UkcError):
    """The embedded local metro could not be started or did not answer."""


class SourceError(UkcError):
    """The followed git repository could not be fetched or checked out (never names the
    credentials a URL carries)."""


class QuotaError(UkcError):
    """What an apply would create exceeds what the account's quota leaves (checked before
    anything is created); names the figures."""


class ConvergenceError(UkcError):
    """Apply kept finding work after its round cap."""

    def __init__(self, message: str, *, rounds: int) -> None:
        super().__init__(message)
        self.rounds = rounds
