"""The remote helper's start: what it loads, its compiled cache, and its frame codec."""

from __future__ import annotations

import json
import marshal
import struct
import subprocess

import pytest

from reconciler.sync.engine import pull, push
from reconciler.sync.remote import _PROGRAM, HelperSession
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


class TestCompiledCache:
    def test_the_first_start_caches_the_compiled_helper_in_the_remote_state_dir(
        self, site: Site
    ) -> None:
        write(site.local / "a.txt", "a")
        push(site.shell, site.opts(), instance_uuid="u1")
        cached = list(site.remote_state.glob("helper-*.bin"))
        assert len(cached) == 1
        assert marshal.loads(cached[0].read_bytes()).co_filename == "ukc-sync"

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
        assert marshal.loads(cached.read_bytes()).co_filename == "ukc-sync"

    @pytest.mark.parametrize("cut", ["nothing", "the docstring", "a statement boundary"])
    def test_a_helper_whose_client_died_while_sending_the_program_caches_nothing(
        self, site: Site, cut: str
    ) -> None:
        # Regression (CI, crash test): a client killed before sending the program left an
        # empty program, which compiled, was cached, and made every later helper in that
        # sandbox exit 0 without a word. A program cut between two statements compiles too.
        from reconciler.sync.remote import helper_command

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
