"""The hostile-input corpus: every entry is refused with a `SpecError`, quickly and cheaply.

Spec files can come from anywhere, so each input is loaded through the real `load_specs`
path; the bound on work is checked as CPU time far below what unbounded work would take,
the bound on memory with tracemalloc.
"""

from __future__ import annotations

import tempfile
import time
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.errors import SpecError
from reconciler.spec.loader import load_specs
from tests.support.specfiles import write

#: CPU-second ceilings that only unbounded work crosses (a 342-byte bomb expanded without the
#: node cap takes minutes): they catch a missing cap, not a slow machine. Bombs, deep nesting
#: and encodings fail in milliseconds; volume entries read up to the node cap (~0.3 s unloaded).
FAST_S = 10.0
VOLUME_S = 30.0


def alias_bomb(levels: int, width: int = 9) -> bytes:
    """The classic "billion laughs": each level is `width` aliases of the level before."""
    lines = [b'a: &a ["lol"' + b',"lol"' * (width - 1) + b"]"]
    for i in range(1, levels):
        name, prev = bytes([97 + i]), bytes([96 + i])
        lines.append(name + b": &" + name + b" [" + b",".join([b"*" + prev] * width) + b"]")
    return b"\n".join(lines) + b"\n"


def refused(tmp_path: Path, data: bytes, within_s: float = FAST_S) -> SpecError:
    path = write(tmp_path / "hostile.yaml", data)
    started = time.process_time()
    with pytest.raises(SpecError) as info:
        load_specs([path], {})
    elapsed = time.process_time() - started
    assert elapsed < within_s, f"took {elapsed:.2f} CPU seconds"
    assert info.value.file == str(path)
    assert "\n" not in str(info.value)
    assert len(str(info.value)) < 2000
    return info.value


CORPUS: dict[str, bytes] = {
    "2 MB scalar": b"name: " + b"x" * 2_000_000 + b"\n",
    "10^5 keys": b"".join(b"k%d: 1\n" % i for i in range(100_000)),
    "10^5 keys, flow": b"{" + b",".join(b"k%d: 1" % i for i in range(100_000)) + b"}",
    "10^5 list items": b"name: a\ncommands: [" + b",".join([b"x"] * 100_000) + b"]\n",
    "many documents": b"--- {}\n" * 20_000,
    "many named documents": b"".join(b"---\nname: s%d\n" % i for i in range(20_000)),
    "latin-1": b"name: caf\xe9\n",
    "utf-16 with bom": "name: a\n".encode("utf-16"),
    "lone surrogate bytes": b"name: \xed\xa0\x80\n",
    "nul byte": b"name: a\x00b\n",
    "tab indentation": b"name: a\nenv:\n\tA: b\n",
    "duplicate key": b"name: a\nimage: x\nname: b\n",
    "name yes": b"name: yes\n",
    "name no": b"name: no\n",
    "env on": b"name: a\nenv: {A: on}\n",
    "key on": b"name: a\non: push\n",
    "octal env": b"name: a\nenv: {MODE: 0755}\n",
    "octal memory": b"name: a\nmemory_mb: 0755\n",
    "sexagesimal ttl": b"name: a\nttl: 1:30\n",
    "python object": b"name: !!python/object:os.system {}\n",
    "python apply": b"name: !!python/object/apply:os.system ['touch /tmp/pwned']\n",
    "python name": b"name: a\nimage: !!python/name:os.system\n",
    "custom tag": b"name: !Ref x\n",
    "binary tag": b"name: a\nimage: !!binary aGVsbG8=\n",
    "unknown field": b"name: a\nimgae: x\n",
    "wrong type list": b"name: [a]\n",
    "wrong type mapping": b"name: a\ncommands: {a: b}\n",
    "top-level list": b"- name: a\n",
    "top-level scalar": b"hello\n",
    "unclosed flow": b"name: [a\n",
    "unclosed quote": b'name: "a\n',
    "recursive alias": b"name: a\nenv: &e {A: *e}\n",
    "undefined alias": b"name: *x\n",
    "merge of a scalar": b"name: a\n<<: 5\n",
    "complex key": b"? [a]\n: b\n",
    "directive junk": b"%YAML 9.9\n--- name: a\n",
}


VOLUME = {"10^5 keys", "10^5 keys, flow", "10^5 list items", "many named documents"}


@pytest.mark.parametrize("name", list(CORPUS))
def test_each_corpus_entry_is_refused_quickly(tmp_path: Path, name: str) -> None:
    refused(tmp_path, CORPUS[name], VOLUME_S if name in VOLUME else FAST_S)


