"""The user-facing session spec: strict models, loading from files, and spec identity.

The CLI (`ukc apply/plan/delete/validate`) calls `load_specs(paths, environ)` with the files or
directories the user named and the controller's environment; the planner, executor and
status writer read the resulting `SpecSet` of `LoadedSession`s. `spec_hash` gives the
identity that goes into the owner tags; `resolve_secret_env` reads secret values from the
controller's environment at the last moment, so they are never part of a spec, a hash or a
file.

Parsing is delegated to `yamlsafe` (bounded, strict, with line numbers); this module turns
each document into a frozen pydantic model and every problem into a one-line `SpecError`
naming ``file:line: field``. YAML 1.1 surprises (``name: no`` is False, ``PORT: 8080`` is
an int) are errors with a "quote it" hint, never silent coercions.
"""

from __future__ import annotations

import datetime
import difflib
import hashlib
import json
import re
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from reconciler import endpoints
from reconciler.durations import Duration, DurationError, parse_duration
from reconciler.errors import SpecError
from reconciler.sizes import SizeError, parse_size
from reconciler.sync.options import (
    DEFAULT_BACK_MAX_BYTES,
    DEFAULT_BACK_MAX_FILES,
    DEFAULT_BACK_MAX_REFUSED,
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_TIMEOUT_S,
)
from reconciler.yamlsafe import FieldPath, YamlDocument, format_path, load_yaml_file

__all__ = [
    "DEFAULT_COMMAND_TIMEOUT",
    "DEFAULT_LOCAL_IMAGE",
    "CommandSpec",
    "LoadedSession",
    "SessionSpec",
    "SpecDuration",
    "SpecSet",
    "SpecSize",
    "SyncSpec",
    "load_spec_file",
    "load_specs",
    "resolve_secret_env",
    "spec_hash",
]

#: image used on the local metro when neither the spec nor $UKC_SANDBOX_IMAGE names one
DEFAULT_LOCAL_IMAGE = "ukc/local-sandbox:latest"
DEFAULT_COMMAND_TIMEOUT = Duration(30 * 60)
SPEC_SUFFIXES = (".yaml", ".yml")
MAX_NAME_LEN = 50  # the instance name adds "ukc-<project8>-" in front: 63 - 14 = 49, rounded

_DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
_METRO_CODE = re.compile(r"[a-z]{2,5}[0-9]?")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_COMMAND_NAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _fail(message: str, *, at: Sequence[str | int] = ()) -> PydanticCustomError:
    """A validation error with a ready message; `at` extends the error's location so the
    line points at the offending entry rather than at the list holding it."""
    if at:
        return PydanticCustomError("ukc", message, {"at": list(at)})
    return PydanticCustomError("ukc", message)


