"""The session spec as users write it: strict, frozen pydantic models, and the spec's identity.

Each field's validator turns a bad value into a one-line message; the loader (`spec.loader`)
adds the file, line and field. `spec_hash` is the identity that goes into the owner tags;
`resolve_secret_env` reads secret values from the controller's environment at the last moment,
so they are never part of a spec, a hash or a file.
"""

from __future__ import annotations

import hashlib
import json
import re
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Annotated

import pathspec
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from reconciler._util.names import is_dns_label, is_env_name, metro_kind, unknown_metro_message
from reconciler.errors import SpecError
from reconciler.spec import endpoints
from reconciler.spec.defaults import (
    DEFAULT_BACK_MAX_BYTES,
    DEFAULT_BACK_MAX_FILES,
    DEFAULT_BACK_MAX_REFUSED,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
)
from reconciler.spec.durations import Duration, DurationError, parse_duration
from reconciler.spec.sizes import SizeError, parse_size

__all__ = [
    "AUTOKILL_OFF",
    "DEFAULT_AUTOKILL",
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_EXEC",
    "DEFAULT_LOCAL_IMAGE",
    "DEFAULT_MEMORY_MB",
    "DEFAULT_SHELL",
    "EXEC_NAMES",
    "CommandSpec",
    "SessionSpec",
    "SpecDuration",
    "SpecSize",
    "SyncSpec",
    "WorkspaceSpec",
    "check_metro",
    "missing_secret_env",
    "resolve_secret_env",
    "show",
    "spec_hash",
]

#: the transports a session may choose (`exec`), each the module `reconciler.transport.<name>`:
#: ssh, http (the image's unauthenticated exec API on public port 443 runs the commands), or
#: plugin (the platform's token-authenticated sandbox plugin API: no public port at all)
EXEC_NAMES = ("ssh", "http", "plugin")
#: the transport of a spec that names none
DEFAULT_EXEC = "ssh"
#: memory an instance is created with when the spec gives no `memory_mb` (the original
#: workflow's; /workspace lives in the instance's memory, UKC's own default is 128)
DEFAULT_MEMORY_MB = 4096
#: image used on the local metro when neither the spec nor $UKC_SANDBOX_IMAGE names one
DEFAULT_LOCAL_IMAGE = "ukc/local-sandbox:latest"
DEFAULT_COMMAND_TIMEOUT = Duration(30 * 60)
#: the shell commands run under (`shell`); POSIX `sh`, which is dash on Debian images
DEFAULT_SHELL = "sh"
MAX_NAME_LEN = 50  # the instance name adds "ukc-<project8>-" in front: 63 - 14 = 49, rounded

_COMMAND_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# why so narrow: the shell's name is spliced into the launch line in the sandbox; a bare
# name (looked up in PATH) or an absolute path of plain characters needs no quoting at all
_SHELL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_SHELL_PATH = re.compile(r"(/[A-Za-z0-9._+-]{1,64}){1,16}")


def _fail(message: str, *, at: Sequence[str | int] = ()) -> PydanticCustomError:
    """A validation error with a ready message; `at` extends the error's location so the
    line points at the offending entry rather than at the list holding it."""
    if at:
        return PydanticCustomError("ukc", message, {"at": list(at)})
    return PydanticCustomError("ukc", message)


def show(value: object) -> str:
    """A user value quoted for a message, cut at 40 characters."""
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _check_session_name(value: str) -> str:
    if len(value) > MAX_NAME_LEN:
        raise _fail(f"name is {len(value)} characters, the limit is {MAX_NAME_LEN}")
    if not is_dns_label(value):
        raise _fail(
            f"must be a lowercase DNS label (a-z, 0-9 and '-', starting and ending with a "
            f"letter or digit), got {show(value)}"
        )
    return value


def _check_command_name(value: str) -> str:
    if len(value) > 63 or not _COMMAND_NAME.fullmatch(value):
        raise _fail(
            f"must be 1-63 letters, digits, '.', '_' or '-' (starting and ending with a letter "
            f"or digit), got {show(value)}"
        )
    return value


def _check_run(value: str) -> str:
    if not value.strip():
        raise _fail("command is empty")
    if "\x00" in value:
        raise _fail("command contains a NUL character")
    return value


def _check_image(value: str) -> str:
    if not value or len(value) > 512 or re.search(r"[\s\x00-\x1f\x7f]", value):
        raise _fail(f"must be an image reference without spaces, got {show(value)}")
    return value


