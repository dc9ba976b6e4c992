"""The JSON Schema of one session document, generated from the spec models.

Editors (yaml-language-server and others) use it for completion and early errors; `ukc
validate` stays the judge (the models check more than a schema can say: durations, sizes,
paths, the token routing rule). The models describe a session after the loader's
conveniences, so the schema adds what users may write before them: `image` may be left out
(the environment or the local default fills it in), a command may be a plain string or a
mapping without `name`, and an empty `env:` or `sync:` (YAML null) means empty.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic.json_schema import GenerateJsonSchema

from reconciler.spec.durations import Duration
from reconciler.spec.models import EXEC_NAMES, MAX_NAME_LEN, SessionSpec

__all__ = ["SCHEMA_DIALECT", "session_schema"]

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

#: what `ukc validate` calls a session name (a lowercase DNS label)
_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
#: fields where YAML null (`env:` with nothing after it) is read as empty
_NULL_IS_EMPTY = ("commands", "sync", "env", "secret_env")
_NULL_IS_EMPTY_SYNC = ("exclude", "back")


class _Generator(GenerateJsonSchema):
    def encode_default(self, dft: Any) -> Any:
        # why: a duration default is shown as users write it ("30m"), which the field accepts
        if isinstance(dft, Duration):
            return str(dft)
        return super().encode_default(dft)


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    keep = {k: v for k, v in prop.items() if k in ("title", "default", "description")}
    body = {k: v for k, v in prop.items() if k not in keep}
    return {**keep, "anyOf": [body, {"type": "null"}]}


def session_schema() -> dict[str, Any]:
    """The schema of one YAML document of a spec file (a file may hold several, `---`)."""
    generated = SessionSpec.model_json_schema(schema_generator=_Generator)
    schema = copy.deepcopy(generated)
    props: dict[str, Any] = schema["properties"]
    defs: dict[str, Any] = schema["$defs"]

    schema["required"] = ["name"]  # image: defaulted by the loader
    props["name"].update(pattern=_NAME_PATTERN, maxLength=MAX_NAME_LEN)
    props["exec"]["enum"] = list(EXEC_NAMES)
    command = defs["CommandSpec"]
    command["required"] = ["run"]  # named "cmd-N" by position when left out
    props["commands"]["items"] = {"anyOf": [{"type": "string"}, {"$ref": "#/$defs/CommandSpec"}]}
    for name in _NULL_IS_EMPTY:
        props[name] = _nullable(props[name])
    sync_props = defs["SyncSpec"]["properties"]
    for name in _NULL_IS_EMPTY_SYNC:
        sync_props[name] = _nullable(sync_props[name])

    return {
        "$schema": SCHEMA_DIALECT,
        "title": "ukc session",
        **{k: v for k, v in schema.items() if k != "title"},
    }
