"""Safe YAML loading for spec files: bounded, strict, and with line numbers.

`spec.py` feeds it the bytes of each spec file; it returns, per document, a plain Python
value (dict / list / str / int / float / bool / None / date) and a map from field paths such
as ``("commands", 1, "timeout")`` to 1-based line numbers, so that later validation errors
can point at ``file:line``. Nothing else in `ukc` parses user YAML.

Spec files may come from anywhere (a checkout, a generated directory), so the loader treats
them as hostile until proven small:

* the byte size is capped before decoding, the text must be UTF-8 (a BOM is fine);
* the raw event stream is scanned first, without building anything, to cap nesting depth,
  alias count, the *expanded* node count (aliases counted at their full size, which is what
  defeats "billion laughs" bombs) and the number of documents; recursion only happens after
  the depth is known to be small;
* only then are nodes composed and turned into values, rejecting duplicate keys, non-string
  keys, any tag outside the YAML core set (``!!python/...``, ``!!binary``, local ``!tags``),
  and YAML 1.1 number forms that silently change meaning (``0755`` octal, ``1:30``
  base 60, ``1_000``).

Every failure is a `SpecError` carrying the file and line.
"""

from __future__ import annotations

import datetime
import re
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.events import (
    AliasEvent,
    DocumentStartEvent,
    Event,
    MappingEndEvent,
    MappingStartEvent,
    ScalarEvent,
    SequenceEndEvent,
    SequenceStartEvent,
    StreamEndEvent,
)
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from reconciler.errors import SpecError

__all__ = [
    "DEFAULT_LIMITS",
    "FieldPath",
    "Limits",
    "YamlDocument",
    "format_path",
    "load_yaml_bytes",
    "load_yaml_file",
]

#: A location inside a document: mapping keys and sequence indexes, outermost first.
FieldPath = tuple[str | int, ...]

_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL = (_TAG + t for t in ("str", "int", "float", "bool", "null"))
_TIMESTAMP, _MAP, _SEQ, _MERGE = (_TAG + t for t in ("timestamp", "map", "seq", "merge"))
_SCALAR_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL, _TIMESTAMP})

# YAML 1.1 (PyYAML) reads 0755 as octal 493, 1:30 as 90, 1_000 as 1000 and 0x10 as 16. A
# spec author almost never means that, so only plain decimal survives; the rest must be
# quoted or rewritten.
_PLAIN_INT = re.compile(r"[-+]?(0|[1-9][0-9]{0,17})")
_PLAIN_FLOAT = re.compile(r"[-+]?([0-9]+\.[0-9]*|\.[0-9]+)([eE][-+]?[0-9]{1,3})?")

_BOM = b"\xef\xbb\xbf"

