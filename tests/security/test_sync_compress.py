"""Attacks on `sync.compress` by a sandbox that replaced its sync helper (or python3).

With compression on, the helper's output is deflate segments after its hello's answer. A few
hundred KiB of deflate inflate to gigabytes, so the client must inflate only as far as what it
reads asks for, and never believe a helper that compresses when it was not asked to. Each
attack runs the real engine against a stand-in interpreter (`tests.support.hostile_helper`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import RemoteError
from reconciler.sync.options import SyncOptions
from reconciler.sync.pull import pull
from reconciler.transport.local_shell import LocalShell
from tests.support.hostile_helper import fake_python, run_in_child

#: a hello answer that says the helper compresses from here on, then 512 MiB of zeros as one
#: deflate segment (~0.5 MB on the wire)
_BOMB = """
    import zlib
    frame({"boot_id": "b", "fresh": False, "has_record": False, "record": None, "z": True})
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    zero = bytes(1 << 20)
    body = b"".join(c.compress(zero) for _ in range(512)) + c.flush(zlib.Z_SYNC_FLUSH)
    OUT.write(struct.pack(">BI", 1, len(body)) + body)
    flush()
    time.sleep(60)
"""


@pytest.fixture
def base(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "local" / "out").mkdir(parents=True)
    (tmp_path / "local" / "a.txt").write_text("a")
    yield tmp_path


def _opts(base: Path, body: str, **kw: Any) -> dict[str, Any]:
    """Options for `run_in_child` (paths as strings); `_options` makes them `SyncOptions`."""
    args: dict[str, Any] = {
        "local_root": str(base / "local"),
        "state_dir": str(base / "state"),
        "back": ["out/"],
        "remote_python": fake_python(base / "sandbox-bin", body),
        "session": "victim",
        "compress": True,
        "idle_timeout_s": 20.0,
    }
    args.update(kw)
    return args


def _options(base: Path, body: str, **kw: Any) -> SyncOptions:
    args = _opts(base, body, **kw)
    return SyncOptions(
        **{
            **args,
            "local_root": Path(args["local_root"]),
            "state_dir": Path(args["state_dir"]),
            "back": tuple(args["back"]),
        }
    )


@pytest.mark.parametrize("kind", ["pull", "push"])
def test_a_deflate_bomb_from_the_sandbox_is_inflated_only_as_far_as_a_frame_needs(
    base: Path, kind: str
) -> None:
    # without the bound, the first read inflated all it read of the segment: +129 MiB
    out = run_in_child(kind, _opts(base, _BOMB), limits={"RLIMIT_AS": 3 << 30}, timeout=120)
    assert out.get("error", "").startswith("RemoteError: sync helper sent a malformed 0-byte"), out
    grown = out["peak_mib"] - out["before_mib"]
    assert grown < 32, f"peak RSS grew by {grown:.0f} MiB"


def test_a_helper_that_compresses_unasked_is_read_as_plain_frames(base: Path) -> None:
    # compression off: its `z` is not believed, the plain entries that follow are read
    body = """
        frame({"boot_id": "b", "fresh": False, "has_record": False, "record": None, "z": True})
        entry("out/r.txt", size=5)
        chunk(b"hello")
        end_file()
        frame({"end": True, "errors": 0, "missing": []})
        flush()
    """
    shell = LocalShell()
    try:
        result = pull(shell, _options(base, body, compress=False))
    finally:
        shell.close()
    assert result.files_written == 1
    assert (base / "local" / "out" / "r.txt").read_bytes() == b"hello"


@pytest.mark.parametrize(
    "segment",
    [
        'struct.pack(">BI", 7, 3) + b"abc"',  # a kind that does not exist
        'struct.pack(">BI", 1, 6) + b"\\xff" * 6',  # not deflate
        # a deflate stream that ends (final block): nothing may follow it
        'struct.pack(">BI", 1, 2) + b"\\x03\\x00"',
    ],
)
def test_a_malformed_compressed_stream_ends_the_sync_back_with_a_clear_error(
    base: Path, segment: str
) -> None:
    body = f"""
        frame({{"boot_id": "b", "fresh": False, "has_record": False, "record": None, "z": True}})
        OUT.write({segment})
        flush()
        time.sleep(60)
    """
    shell = LocalShell()
    try:
        with pytest.raises(RemoteError, match="malformed compressed stream"):
            pull(shell, _options(base, body))
    finally:
        shell.close()