def check_metro(value: str) -> str:
    kind = metro_kind(value)
    if kind in ("local", "code"):
        return value
    if kind == "url":
        if re.search(r"[\s\x00-\x1f\x7f]", value):
            raise _fail(f"metro url contains spaces or control characters: {show(value)}")
        parts = urllib.parse.urlsplit(value)
        # why: credentials in the URL would end up in logs, status files and tags.
        if "@" in parts.netloc:
            raise _fail("metro url must not contain credentials; use UKC_TOKEN")
        if not parts.hostname:
            raise _fail(f"metro url has no host: {show(value)}")
        if parts.query or parts.fragment:
            raise _fail(f"metro url must not have a query or fragment: {show(value)}")
        return value
    unknown = unknown_metro_message(value)
    if unknown is not None:
        raise _fail(unknown)
    raise _fail(f"must be 'local', a metro code like 'fra', or an http(s) url, got {show(value)}")


def _check_directory(value: str) -> str:
    if not value:
        raise _fail("directory is empty; use '.' for the spec file's directory")
    if _CONTROL.search(value):
        raise _fail(f"directory contains control characters: {show(value)}")
    return value


def _check_env_name(value: str) -> str:
    if not is_env_name(value):
        raise _fail(f"{show(value)} is not a valid environment variable name")
    return value


def _check_secret_source(value: str) -> str:
    # why: a value that is not a variable name is most likely the secret itself, pasted in
    # the wrong place; it must not be echoed into an error message.
    if not is_env_name(value):
        raise _fail(
            "must be the name of a controller environment variable holding the secret, "
            "not the secret itself (value not shown)"
        )
    if value in endpoints.CREDENTIAL_VARS:
        # why: a spec file is not trusted with ukc's credentials; forwarding one into a
        # sandbox hands it to whatever the image and commands do with it
        raise _fail(
            f"{value} is ukc's own credential and cannot be forwarded into a sandbox; if the "
            "sandbox really needs it, export it under another name and name that"
        )
    return value


def _check_exec(value: str) -> str:
    if value not in EXEC_NAMES:
        *first, last = map(repr, EXEC_NAMES)
        raise _fail(f"must be {', '.join(first)} or {last}, got {show(value)}")
    return value


def _check_shell(value: str) -> str:
    if _SHELL_NAME.fullmatch(value) or (
        _SHELL_PATH.fullmatch(value) and ".." not in value.split("/") and len(value) <= 256
    ):
        return value
    raise _fail(
        "must be a shell's name (bash, sh, zsh; letters, digits, '.', '_', '+', '-') or its "
        f"absolute path (/bin/bash), without spaces or arguments, got {show(value)}"
    )


def _check_input(value: str) -> str:
    if not value.strip():
        raise _fail("input pattern is empty")
    if _CONTROL.search(value):
        raise _fail(f"input pattern contains control characters: {show(value)}")
    if ".." in value.lstrip("!").split("/"):
        # why: patterns match paths inside `directory`; one reaching out matches nothing
        raise _fail(f"input pattern must not contain '..', got {show(value)}")
    try:
        pathspec.GitIgnoreSpec.from_lines([value])
    except (ValueError, TypeError) as exc:
        raise _fail(f"not a gitignore pattern ({exc}): {show(value)}") from None
    return value


def _check_env_value(value: str) -> str:
    if "\x00" in value:
        raise _fail("value contains a NUL character")
    return value


def _check_memory(value: int) -> int:
    if not 16 <= value <= 8192:
        raise _fail(f"must be between 16 and 8192 (MiB), got {value}")
    return value


def _check_exclude(value: str) -> str:
    if not value.strip():
        raise _fail("exclude rule is empty")
    if _CONTROL.search(value):
        raise _fail(f"exclude rule contains control characters: {show(value)}")
    return value


def _check_back(value: str) -> str:
    if not value:
        raise _fail("path is empty")
    if _CONTROL.search(value):
        raise _fail(f"path contains control characters: {show(value)}")
    if value.startswith("/"):
        raise _fail(f"path must be relative to /workspace, got {show(value)}")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in value.split("/"):
        raise _fail(f"path must not contain '..', got {show(value)}")
    if not parts:
        raise _fail(f"path must name something inside /workspace, got {show(value)}")
    return value


def _to_duration(value: object) -> Duration:
    if isinstance(value, Duration):
        return value
    try:
        return parse_duration(value)
    except DurationError as exc:
        raise _fail(str(exc)) from None