# libyaml scans ~50x faster than the pure-Python parser; both give the same events/marks.
_EventLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(frozen=True)
class Limits:
    """Caps applied to one file before any object is built."""

    max_bytes: int = 1 << 20
    max_depth: int = 64
    max_aliases: int = 100
    max_nodes: int = 100_000
    max_documents: int = 10_000


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class YamlDocument:
    """One YAML document: its value and where each field of it was written."""

    value: object
    #: 1-based line where the document's content starts
    line: int
    #: field path -> 1-based line (of the key for mapping entries, of the item for sequences)
    lines: Mapping[FieldPath, int] = field(default_factory=dict)

    def line_of(self, path: Sequence[str | int]) -> int:
        """Line of `path`, or of its nearest recorded ancestor (e.g. for a missing key)."""
        key = tuple(path)
        while key:
            found = self.lines.get(key)
            if found is not None:
                return found
            key = key[:-1]
        return self.line


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def format_path(path: Sequence[str | int]) -> str:
    """("commands", 1, "timeout") -> "commands[1].timeout"."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            # Keys from a hostile file may hold newlines or escapes: quote them, so an error
            # stays one printable line ("sync['\\n']").
            out += f"[{_show(part)}]"
    return out


def load_yaml_file(
    path: Path,
    *,
    display: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    redact: Sequence[FieldPath] = (),
) -> list[YamlDocument]:
    """Read and load every document of `path`; `display` is the name used in errors.

    Scalars under a path prefix in `redact` are never quoted in error messages (they may be
    secrets typed in the wrong place).
    """
    source = display if display is not None else str(path)
    try:
        with path.open("rb") as fh:
            # why: read one byte past the cap so an oversized file is refused without
            # ever holding more than the cap in memory.
            data = fh.read(limits.max_bytes + 1)
    except OSError as exc:
        raise SpecError(
            f"cannot read file: {str(exc.strerror or exc).lower()}", file=source
        ) from None
    if len(data) > limits.max_bytes:
        raise SpecError(
            f"file is larger than the {limits.max_bytes} byte limit for spec files", file=source
        )
    return load_yaml_bytes(data, source=source, limits=limits, redact=redact)


def load_yaml_bytes(
    data: bytes,
    *,
    source: str,
    limits: Limits = DEFAULT_LIMITS,
    redact: Sequence[FieldPath] = (),
) -> list[YamlDocument]:
    """Load every document of `data` (the content of the file named `source`).

    Empty documents are returned with value None; the caller decides whether to skip them.
    """
    if len(data) > limits.max_bytes:
        raise SpecError(
            f"file is {len(data)} bytes, more than the {limits.max_bytes} byte limit",
            file=source,
        )
    text = _decode(data, source)
    events = _scan(text, source, limits)
    nodes = _compose(events, source)
    return [_Builder(source, redact).document(node) for node in nodes]


def _decode(data: bytes, source: str) -> str:
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise SpecError(
            f"file is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})",
            file=source,
            line=line,
        ) from None


def _yaml_error(exc: yaml.YAMLError, source: str) -> SpecError:
    line: int | None = None
    detail = str(exc)
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        if mark is not None:
            line = mark.line + 1
        detail = exc.problem or exc.context or "invalid YAML"
    elif isinstance(exc, yaml.reader.ReaderError):
        detail = f"unacceptable character #x{exc.character:04x}"
    detail = " ".join(str(detail).split())
    return SpecError(f"invalid YAML: {detail}", file=source, line=line)


def _scan(text: str, source: str, limits: Limits) -> list[Event]:
    """Collect the event stream, stopping at the first cap exceeded.

    Works on events, not nodes, so it never recurses and never expands an alias: the size
    of each anchored node is remembered once and added per alias.
    """
    loader = _EventLoader(text)
    events: list[Event] = []
    append = events.append
    # per open collection: (anchor or None, expanded count when it started)
    open_frames: list[tuple[str | None, int]] = []
    anchor_sizes: dict[str, int] = {}
    expanded = aliases = documents = 0
    max_nodes, max_depth = limits.max_nodes, limits.max_depth
    # Any: the type is dispatched by identity below, which mypy cannot narrow on.
    event: Any = None

    def refuse(message: str) -> SpecError:
        mark = event.start_mark if event is not None else None
        return SpecError(message, file=source, line=mark.line + 1 if mark is not None else None)

    # why: this loop sees every event of a file up to 1 MiB, so it dispatches on the exact
    # type (cheaper than an isinstance chain) and builds error lines only when failing.
    try:
        while True:
            event = loader.get_event()
            if event is None:
                break
            append(event)
            kind = type(event)
            if kind is ScalarEvent:
                expanded += 1
                if event.anchor is not None:
                    anchor_sizes[event.anchor] = 1
            elif kind is MappingStartEvent or kind is SequenceStartEvent:
                expanded += 1
                open_frames.append((event.anchor, expanded - 1))
                if len(open_frames) > max_depth:
                    raise refuse(f"nesting deeper than {max_depth} levels")
            elif kind is MappingEndEvent or kind is SequenceEndEvent:
                anchor, started = open_frames.pop()
                if anchor is not None:
                    anchor_sizes[anchor] = expanded - started
            elif kind is AliasEvent:
                aliases += 1
                if aliases > limits.max_aliases:
                    raise refuse(f"more than {limits.max_aliases} aliases in one file")
                size = anchor_sizes.get(event.anchor or "")
                if size is None:
                    # Either undefined, or pointing at a collection still open (a cycle).
                    raise refuse(
                        f"alias *{_show(event.anchor)} refers to no complete anchored node"
                    )
                expanded += size
            elif kind is DocumentStartEvent:
                documents += 1
                anchor_sizes.clear()
                if documents > limits.max_documents:
                    raise refuse(f"more than {limits.max_documents} documents in one file")
            elif kind is StreamEndEvent:
                break
            if expanded > max_nodes:
                raise refuse(f"more than {max_nodes} nodes once aliases are expanded")
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    finally:
        loader.dispose()
    return events


class _ReplayComposer(Composer, Resolver):
    """PyYAML's composer and standard resolver, fed from already-scanned events."""

    def __init__(self, events: list[Event]) -> None:
        Composer.__init__(self)
        Resolver.__init__(self)
        self._events: deque[Event] = deque(events)

    def check_event(self, *choices: type[Event]) -> bool:
        if not self._events:
            return False
        return not choices or isinstance(self._events[0], choices)

    def peek_event(self) -> Event:
        return self._events[0]

    def get_event(self) -> Event:
        return self._events.popleft()


def _compose(events: list[Event], source: str) -> list[Node]:
    composer = _ReplayComposer(events)
    nodes: list[Node] = []
    try:
        while composer.check_node():
            node = composer.get_node()
            if node is not None:
                nodes.append(node)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, source) from None
    return nodes


