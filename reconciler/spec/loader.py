"""Spec files → validated sessions: `load_specs` and the translation of every problem.

Parsing is delegated to `yamlsafe` (bounded, strict, with line numbers); this module turns
each document into a frozen `SessionSpec` and every problem into a one-line `SpecError`
naming ``file:line: field``. YAML 1.1 surprises (``name: no`` is False, ``PORT: 8080`` is
an int) are errors with a "quote it" hint, never silent coercions. A metro the token routing
rule refuses (`spec.endpoints`) is reported at the spec's line.
"""

from __future__ import annotations

import datetime
import difflib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError

from reconciler.errors import SpecError
from reconciler.spec import endpoints
from reconciler.spec.models import (
    DEFAULT_LOCAL_IMAGE,
    CommandSpec,
    SessionSpec,
    SyncSpec,
    check_metro,
    show,
)
from reconciler.spec.yamlsafe import FieldPath, YamlDocument, format_path, load_yaml_file

__all__ = ["LoadedSession", "SpecSet", "load_spec_file", "load_specs"]

SPEC_SUFFIXES = (".yaml", ".yml")


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
    #: line of each field path of the document, for problems found after loading
    lines: Mapping[FieldPath, int] = dataclass_field(
        default_factory=dict, repr=False, compare=False
    )

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    def where_of(self, *path: str | int) -> str:
        """`file:line: field` of a field (or of its nearest ancestor present in the file)."""
        key = tuple(path)
        while key and key not in self.lines:
            key = key[:-1]
        return f"{self.file}:{self.lines.get(key, self.line)}: {format_path(path)}"


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
                    f"{show(spec.directory)} resolves to {str(directory)!r}, outside the "
                    f"spec file's directory {str(spec_dir)!r} (symlinks followed): a "
                    "session's directory is sent to the sandbox and sync.back writes into "
                    "it; keep it inside, or opt in with allow_directory_outside_spec_dir: true",
                )
            )
            continue
        sessions.append(
            LoadedSession(
                spec=spec,
                file=file,
                line=doc.line,
                base_dir=base,
                directory=directory,
                lines=doc.lines,
            )
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
                        f"no image for metro {show(data['metro'])}: set image in the spec "
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
        return isinstance(value, str) and bool(check_metro(value))
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
        message = f"unknown field {show(name)}{hint}"
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
            f"must be {expected}, got {show(value) if isinstance(value, str) else _kind(value)}"
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
