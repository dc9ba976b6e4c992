"""The remote helper's start: what it loads, and how its frame codec treats bad input."""

from __future__ import annotations

import json
import struct
import subprocess

import pytest

from reconciler.sync.helper_src import HELPER_SOURCE
from tests.sync.conftest import REMOTE_PYTHON

#: the helper without its final `main()` call: definitions only, for probing
BODY = HELPER_SOURCE.rsplit("\nmain()\n", 1)[0]


def probe(code: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [REMOTE_PYTHON, "-E", "-S", "-c", BODY + "\n" + code],
        input=stdin,
        capture_output=True,
        timeout=30,
    )


def frame(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


def test_the_helper_starts_without_importing_json_re_or_threading() -> None:
    mods = '("json", "re", "threading", "queue")'
    out = probe(f"print(sorted(m for m in {mods} if m in sys.modules))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == b"[]"


@pytest.mark.parametrize(
    "value",
    [
        {"op": "put", "path": 'a/b\udcff\u00e9 "q"\\', "size": 12345678901234567890, "x": None},
        {"ok": True, "no": False, "list": [[], {}, -1, ""]},
    ],
)
def test_the_frame_codec_agrees_with_the_json_module(value: object) -> None:
    text = json.dumps(value, separators=(",", ":"))
    out = probe(
        "v = JLOADS(sys.stdin.read())\n"
        "sys.stdout.write(JDUMPS(v) + '\\n' + repr(v == JLOADS(JDUMPS(v))))",
        text.encode("ascii"),
    )
    assert out.returncode == 0, out.stderr
    dumped, same = out.stdout.decode("ascii").split("\n")
    assert dumped == text
    assert same == "True"


@pytest.mark.parametrize("raw", [b"", b"{", b'{"op":"sync"} x', b"NaN", b'{"a":NaN}', b"[1,]"])
def test_a_malformed_frame_stops_the_helper_with_an_error(raw: bytes) -> None:
    out = probe("main()", frame(raw))
    assert out.returncode != 0
    assert b"Error" in out.stderr