class _Builder:
    """Turns composed nodes into plain values, recording a line per field path."""

    def __init__(self, source: str, redact: Sequence[FieldPath] = ()) -> None:
        self.source = source
        self.redact = tuple(tuple(p) for p in redact)
        self.lines: dict[FieldPath, int] = {}
        self._constructor = SafeConstructor()
        # ids of the nodes currently being built: a guard against cyclic graphs
        self._active: set[int] = set()

    def document(self, node: Node) -> YamlDocument:
        line = node.start_mark.line + 1
        self.lines[()] = line
        value = self.build(node, ())
        return YamlDocument(value=value, line=line, lines=self.lines)

    def shown(self, text: str, path: FieldPath) -> str:
        """`text` quoted for a message, or a placeholder under a redacted path."""
        if any(path[: len(prefix)] == prefix for prefix in self.redact):
            return "(value not shown)"
        return _show(text)

    def fail(self, message: str, node: Node, path: FieldPath) -> SpecError:
        return SpecError(
            message,
            file=self.source,
            line=node.start_mark.line + 1,
            field=format_path(path) or None,
        )

    def build(self, node: Node, path: FieldPath) -> object:
        if id(node) in self._active:
            raise self.fail("recursive alias", node, path)
        self._active.add(id(node))
        try:
            if isinstance(node, ScalarNode):
                return self.scalar(node, path)
            if isinstance(node, SequenceNode):
                if node.tag != _SEQ:
                    raise self.fail(f"tag {_show(node.tag)} is not allowed", node, path)
                items: list[object] = []
                for index, item in enumerate(node.value):
                    self.lines[(*path, index)] = item.start_mark.line + 1
                    items.append(self.build(item, (*path, index)))
                return items
            if isinstance(node, MappingNode):
                return self.mapping(node, path)
            raise self.fail("unsupported YAML node", node, path)
        finally:
            self._active.discard(id(node))

    def mapping(self, node: MappingNode, path: FieldPath) -> dict[str, object]:
        if node.tag != _MAP:
            raise self.fail(f"tag {_show(node.tag)} is not allowed", node, path)
        result: dict[str, object] = {}
        merges: list[Node] = []
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merges.append(value_node)
                continue
            key = self.key(key_node, path)
            if key in result:
                raise self.fail(
                    f"duplicate key {_show(key)} (first on line {self.lines[(*path, key)]})",
                    key_node,
                    (*path, key),
                )
            self.lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, (*path, key))
        # YAML merge keys (<<: *base): explicit keys win, then earlier sources over later.
        # why: merge sources are built into a scratch line map, so that only the keys they
        # actually contribute get lines, and explicit keys keep theirs (no rescans: linear).
        for merge in merges:
            sources = merge.value if isinstance(merge, SequenceNode) else [merge]
            for src in sources:
                if not isinstance(src, MappingNode):
                    raise self.fail(
                        "a merge key (<<) needs a mapping or a list of mappings", src, path
                    )
                kept, self.lines = self.lines, {}
                try:
                    merged = self.build(src, path)
                finally:
                    scratch, self.lines = self.lines, kept
                assert isinstance(merged, dict)
                added = [key for key in merged if key not in result]
                for key in added:
                    result[key] = merged[key]
                depth, merged_keys = len(path), set(added)
                for sub_path, line in scratch.items():
                    if len(sub_path) > depth and sub_path[depth] in merged_keys:
                        self.lines[sub_path] = line
        return result

    def key(self, node: Node, path: FieldPath) -> str:
        if not isinstance(node, ScalarNode):
            raise self.fail("mapping keys must be plain strings, not collections", node, path)
        value = self.scalar(node, path)
        if not isinstance(value, str):
            raise self.fail(
                f"mapping key {self.shown(node.value, path)} is read by YAML as {_kind(value)}; "
                "quote it to make it a string",
                node,
                path,
            )
        return value

    def scalar(self, node: ScalarNode, path: FieldPath) -> object:
        tag, text = node.tag, node.value
        if tag not in _SCALAR_TAGS:
            raise self.fail(f"tag {_show(tag)} is not allowed", node, path)
        if tag == _STR:
            return text
        if tag == _NULL:
            return None
        if tag == _BOOL:
            flag = SafeConstructor.bool_values.get(text.lower())
            if flag is None:
                raise self.fail(f"invalid boolean {self.shown(text, path)}", node, path)
            return flag
        if tag == _INT:
            cleaned = text.strip()
            if re.fullmatch(r"[-+]?[1-9][0-9]*", cleaned) and len(cleaned) > 18:
                raise self.fail(
                    f"number {self.shown(text, path)} is too large; quote it for a string",
                    node,
                    path,
                )
            if not _PLAIN_INT.fullmatch(cleaned):
                raise self.fail(
                    f"number {self.shown(text, path)} has a YAML 1.1 meaning (octal, hex, "
                    "base 60 or with _); write it in plain decimal, or quote it for a string",
                    node,
                    path,
                )
            return int(cleaned)
        if tag == _FLOAT:
            cleaned = text.strip()
            if not _PLAIN_FLOAT.fullmatch(cleaned):
                raise self.fail(
                    f"number {self.shown(text, path)} is not a plain decimal; "
                    "quote it for a string",
                    node,
                    path,
                )
            return float(cleaned)
        try:
            stamp: object = self._constructor.construct_yaml_timestamp(node)
        except (ValueError, OverflowError, TypeError):
            raise self.fail(
                f"invalid date {self.shown(text, path)}; quote it for a string", node, path
            ) from None
        return stamp


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, datetime.date):
        return "a date"
    return type(value).__name__


def _show(value: object) -> str:
    text = str(value)
    return repr(text if len(text) <= 40 else text[:37] + "...")
