"""The remote helper's start: what it loads, its compiled cache, and its frame codec."""

from __future__ import annotations

import json
import marshal
import os
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from reconciler.sync.engine import pull, push
from reconciler.sync.remote import (
    _PROGRAM,
    _PROGRAM_ID,
    HelperSession,
    Program,
    bytecode_tag,
    helper_command,
    program,
)
from reconciler.transport.local_shell import LocalShell
from tests.support.synctree import REMOTE_PYTHON, Site, write

#: the helper without its final `main()` call: definitions only, for probing
BODY, _MAIN = _PROGRAM.decode("ascii").rsplit('\nif __name__ == "__main__":\n', 1)


def probe(code: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [REMOTE_PYTHON, "-E", "-S", "-c", BODY + "\n" + code],
        input=stdin,
        capture_output=True,
        timeout=30,
    )


def _other_python() -> str | None:
    """An installed python3 (>= 3.7) whose bytecode differs from ours: a sandbox image with
    another version, which must compile the helper itself."""
    root = Path(os.environ.get("PYENV_ROOT", "/root/.pyenv")) / "versions"
    for python in sorted(root.glob("*/bin/python3"), reverse=True):
        m = re.fullmatch(r"3\.(\d+)\.\d+", python.parent.parent.name)
        if m and int(m[1]) >= 7 and int(m[1]) != sys.version_info[1]:
            return str(python)
    return None


OTHER_PYTHON = _other_python()
needs_other_python = pytest.mark.skipif(OTHER_PYTHON is None, reason="no other python3 here")


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


#: a program whose source and shipped code say which of them ran
SAYS = Program(
    source=b"import sys\nsys.stdout.write('source')\n",
    code=zlib.compress(
        marshal.dumps(compile("import sys\nsys.stdout.write('shipped')\n", "t", "exec"))
    ),
    tag=bytecode_tag(),
)


def run_program(site: Site, prog: Program, payload: bytes | None = None) -> tuple[int, bytes]:
    """Start the bootstrap under this interpreter with `prog`, send `payload` (default: all
    of it), and return its exit code and output."""
    opts = site.opts(remote_python=sys.executable)
    proc = site.shell.start(helper_command(opts, prog=prog))
    proc.write(prog.payload if payload is None else payload)
    proc.close_stdin()
    out = bytearray()
    while chunk := proc.read(1 << 16):
        out += chunk
    return proc.wait(timeout=30), bytes(out)


class TestShippedCode:
    def test_an_interpreter_with_the_controllers_bytecode_identity_runs_the_shipped_code(
        self, site: Site
    ) -> None:
        assert run_program(site, SAYS) == (0, b"shipped")

    def test_an_interpreter_with_another_bytecode_identity_compiles_the_source(
        self, site: Site
    ) -> None:
        other = Program(SAYS.source, SAYS.code, tag="cpython-27-0d0a0d0a")
        assert run_program(site, other) == (0, b"source")

    def test_a_code_object_the_sandbox_cached_still_comes_first(self, site: Site) -> None:
        # as before the shipped code: a sandbox's own cache is one file read
        site.remote_state.mkdir(parents=True)
        cached = compile("import sys\nsys.stdout.write('cached')\n", "t", "exec")
        name = f"helper-{_PROGRAM_ID}-{sys.hexversion:x}.bin"
        (site.remote_state / name).write_bytes(marshal.dumps(cached))
        assert run_program(site, SAYS) == (0, b"cached")

    def test_a_program_sent_without_code_compiles_the_source(self, site: Site) -> None:
        assert run_program(site, Program(SAYS.source, tag=SAYS.tag)) == (0, b"source")

    @pytest.mark.parametrize("code", [b"\xffnot zlib", zlib.compress(b"\xffnot marshal")])
    def test_a_damaged_shipped_code_object_falls_back_to_the_source(
        self, site: Site, code: bytes
    ) -> None:
        assert run_program(site, Program(SAYS.source, code, SAYS.tag)) == (0, b"source")

    def test_the_program_and_a_request_fit_a_pipe_a_sandbox_never_reads(self) -> None:
        # a stand-in (or hostile sandbox) that answers without reading must not block the
        # client before its first request (far below 4 KiB) is written: a pipe holds 64 KiB
        assert len(program().payload) + (4 << 10) <= 64 << 10

    def test_a_shipped_code_object_cut_short_runs_nothing(self, site: Site) -> None:
        code, out = run_program(site, SAYS, SAYS.payload[:-3])
        assert code != 0
        assert out == b""

    def test_a_push_into_a_fresh_sandbox_runs_the_shipped_helper_and_caches_nothing(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "a")
        result = push(site.shell, site.opts(remote_python=sys.executable), instance_uuid="u1")
        assert result.files_sent == 1
        assert (site.remote / "a.txt").read_text() == "a"
        assert list(site.remote_state.glob("helper-*.bin")) == []

    @needs_other_python
    def test_an_image_with_another_python_version_compiles_the_helper_itself(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "a")
        opts = site.opts(remote_python=OTHER_PYTHON)
        assert push(site.shell, opts, instance_uuid="u1").files_sent == 1
        assert (site.remote / "a.txt").read_text() == "a"
        assert len(list(site.remote_state.glob("helper-*.bin"))) == 1