def _show(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")


def _check_session_name(value: str) -> str:
    if len(value) > MAX_NAME_LEN:
        raise _fail(f"name is {len(value)} characters, the limit is {MAX_NAME_LEN}")
    if not _DNS_LABEL.fullmatch(value):
        raise _fail(
            f"must be a lowercase DNS label (a-z, 0-9 and '-', starting and ending with a "
            f"letter or digit), got {_show(value)}"
        )
    return value


def _check_command_name(value: str) -> str:
    if len(value) > 63 or not _COMMAND_NAME.fullmatch(value):
        raise _fail(
            f"must be 1-63 letters, digits, '.', '_' or '-' (starting and ending with a letter "
            f"or digit), got {_show(value)}"
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
        raise _fail(f"must be an image reference without spaces, got {_show(value)}")
    return value


def _check_metro(value: str) -> str:
    if value == "local" or _METRO_CODE.fullmatch(value):
        return value
    if value.startswith(("http://", "https://")):
        if re.search(r"[\s\x00-\x1f\x7f]", value):
            raise _fail(f"metro url contains spaces or control characters: {_show(value)}")
        parts = urllib.parse.urlsplit(value)
        # why: credentials in the URL would end up in logs, status files and tags.
        if "@" in parts.netloc:
            raise _fail("metro url must not contain credentials; use UKC_TOKEN")
        if not parts.hostname:
            raise _fail(f"metro url has no host: {_show(value)}")
        if parts.query or parts.fragment:
            raise _fail(f"metro url must not have a query or fragment: {_show(value)}")
        return value
    raise _fail(f"must be 'local', a metro code like 'fra', or an http(s) url, got {_show(value)}")


def _check_directory(value: str) -> str:
    if not value:
        raise _fail("directory is empty; use '.' for the spec file's directory")
    if _CONTROL.search(value):
        raise _fail(f"directory contains control characters: {_show(value)}")
    return value


def _check_env_name(value: str) -> str:
    if not _ENV_NAME.fullmatch(value):
        raise _fail(f"{_show(value)} is not a valid environment variable name")
    return value


def _check_secret_source(value: str) -> str:
    # why: a value that is not a variable name is most likely the secret itself, pasted in
    # the wrong place; it must not be echoed into an error message.
    if not _ENV_NAME.fullmatch(value):
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
        raise _fail(f"exclude rule contains control characters: {_show(value)}")
    return value


def _check_back(value: str) -> str:
    if not value:
        raise _fail("path is empty")
    if _CONTROL.search(value):
        raise _fail(f"path contains control characters: {_show(value)}")
    if value.startswith("/"):
        raise _fail(f"path must be relative to /workspace, got {_show(value)}")
    parts = [p for p in value.split("/") if p not in ("", ".")]
    if ".." in value.split("/"):
        raise _fail(f"path must not contain '..', got {_show(value)}")
    if not parts:
        raise _fail(f"path must name something inside /workspace, got {_show(value)}")
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


class CommandSpec(BaseModel):
    """One command, run by `sh -c` in /workspace; in YAML a plain string or a mapping."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Strict(), AfterValidator(_check_command_name)]
    run: Annotated[str, Strict(), AfterValidator(_check_run)]
    timeout: SpecDuration = DEFAULT_COMMAND_TIMEOUT


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

    @field_validator("exclude", "back", mode="before")
    @classmethod
    def _null_is_empty(cls, value: object) -> object:
        return () if value is None else value


class SessionSpec(BaseModel):
    """One session as declared by the user (the fixed user contract of issue 3).

    `image` and `metro` are already defaulted from the environment by the loader;
    `directory` is kept as written (the resolved path is on `LoadedSession`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Strict(), AfterValidator(_check_session_name)]
    image: Annotated[str, Strict(), AfterValidator(_check_image)]
    metro: Annotated[str, Strict(), AfterValidator(_check_metro)] = "local"
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
    exec: Literal["ssh", "http"] = "ssh"

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

    @field_validator("sync", "env", "secret_env", mode="before")
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


@dataclass(frozen=True)
class LoadedSession:
    """A validated session and where it came from."""

    spec: SessionSpec
    #: the spec file, as reached from the path the user gave
    file: Path
    #: 1-based line where the session's document starts
    line: int
    #: directory the status file belongs to: the directory given, or the file's directory
    base_dir: Path
    #: `spec.directory` resolved against the spec file's directory (may not exist yet)
    directory: Path

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class SpecSet:
    """Every session of one `ukc` invocation, in file then document order."""

    sessions: tuple[LoadedSession, ...] = ()
    #: the spec files read (also those holding no session)
    files: tuple[Path, ...] = ()

    def __iter__(self) -> Iterator[LoadedSession]:
        return iter(self.sessions)

    def __len__(self) -> int:
        return len(self.sessions)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.sessions)

    def get(self, name: str) -> LoadedSession | None:
        for session in self.sessions:
            if session.name == name:
                return session
        return None


#: `sync` fields that came after the first spec hashes were made (left out at their default)
_SYNC_ADDED_LATER = (
    "back_delete",
    "back_max_bytes",
    "back_max_files",
    "back_max_refused",
    "timeout",
    "idle_timeout",
)
_SYNC_DEFAULTS = SyncSpec().model_dump(mode="json")


def spec_hash(spec: SessionSpec) -> str:
    """sha256 hex of the spec's canonical JSON (durations as seconds, keys sorted).

    Nothing secret is in it: `secret_env` only holds variable names.
    """
    data = spec.model_dump(mode="json")
    # why: a field added later is left out at its default, so upgrading ukc keeps every
    # existing spec's hash (an expired session stays deleted until its spec really changes)
    for name in _SYNC_ADDED_LATER:
        if data["sync"][name] == _SYNC_DEFAULTS[name]:
            del data["sync"][name]
    if not spec.allow_directory_outside_spec_dir:
        del data["allow_directory_outside_spec_dir"]
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


def load_specs(paths: Sequence[Path], environ: Mapping[str, str]) -> SpecSet:
    """Load every session from `paths` (spec files, or directories of `*.yaml`/`*.yml`).

    Directories are read non-recursively, sorted, skipping hidden files (and so `.ukc/`).
    A directory without spec files gives an empty `SpecSet`: the caller decides whether
    that is an error. Raises the first file's `SpecError`, or one naming both places of a
    session name declared twice.
    """
    files: list[tuple[Path, Path]] = []  # (file, base_dir)
    seen: set[Path] = set()
    for path in paths:
        for file, base_dir in _spec_files(path):
            key = _real(file)
            if key not in seen:
                seen.add(key)
                files.append((file, base_dir))
    sessions: list[LoadedSession] = []
    by_name: dict[str, LoadedSession] = {}
    for file, base_dir in files:
        for session in load_spec_file(file, environ, base_dir=base_dir):
            first = by_name.get(session.name)
            if first is not None:
                raise SpecError(
                    f"session name {session.name!r} is declared twice: at {first.where} "
                    f"and at {session.where}",
                    file=str(session.file),
                    line=session.line,
                    field="name",
                )
            by_name[session.name] = session
            sessions.append(session)
    return SpecSet(sessions=tuple(sessions), files=tuple(f for f, _ in files))


def load_spec_file(
    file: Path, environ: Mapping[str, str], *, base_dir: Path | None = None
) -> list[LoadedSession]:
    """Every session of one spec file (empty documents skipped).

    All problems of the file are collected and raised as one `SpecError` at the first.
    """
    source = str(file)
    documents = load_yaml_file(file, display=source, redact=_REDACTED)
    base = _absolute(base_dir if base_dir is not None else file.parent, source)
    spec_dir = _absolute(file.parent, source)
    sessions: list[LoadedSession] = []
    problems: list[tuple[int, str | None, str]] = []
    for doc in documents:
        if doc.value is None:
            continue
        try:
            spec = _build(doc, environ)
        except _DocumentError as exc:
            problems.extend(exc.problems)
            continue
        directory = _absolute(spec_dir / spec.directory, source)
        if not spec.allow_directory_outside_spec_dir and not directory.is_relative_to(spec_dir):
            problems.append(
                (
                    doc.line_of(("directory",)),
                    "directory",
                    f"{_show(spec.directory)} resolves to {str(directory)!r}, outside the "
                    f"spec file's directory {str(spec_dir)!r} (symlinks followed): a "
                    "session's directory is sent to the sandbox and sync.back writes into "
                    "it; keep it inside, or opt in with allow_directory_outside_spec_dir: true",
                )
            )
            continue
        sessions.append(
            LoadedSession(spec=spec, file=file, line=doc.line, base_dir=base, directory=directory)
        )
    if problems:
        raise _combine(problems, source)
    return sessions


# --- internals -----------------------------------------------------------------------------

#: paths whose values may be secrets typed in the wrong place: never quoted in errors
_REDACTED: tuple[FieldPath, ...] = (("secret_env",),)

_Problem = tuple[int, str | None, str]  # (line, field, message)


class _DocumentError(Exception):
    def __init__(self, problems: list[_Problem]) -> None:
        super().__init__(f"{len(problems)} problems")
        self.problems = problems


def _spec_files(path: Path) -> list[tuple[Path, Path]]:
    try:
        if path.is_dir():
            found = sorted(
                p
                for p in path.iterdir()
                if p.suffix in SPEC_SUFFIXES and not p.name.startswith(".") and p.is_file()
            )
            return [(p, path) for p in found]
        if path.is_file():
            return [(path, path.parent)]
    except OSError as exc:
        raise SpecError(
            f"cannot read: {str(exc.strerror or exc).lower()}", file=str(path)
        ) from None
    raise SpecError("no such spec file or directory", file=str(path))


def _real(path: Path) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _absolute(path: Path, source: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as exc:
        raise SpecError(f"cannot resolve directory {str(path)!r}: {exc}", file=source) from None


def _build(doc: YamlDocument, environ: Mapping[str, str]) -> SessionSpec:
    if not isinstance(doc.value, dict):
        kind = "a list" if isinstance(doc.value, list) else _kind(doc.value)
        raise _DocumentError(
            [(doc.line, None, f"a session document must be a mapping of keys, got {kind}")]
        )
    data: dict[str, Any] = dict(doc.value)
    from_env: dict[str, str] = {}
    if "metro" not in data:
        metro = environ.get("UKC_METRO") or ""
        if metro:
            from_env["metro"] = "UKC_METRO"
        data["metro"] = metro or "local"
    if "image" not in data:
        image = environ.get("UKC_SANDBOX_IMAGE") or ""
        if image:
            from_env["image"] = "UKC_SANDBOX_IMAGE"
            data["image"] = image
        elif data["metro"] == "local" or not _valid_metro(data["metro"]):
            # why: an invalid metro is reported by validation; no second error about images.
            data["image"] = DEFAULT_LOCAL_IMAGE
        else:
            raise _DocumentError(
                [
                    (
                        doc.line,
                        "image",
                        f"no image for metro {_show(data['metro'])}: set image in the spec "
                        "or UKC_SANDBOX_IMAGE in the environment",
                    )
                ]
            )
    try:
        spec = SessionSpec.model_validate(data)
    except ValidationError as exc:
        problems = [_translate(err, doc, from_env) for err in exc.errors()]
        raise _DocumentError(problems) from None
    if spec.metro != "local":
        # why: a spec file is not trusted with the token; refused here so that validate,
        # plan and apply all stop at the spec's line (the metro registry enforces it again)
        try:
            endpoints.resolve(spec.metro, environ)
        except endpoints.EndpointRefusedError as exc:
            message = str(exc)
            if "metro" in from_env:
                message += " (from $UKC_METRO)"
            raise _DocumentError([(doc.line_of(("metro",)), "metro", message)]) from None
    return spec


def _valid_metro(value: object) -> bool:
    try:
        return isinstance(value, str) and bool(_check_metro(value))
    except PydanticCustomError:
        return False


_FIELDS: dict[str, tuple[str, ...]] = {
    "session": tuple(SessionSpec.model_fields),
    "command": tuple(CommandSpec.model_fields),
    "sync": tuple(SyncSpec.model_fields),
}


def _translate(err: ErrorDetails, doc: YamlDocument, from_env: Mapping[str, str]) -> _Problem:
    """One pydantic error -> (line, field path, one-line lowercase message)."""
    loc = err["loc"]
    is_key = bool(loc) and loc[-1] == "[key]"
    path: FieldPath = tuple(p for p in loc if p != "[key]")
    at = err.get("ctx", {}).get("at") if err["type"] == "ukc" else None
    if isinstance(at, list):
        path = (*path, *(p for p in at if isinstance(p, str | int)))
    line = doc.line_of(path)
    field = format_path(path) or None
    kind = err["type"]
    value = err.get("input")
    if not is_key and any(path[: len(p)] == p for p in _REDACTED) and len(path) > 1:
        value = _Redacted(value)
    if kind == "ukc":
        message = err["msg"]
        if is_key:
            message = f"invalid variable name: {message}"
    elif kind == "missing":
        message = "required field is missing"
    elif kind == "extra_forbidden":
        allowed = _FIELDS["session"]
        if len(path) == 3 and path[0] == "commands":
            allowed = _FIELDS["command"]
        elif len(path) == 2 and path[0] == "sync":
            allowed = _FIELDS["sync"]
        name = str(path[-1]) if path else ""
        close = difflib.get_close_matches(name, allowed, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; allowed: {', '.join(allowed)}"
        message = f"unknown field {_show(name)}{hint}"
    elif kind == "string_type":
        message = f"expected a string, got {_kind(value)}"
        if isinstance(value, _Redacted):
            message += "; secret_env values are names of controller environment variables"
        elif isinstance(value, bool | int | float) or _is_date(value):
            message += f"; quote it ({_quoted_hint(value)})"
    elif kind == "int_type":
        message = f"expected a whole number, got {_kind(value)}"
    elif kind == "bool_type":
        message = f"expected true or false, got {_kind(value)}"
    elif kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        message = (
            f"must be {expected}, got {_show(value) if isinstance(value, str) else _kind(value)}"
        )
    elif kind in ("dict_type", "model_type", "model_attributes_type"):
        message = f"expected a mapping, got {_kind(value)}"
    elif kind in ("tuple_type", "list_type"):
        message = f"expected a list, got {_kind(value)}"
    else:
        message = err["msg"][:1].lower() + err["msg"][1:]
    if path and len(path) == 1 and path[0] in from_env:
        message += f" (from ${from_env[str(path[0])]})"
    return (line, field, " ".join(message.split()))


class _Redacted:
    """Stands for an input that must not be shown; only its kind survives."""

    def __init__(self, value: object) -> None:
        self.kind = _kind(value).split(" (")[0]

    def __str__(self) -> str:
        return "(value not shown)"


def _quoted_hint(value: object) -> str:
    if isinstance(value, bool):
        return "yes/no/on/off/true/false are booleans in YAML"
    if _is_date(value):
        return "YAML reads it as a date"
    return f'write "{value}"'


def _is_date(value: object) -> bool:
    return isinstance(value, datetime.date)


def _kind(value: object) -> str:
    if isinstance(value, _Redacted):
        return value.kind
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if value is None:
        return "an empty value (null)"
    if isinstance(value, int):
        return f"a number ({value})"
    if isinstance(value, float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    if _is_date(value):
        return "a date"
    return type(value).__name__


def _combine(problems: list[_Problem], source: str) -> SpecError:
    problems = sorted(problems, key=lambda p: p[0])
    line, field, message = problems[0]
    if len(problems) > 1:
        shown = [f"line {ln}{' ' + f if f else ''}: {msg}" for ln, f, msg in problems[1:6]]
        more = f"; and {len(problems) - 6} more" if len(problems) > 6 else ""
        message += f" (and {len(problems) - 1} more problem(s): {'; '.join(shown)}{more})"
    return SpecError(message, file=source, line=line, field=field)