#: A duration field: "90s", "5m", "1h30m", "1d" or whole seconds; serialized as seconds.
SpecDuration = Annotated[
    Duration,
    PlainValidator(_to_duration, json_schema_input_type=str | int),
    PlainSerializer(int, return_type=int),
]


def _to_size(value: object) -> int:
    try:
        return parse_size(value)
    except SizeError as exc:
        raise _fail(str(exc)) from None


#: A size field: "512MiB", "2GiB", "1.5GB" or whole bytes; serialized as bytes.
SpecSize = Annotated[
    int,
    PlainValidator(_to_size, json_schema_input_type=str | int),
    PlainSerializer(int, return_type=int),
]

#: `autokill` of a spec that names none (and has no shorter `ttl`): the platform deletes an
#: instance that has been down (stopped, or idle in standby) a whole day
DEFAULT_AUTOKILL = Duration(24 * 3600)
#: the word that turns autokill off (YAML 1.1 also reads a bare `off` as false)
AUTOKILL_OFF = "off"


def _to_autokill(value: object) -> Duration | str:
    if value is False or value == AUTOKILL_OFF:
        return AUTOKILL_OFF
    if value is True:
        raise _fail("must be a duration ('1d', '30m') or off, got true")
    return _to_duration(value)


def _show_autokill(value: Duration | str) -> int | str:
    return value if isinstance(value, str) else int(value)


#: `autokill`: a duration (serialized as seconds) or "off".
SpecAutokill = Annotated[
    Duration | str,
    PlainValidator(_to_autokill, json_schema_input_type=str | int | bool),
    PlainSerializer(_show_autokill, return_type=int | str),
]

#: counts users write (sync caps): whole numbers up to a billion
_MAX_COUNT = 1_000_000_000


def _check_count(value: int) -> int:
    if not 1 <= value <= _MAX_COUNT:
        raise _fail(f"must be a whole number from 1 to {_MAX_COUNT:,}, got {value}")
    return value


def _check_refusals(value: int) -> int:
    if not 0 <= value <= _MAX_COUNT:
        raise _fail(f"must be a whole number from 0 to {_MAX_COUNT:,}, got {value}")
    return value


_StrictStr = Annotated[str, Strict()]
_EnvName = Annotated[str, Strict(), AfterValidator(_check_env_name)]
_EnvValue = Annotated[str, Strict(), AfterValidator(_check_env_value)]


_Shell = Annotated[str, Strict(), AfterValidator(_check_shell)]