@needs_other_python
class TestCompiledCache:
    """The cache of a sandbox whose python3 cannot run the code the controller compiled."""

    @pytest.fixture(autouse=True)
    def _other_python(self, site: Site) -> None:
        assert OTHER_PYTHON is not None
        site.remote_python = OTHER_PYTHON

    def test_the_first_start_caches_the_compiled_helper_in_the_remote_state_dir(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "a")
        push(site.shell, site.opts(), instance_uuid="u1")
        cached = list(site.remote_state.glob("helper-*.bin"))
        assert len(cached) == 1
        assert cached[0].read_bytes()  # marshalled by another python: not loaded here

    def test_a_corrupted_cache_is_recompiled_and_the_push_still_works(self, site: Site) -> None:
        write(site.local / "a.txt", "a")
        push(site.shell, site.opts(), instance_uuid="u1")
        (cached,) = site.remote_state.glob("helper-*.bin")
        cached.write_bytes(b"\x00garbage")
        write(site.local / "b.txt", "b")
        # another connection: the first push's helper is kept for the next push over its own
        result = push(LocalShell(), site.opts(), instance_uuid="u1")
        assert result.files_sent == 1
        assert (site.remote / "b.txt").read_text() == "b"
        assert cached.read_bytes() != b"\x00garbage"

    @pytest.mark.parametrize("cut", ["nothing", "the docstring", "a statement boundary"])
    def test_a_helper_whose_client_died_while_sending_the_program_caches_nothing(
        self, site: Site, cut: str
    ) -> None:
        # Regression (CI, crash test): a client killed before sending the program left an
        # empty program, which compiled, was cached, and made every later helper in that
        # sandbox exit 0 without a word. A program cut between two statements compiles too.
        sent = {
            "nothing": 0,
            "the docstring": _PROGRAM.index(b'"""\n', 3) + 4,
            "a statement boundary": _PROGRAM.index(b"\nclass Helper"),
        }[cut]
        compile(_PROGRAM[:sent], "cut", "exec")  # the danger: each cut is valid Python
        opts = site.opts()
        proc = site.shell.start(helper_command(opts))
        proc.write(_PROGRAM[:sent])
        proc.close_stdin()
        assert proc.wait(timeout=30) != 0
        assert list(site.remote_state.glob("helper-*.bin")) == []
        write(site.local / "a.txt", "a")
        result = push(site.shell, opts, instance_uuid="u1")
        assert result.files_sent == 1
        assert (site.remote / "a.txt").read_text() == "a"

    def test_a_state_dir_that_cannot_hold_the_cache_only_costs_the_compile(
        self, site: Site
    ) -> None:
        site.remote_state.parent.mkdir(parents=True)
        site.remote_state.write_text("not a directory")
        with HelperSession(site.shell, site.opts()) as s:
            hello = s.call(
                {
                    "op": "hello",
                    "root": str(site.remote),
                    "state_dir": str(site.remote_state),
                    "boot_paths": [str(site.boot)],
                    "uuid": "u1",
                    "digest": "-",
                }
            )
        assert hello["boot_id"] == "boot-1"
        assert hello["has_record"] is False

    def test_a_pull_reads_the_cache_but_never_writes_one(self, site: Site) -> None:
        write(site.remote / "out/r.txt", "r")
        result = pull(site.shell, site.opts(back=("out/",)))
        assert result.files_written == 1
        assert not site.remote_state.exists()
