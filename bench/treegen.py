"""The baseline benchmark's test tree, generated the same way (same seed → same bytes).

2,000 text-like files of 1–16 KiB in up to 4-level nested dirs + 5 incompressible 8 MiB files
(59.5 MB), and the same "10 files changed" edit (8 small files edited, 1 touched, 1 big file
patched by 64 KiB) as ../shared/bench/rsync_baseline.sh, so figures compare with it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

MTIME = 1577836800  # 2020-01-01, fixed so runs are comparable


def gen_tree(
    root: Path, seed: int = 1234, n_small: int = 2000, n_big: int = 5, big_mib: int = 8
) -> int:
    """Write the tree under `root`; return its total size in bytes."""
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
        for _ in range(800)
    ]
    dirs = [""]
    for i in range(60):
        parent = rng.choice(dirs)
        if parent.count("/") >= 3:
            parent = ""
        dirs.append(f"{parent}/d{i:02d}" if parent else f"d{i:02d}")
    total = 0
    for i in range(n_small):
        d = rng.choice(dirs)
        size = rng.randint(1024, 16 * 1024)
        text: list[str] = []
        n = 0
        while n < size:
            w = rng.choice(words) + (" " if rng.random() < 0.9 else "\n")
            text.append(w)
            n += len(w)
        data = "".join(text).encode()[:size]
        p = root / d / f"f{i:04d}.txt"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
        os.utime(p, (MTIME, MTIME))
        total += size
    (root / "big").mkdir(parents=True, exist_ok=True)
    for i in range(n_big):
        p = root / "big" / f"blob{i}.bin"
        p.write_bytes(rng.randbytes(big_mib * 1024 * 1024))
        os.utime(p, (MTIME, MTIME))
        total += big_mib * 1024 * 1024
    return total


def modify_tree(root: Path, seed: int = 1234) -> None:
    """8 small files rewritten in place + appended, 1 touched, 1 big file patched (64 KiB)."""
    rng = random.Random(seed + 1)
    small = sorted(
        os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs if f.endswith(".txt")
    )
    pick = rng.sample(small, 9)
    for p in pick[:8]:
        with open(p, "r+b") as f:
            f.seek(rng.randint(0, 512))
            f.write(b"EDITED-%d " % rng.randint(0, 10**6))
        with open(p, "ab") as f:
            f.write(b"appended line\n")
    now = time.time()
    os.utime(pick[8], (now, now))
    bigs = sorted((root / "big").iterdir())
    if bigs:
        with open(bigs[0], "r+b") as f:
            f.seek(4 * 1024 * 1024)
            f.write(rng.randbytes(64 * 1024))


SCALE_SEED = 4242


def gen_scale_tree(
    root: Path,
    n_files: int = 100_000,
    n_dirs: int = 1000,
    seed: int = SCALE_SEED,
    min_size: int = 200,
    max_size: int = 2000,
) -> int:
    """The scale bench's tree: `n_files` text-like files of `min_size`-`max_size` bytes spread
    evenly over `n_dirs` directories (`d000/f000000.txt` ...); returns the content bytes.

    100,000 files of 0.2-2 KB in 1,000 directories is ~110 MB of content and ~395 MB on disk
    (one 4 KiB block per file). Seeded: the same arguments give the same bytes and names.
    """
    rng = random.Random(seed)
    words = [
        "".join(rng.choice("abcdefghijklmnopqrstuvwxyz_") for _ in range(rng.randint(2, 10)))
        for _ in range(800)
    ]
    # why a pool: drawing words per file costs ~10 s for 100,000 files; slices of one seeded
    # text are as compressible (rsync -z) and take a fraction of that
    pool = " ".join(rng.choice(words) for _ in range(400_000)).encode()
    n_dirs = max(1, min(n_dirs, n_files))
    width = max(3, len(str(n_dirs - 1)))
    total = 0
    for d in range(n_dirs):
        (root / f"d{d:0{width}d}").mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        size = rng.randint(min_size, max_size)
        start = rng.randrange(0, len(pool) - size)
        p = root / f"d{i % n_dirs:0{width}d}" / f"f{i:06d}.txt"
        with open(p, "wb") as f:
            f.write(pool[start : start + size])
        os.utime(p, (MTIME, MTIME))
        total += size
    return total


def scale_files(root: Path) -> list[str]:
    """The relative paths of a scale tree's files, sorted (what `edit_one` picks from)."""
    return sorted(
        os.path.relpath(os.path.join(dp, f), root) for dp, _, fs in os.walk(root) for f in fs
    )


def edit_one(root: Path, files: list[str], k: int, tag: str = "") -> tuple[str, bytes]:
    """Rewrite one file of the tree (the k-th pick of a seeded sequence) with new content of a
    similar size and a fresh mtime; returns its relative path and its new bytes."""
    rng = random.Random(f"{SCALE_SEED}-{tag}-{k}")
    rel = files[rng.randrange(len(files))]
    body = f"edited {tag} {k} {time.time_ns()}\n".encode() + rng.randbytes(300).hex().encode()
    with open(root / rel, "wb") as f:
        f.write(body)
    return rel, body


def edit_and_wait(tree: Path, remote: Path, k: int, files: int, label: str = "") -> float:
    """Write edit `k` into `tree`; milliseconds until its bytes are in the sandbox's copy
    (`remote`): the content itself, not an acknowledgement."""
    name = f"f{k % files:04d}.txt"
    content = f"edit {k} {time.time()}\n".encode()
    t0 = time.perf_counter()
    (tree / name).write_bytes(content)
    target = remote / name
    while True:
        try:
            if target.read_bytes() == content:
                break
        except FileNotFoundError:
            pass
        if time.perf_counter() - t0 > 10:
            raise SystemExit(f"{label}edit {k} did not arrive within 10 s")
        time.sleep(0.001)
    return (time.perf_counter() - t0) * 1000


def start_watch(home: Path, files: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`ukc watch` of a session `live` over `files` small files in `home`/tree."""
    tree = home / "tree"
    tree.mkdir(parents=True)
    for i in range(files):
        (tree / f"f{i:04d}.txt").write_text(f"file {i}\n" * 50)
    (home / "s.yaml").write_text("name: live\ndirectory: ./tree\n")
    return subprocess.Popen(
        [sys.executable, "-m", "reconciler", "watch", "s.yaml"],
        cwd=home,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