class CommandSpec(BaseModel):
    """One command, run by `SHELL -lc` in /workspace; in YAML a plain string or a mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Strict(), AfterValidator(_check_command_name)]
    run: Annotated[str, Strict(), AfterValidator(_check_run)]
    timeout: SpecDuration = DEFAULT_COMMAND_TIMEOUT
    #: gitignore patterns naming the synced files the command depends on: it re-runs only
    #: when one of those changed (or its own definition, env or image). None: every synced
    #: file is an input; []: none is (it runs again only when its definition changes)
    inputs: tuple[Annotated[str, Strict(), AfterValidator(_check_input)], ...] | None = None
    #: the shell it runs under; None: the session's
    shell: _Shell | None = None


class SyncSpec(BaseModel):
    """What to leave out of the upload (gitignore rules) and what to bring back."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exclude: tuple[Annotated[str, Strict(), AfterValidator(_check_exclude)], ...] = ()
    back: tuple[Annotated[str, Strict(), AfterValidator(_check_back)], ...] = ()
    #: sync-back also removes local files it brought back that the sandbox deleted (guarded:
    #: see `reconciler.sync.backdelete`); off by default, as deleting user files is opt-in
    back_delete: Annotated[bool, Strict()] = False
    #: caps of one sync-back: the file data it may bring (a size: "16GiB", or bytes), the
    #: entries the sandbox may list (files and directories), the entries it may have refused
    #: or not written (0: stop at the first). A sync-back that reaches one stops there.
    back_max_bytes: SpecSize = DEFAULT_BACK_MAX_BYTES
    back_max_files: Annotated[int, Strict(), AfterValidator(_check_count)] = DEFAULT_BACK_MAX_FILES
    back_max_refused: Annotated[int, Strict(), AfterValidator(_check_refusals)] = (
        DEFAULT_BACK_MAX_REFUSED
    )
    #: the longest one push or one sync-back may take, and the longest the sync helper in
    #: the sandbox may stay silent (or not read) before the sync is stopped
    timeout: SpecDuration = Duration(int(DEFAULT_TIMEOUT_S))
    idle_timeout: SpecDuration = Duration(int(DEFAULT_IDLE_TIMEOUT_S))
    #: deflate file content on the wire, pushes and sync-backs (content that does not shrink
    #: goes as it is): pays on a slow link; off by default, as on a fast one it only costs CPU
    compress: Annotated[bool, Strict()] = False

    @field_validator("exclude", "back", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return () if value is None else value


#: the bounds of a `/workspace` volume (whole MiB on the platform)
MIN_VOLUME_MB = 1
MAX_VOLUME_MB = 65536


def _check_volume(value: int) -> int:
    mib = -(-value // (1 << 20))
    if not MIN_VOLUME_MB <= mib <= MAX_VOLUME_MB:
        raise _fail(f"must be from 1MiB to {MAX_VOLUME_MB // 1024}GiB, got {value} bytes")
    return value


class WorkspaceSpec(BaseModel):
    """Where the session's `/workspace` lives.

    Without a volume it lives in the instance's memory (as on UKC): it shares `memory_mb`
    with everything the commands use and is empty again after a cold boot. `volume` (a size:
    "2GiB") gives it a volume of its own instead, created with the instance and deleted with
    it, that keeps its files across stop/start.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    volume: Annotated[SpecSize, AfterValidator(_check_volume)] | None = None

    @property
    def volume_mb(self) -> int | None:
        """The volume's size in whole MiB (rounded up), or None without one."""
        return None if self.volume is None else -(-self.volume // (1 << 20))


class SessionSpec(BaseModel):
    """One session as declared by the user.

    `image` and `metro` are already defaulted from the environment by the loader;
    `directory` is kept as written (the resolved path is on `LoadedSession`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Strict(), AfterValidator(_check_session_name)]
    image: Annotated[str, Strict(), AfterValidator(_check_image)]
    metro: Annotated[str, Strict(), AfterValidator(check_metro)] = "local"
    directory: Annotated[str, Strict(), AfterValidator(_check_directory)] = "."
    #: `directory` may resolve outside the spec file's directory (it is mirrored into the
    #: sandbox and `sync.back` writes into it, so leaving the spec's tree takes an opt-in)
    allow_directory_outside_spec_dir: Annotated[bool, Strict()] = False
    commands: tuple[CommandSpec, ...] = ()
    sync: SyncSpec = Field(default_factory=SyncSpec)
    env: dict[_EnvName, _EnvValue] = Field(default_factory=dict)
    secret_env: dict[_EnvName, Annotated[str, Strict(), AfterValidator(_check_secret_source)]] = (
        Field(default_factory=dict)
    )
    memory_mb: Annotated[int, Strict(), AfterValidator(_check_memory)] | None = None
    ttl: SpecDuration | None = None
    exec: Annotated[str, Strict(), AfterValidator(_check_exec)] = DEFAULT_EXEC
    #: the shell every command runs under unless it names its own
    shell: _Shell = DEFAULT_SHELL
    workspace: WorkspaceSpec = Field(default_factory=WorkspaceSpec)
    #: the platform deletes the instance once it has been down (stopped, or idle in
    #: standby) this long, even when no ukc ever runs again; unset: `ttl` when shorter, else
    #: a day; `off`: never (then only `ttl` and `ukc delete` end it)
    autokill: SpecAutokill | None = None
    #: a one-shot `ukc apply` that converged suspends the instance (its memory, and so an
    #: in-memory /workspace, kept): idle it costs nothing, and the next apply with work wakes
    #: it. false: it stays up (scale-to-zero still puts a session with a public port to
    #: standby after its cooldown; one with `exec: plugin` runs until deleted)
    suspend: Annotated[bool, Strict()] = True

    @property
    def autokill_s(self) -> int | None:
        """The autokill time the instance is created with (seconds), None when off."""
        if self.autokill == AUTOKILL_OFF:
            return None
        if isinstance(self.autokill, int):
            return int(self.autokill)
        default = int(DEFAULT_AUTOKILL)
        return min(int(self.ttl), default) if self.ttl is not None else default

    @field_validator("commands", mode="before")
    @classmethod
    def _commands_from_yaml(cls, value: object) -> object:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            return value
        out: list[object] = []
        for index, item in enumerate(value):
            # why: an unnamed command is named by its 1-based position ("cmd-2"), as a
            # human counts; the name keys its status record, so give commands a name when
            # they are reordered often.
            if isinstance(item, str):
                out.append({"name": f"cmd-{index + 1}", "run": item})
            elif isinstance(item, dict) and "name" not in item:
                out.append({"name": f"cmd-{index + 1}", **item})
            else:
                out.append(item)
        return out

    @field_validator("commands")
    @classmethod
    def _unique_command_names(cls, value: tuple[CommandSpec, ...]) -> tuple[CommandSpec, ...]:
        seen: dict[str, int] = {}
        for index, command in enumerate(value):
            if command.name in seen:
                raise _fail(
                    f"command name {command.name!r} is used by commands[{seen[command.name]}] "
                    f"and commands[{index}]; names must be unique",
                    at=(index, "name"),
                )
            seen[command.name] = index
        return value

    @field_validator("sync", "env", "secret_env", "workspace", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        if value is None:
            return {}
        return value

    @field_validator("secret_env")
    @classmethod
    def _no_overlap_with_env(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        env = info.data.get("env") or {}
        both = sorted(set(env) & set(value))
        if both:
            raise _fail(f"{', '.join(both)} set in both env and secret_env; keep one", at=both[:1])
        return value


#: the fields the first spec hashes were made of: always hashed. Any field added since is
#: left out while it has its default, so a spec that does not use it keeps the hash it had
#: (the hash decides whether an expired session may come back: upgrading ukc must not). New
#: fields need nothing here; this list only ever shrinks if a field is removed.
_FIRST_HASHED: dict[type[BaseModel], frozenset[str]] = {
    SessionSpec: frozenset(
        {
            "name",
            "image",
            "metro",
            "directory",
            "commands",
            "sync",
            "env",
            "secret_env",
            "memory_mb",
            "ttl",
            "exec",
        }
    ),
    SyncSpec: frozenset({"exclude", "back"}),
    CommandSpec: frozenset({"name", "run", "timeout"}),
}


def _first_hashed(model: BaseModel) -> frozenset[str]:
    for cls in type(model).__mro__:
        if cls in _FIRST_HASHED:
            return _FIRST_HASHED[cls]
    return frozenset()


def _canonical(model: BaseModel) -> dict[str, object]:
    """The model as JSON values, without the later fields that still have their default."""
    dumped = model.model_dump(mode="json")
    first = _first_hashed(model)
    out: dict[str, object] = {}
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        added_later = name not in first and not info.is_required()
        if added_later and value == info.get_default(call_default_factory=True):
            continue
        if isinstance(value, BaseModel):
            out[name] = _canonical(value)
        elif isinstance(value, tuple) and all(isinstance(v, BaseModel) for v in value):
            out[name] = [_canonical(v) for v in value]
        else:
            out[name] = dumped[name]
    return out


def spec_hash(spec: SessionSpec) -> str:
    """sha256 hex of the spec's canonical JSON (durations as seconds, keys sorted).

    Nothing secret is in it: `secret_env` only holds variable names.
    """
    # why remembered: specs are frozen, and a watch re-plans the same loaded spec every pass
    known = _HASHED.get(id(spec))
    if known is not None and known[0] is spec:
        return known[1]
    canonical = json.dumps(
        _canonical(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    if len(_HASHED) >= 256:
        _HASHED.clear()
    _HASHED[id(spec)] = (spec, digest)  # the spec is held: its id is not reused meanwhile
    return digest


_HASHED: dict[int, tuple[SessionSpec, str]] = {}


def missing_secret_env(spec: SessionSpec, environ: Mapping[str, str]) -> list[tuple[str, str]]:
    """(sandbox name, controller name) of each `secret_env` entry whose controller variable
    is not set: only the actions that pass secrets need them (commands)."""
    return [(k, v) for k, v in spec.secret_env.items() if environ.get(v) is None]


def resolve_secret_env(spec: SessionSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The sandbox-side secret variables with their values from the controller's `environ`.

    A missing controller variable is a `SpecError` naming the session and the variable,
    never a value.
    """
    resolved: dict[str, str] = {}
    missing: list[str] = []
    for sandbox_name, controller_name in spec.secret_env.items():
        value = environ.get(controller_name)
        if value is None:
            missing.append(f"{controller_name} (for {sandbox_name})")
        else:
            resolved[sandbox_name] = value
    if missing:
        raise SpecError(
            f"session {spec.name!r} needs controller environment variable(s) "
            f"{', '.join(missing)}, not set",
            field="secret_env",
        )
    return resolved