@pytest.mark.parametrize("levels", [6, 7, 8, 9])
def test_alias_bombs_are_refused_fast_and_without_expanding(tmp_path: Path, levels: int) -> None:
    # 9**6 > 100,000: refused by the node cap before anything is built
    tracemalloc.start()
    try:
        err = refused(tmp_path, alias_bomb(levels))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "once aliases are expanded" in str(err)
    assert peak < 5_000_000


def test_a_level_5_bomb_fits_under_the_node_cap_and_is_refused_as_no_session(
    tmp_path: Path,
) -> None:
    # 9**5 = 59,049 nodes: within the cap, so it is built (once), then is not a session
    err = refused(tmp_path, alias_bomb(5), VOLUME_S)
    assert "unknown field" in str(err)


def test_the_342_byte_bomb_is_the_classic_one(tmp_path: Path) -> None:
    data = alias_bomb(9)
    assert len(data) == 342
    assert "100000 nodes" in str(refused(tmp_path, data))


@pytest.mark.parametrize("depth", [65, 500, 5_000, 100_000])
@pytest.mark.parametrize("style", ["flow list", "flow map", "block list"])
def test_deep_nesting_is_refused_without_recursion(tmp_path: Path, depth: int, style: str) -> None:
    if style == "flow list":
        data = b"name: " + b"[" * depth + b"]" * depth
    elif style == "flow map":
        data = b"name: " + b"{a: " * depth + b"}" * depth
    else:
        data = b"name:\n" + b"- " * depth + b"x\n"
    err = refused(tmp_path, data)
    assert "nesting" in str(err)


def test_a_bom_is_not_hostile(tmp_path: Path) -> None:
    path = write(tmp_path / "bom.yaml", b"\xef\xbb\xbfname: a\n")
    assert load_specs([path], {}).names == ("a",)


# --- fuzzing: whatever the bytes, the loader either loads or raises SpecError ---------------

YAMLISH = st.lists(
    st.sampled_from(
        [
            "name",
            "image",
            "metro",
            "directory",
            "commands",
            "sync",
            "back",
            "exclude",
            "env",
            "secret_env",
            "memory_mb",
            "ttl",
            "exec",
            "run",
            "timeout",
            ":",
            ": ",
            " ",
            "  ",
            "\n",
            "\t",
            "- ",
            "-",
            "---",
            "...",
            "&a ",
            "*a",
            "&b ",
            "*b",
            "<<: ",
            "[",
            "]",
            "{",
            "}",
            ",",
            "'",
            '"',
            "?",
            "|",
            ">",
            "#",
            "%",
            "!",
            "!!python/object:x ",
            "!!str ",
            "!!int ",
            "!!binary ",
            "!!set ",
            "!x ",
            "yes",
            "no",
            "on",
            "0755",
            "0x1f",
            "1:30",
            "1_0",
            ".inf",
            "5m",
            "2026-13-45",
            "2026-01-01",
            "~",
            "null",
            "hello",
            "A_B",
            "ssh",
            "http",
            "1024",
            "-1",
            "\\",
            "\x00",
            "\x85",
            "\u2028",
            "\ufeff",
            "é",
            "9" * 30,
        ]
    ),
    max_size=60,
).map("".join)


def _load_bytes(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.yaml"
        path.write_bytes(data)
        try:
            load_specs([path], {})
        except SpecError as exc:
            assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_load_or_raise_spec_error(data: bytes) -> None:
    _load_bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(YAMLISH)
def test_random_yaml_ish_text_only_ever_loads_or_raises_spec_error(text: str) -> None:
    _load_bytes(text.encode("utf-8", "surrogatepass"))


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
        ),
        max_leaves=20,
    )
)
def test_random_structures_under_spec_keys_only_ever_load_or_raise_spec_error(
    value: object,
) -> None:
    import json

    # JSON is YAML: any structure, placed under every key of the contract.
    for key in ("name", "commands", "sync", "env", "secret_env", "ttl", "memory_mb", "exec"):
        doc = {"name": "a", key: value}
        _load_bytes(json.dumps(doc).encode())


def test_a_key_with_a_newline_still_gives_a_one_line_error(tmp_path: Path) -> None:
    # Regression: Hypothesis found `{"\n": None}` under `sync` printed a two-line field path.
    path = tmp_path / "s.yaml"
    path.write_text('name: x\nsync:\n  "\\n": null\n')
    with pytest.raises(SpecError) as info:
        load_specs([path], {})
    message = str(info.value)
    assert "\n" not in message and "sync['\\n']" in message
