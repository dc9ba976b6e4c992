#!/usr/bin/env python3
"""ukc against rsync on a 100,000-file tree, side by side on local-metro sandboxes.

    .venv/bin/python bench/scale_bench.py [--files 100000] [--dirs 1000] [--runs 2]
                                          [--edits 10] [--no-watch] [--no-back] [--cold]

Tree (`treegen.gen_scale_tree`, seeded): `--files` files of 0.2-2 KB in `--dirs` directories
(100,000 in 1,000: ~110 MB of content, ~395 MB on disk). Generated once; both sides read the
same tree.

rsync: the original workflow's `rsync -az --delete` through `ssh` with an `openssl s_client`
ProxyCommand, through the metro's TLS edge, into `/workspace` of its own sandbox (created
beforehand through the API, not timed), a fresh process per call.
ukc: the CLI as a user runs it (`ukc apply`, a fresh process forked by the warm process) on a
session whose sandbox was created beforehand by an apply of a one-file tree (not timed).

Phases, per side (each run alternates which side goes first; the second side pays for fresh
memory, so keep --runs even):
  initial    the whole tree into an empty /workspace
  nochange   the same again
  onefile    one file rewritten (`treegen.edit_one`), then one `ukc apply` / one rsync
  watch      ukc only: `ukc watch` running and converged, one file rewritten at a time; the
             time from the write until the new bytes are in the sandbox's /workspace (read on
             the host side of its bind mount), p50/p95 over `--edits`; each edit waits for the
             previous pass to end. `--resync 3600` keeps the periodic resync out of the way.
  back       sync-back of the whole tree into an empty local dir. rsync: `/workspace/` → a
             fresh dir. ukc: the session gets `commands: [cp -a d* out/]` and
             `sync.back: [out/]`; the figure is the status file's `timings.syncback_s` (the
             SyncBack action alone, on the connection the command used); `ukc_back_apply_s`
             is that apply's wall time minus `timings.commands_s`.

`--cold`: every one-shot `ukc apply` runs with `UKC_WARM=0` (a fresh interpreter that imports
everything and has no keeper: the scan loads the index and walks the tree), and two more
phases measure the first commands of a restarted warm process (stopped and started again,
its keeper empty): `restart_nochange` (no change) and `restart_onefile` (one file rewritten),
each beside rsync's no change / one file; and `stale_nochange`: a no-change apply when the
warm process finds its code changed (a source file's mtime moved, as when a checkout is
edited): the launcher runs that apply itself and starts a new warm process, which the RSS sum
of the tree counts too (`_rss_max_mb`: the largest single process). The RSS of a `UKC_WARM=0`
command is its own process's, imports included (~45-55 MB).

Where: `--workdir` holds the tree, both sandboxes' workspaces and the sync-back copies.
Creating 100,000 files is what initial and sync-back measure, and on a filesystem where many
files were recently deleted (ext4 without a journal, e.g. a busy /tmp) inode allocation slows
both tools by 2-5x, unevenly: use a fresh filesystem with room for ~500,000 inodes per run,
e.g. `truncate -s 20G img; mkfs.ext4 -q -N 4000000 img; mount -o loop img /mnt/fs;
--workdir /mnt/fs` (the header names the filesystem). Even on a fresh filesystem both sides
slow down with each run, as the runs before them leave trees behind: `--fresh-fs GB` (root
only) gives every run its own new ext4 without a journal (the root's kind), loop-mounted
(direct I/O) from a sparse image of GB gigabytes in the work dir, holding that run's tree,
metro, warm process and both sandboxes' workspaces; it is unmounted and removed after the
run. Nothing is deleted during a run (ukc's sync-back copy is moved aside): on such a
filesystem the files made next would pay for every inode freed in the minute before.

Prints key=value lines: seconds (medians over runs), ratio_* = ukc / rsync, and for every ukc
phase the peak RSS and CPU of the ukc process tree (`procmeter`: the launcher plus the child
the warm process forked for it, VmHWM sampled every 10 ms; `ukc watch` runs in its own
process). The machine may be shared: compare ratios, not absolutes. The initial phase also
prints each side's CPU: `rsync_initial_cpu_s` (rsync, ssh and openssl), and
`*_initial_sandbox_cpu_s` (the metro's processes meanwhile: its TLS edge, the sandbox's relay,
sshd and the receiver, whose own share is `*_initial_receiver_cpu_s`: rsync's server, ukc's
sync helper); on two cores the sum of a side's CPU is its floor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procmeter import KindCpu, rss_of
from sync_bench import EVEN_RUNS, describe_fs, rsync_cmd, timed, wait_rsync_ready
from treegen import edit_one, gen_scale_tree, scale_files
from ukcenv import UKC, UkcEnv, session_status

import reconciler
from reconciler.cli import warm

SESSION = "scale"


def rsync_side(
    env: UkcEnv, tree: Path, files: list[str], work: Path, k: int, a: argparse.Namespace
) -> dict[str, float]:
    out: dict[str, float] = {}
    rs = work / f"rs{k}"
    rs.mkdir(parents=True)
    key = rs / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"scale-rsync-{k}-{os.getpid()}"
    inst = env.metro.create(name, key.with_suffix(".pub").read_text().strip())
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    dst = f"root@{fqdn}:/workspace/"

    def rsync(src: str, to: str) -> float:
        return timed(rsync_cmd(env.metro, key, fqdn, src, to))

    wait_rsync_ready(env.metro, key, fqdn)
    kinds = KindCpu(env.metro_pid)
    cpu0 = _children_cpu_s()
    out["rsync_initial_s"] = rsync(f"{tree}/", dst)
    # rsync, ssh and openssl, each reaped by its parent: all in the bench's children's time
    out["rsync_initial_cpu_s"] = _children_cpu_s() - cpu0
    out.update(_sandbox_cpu("rsync_initial", kinds.stop(), "command"))
    out["rsync_nochange_s"] = rsync(f"{tree}/", dst)
    edit_one(tree, files, k, "rsync")
    out["rsync_onefile_s"] = rsync(f"{tree}/", dst)
    if not a.no_back:
        out["rsync_back_s"] = rsync(dst, f"{rs / 'back'}/")
    return out


class WatchProc:
    """`ukc watch` in its own process; its output lines, and a wait for the n-th pass."""

    def __init__(self, env: UkcEnv, project: Path) -> None:
        self.proc = subprocess.Popen(
            [*UKC, "watch", "--resync", "3600", "s.yaml"],
            cwd=project,
            env=env.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.passes = 0
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("[watch] pass ") and " done " in line:
                    self.passes += 1
                self._cond.notify_all()

    def wait_passes(self, n: int, timeout_s: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.passes >= n, timeout_s)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(120)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def watch_phase(
    env: UkcEnv, project: Path, tree: Path, files: list[str], remote: Path, a: argparse.Namespace
) -> dict[str, float]:
    out: dict[str, float] = {}
    w = WatchProc(env, project)
    try:
        t0 = time.perf_counter()
        if not w.wait_passes(1, 600):
            raise SystemExit("ukc watch did not finish its first pass in 600 s:\n" + _tail(w))
        out["ukc_watch_first_pass_s"] = time.perf_counter() - t0
        time.sleep(0.5)
        latencies = []
        for k in range(a.edits):
            before = w.passes
            t0 = time.perf_counter()
            rel, body = edit_one(tree, files, k, "watch")
            target = remote / rel
            while True:
                try:
                    if target.read_bytes() == body:
                        break
                except FileNotFoundError:
                    pass
                if time.perf_counter() - t0 > 120:
                    raise SystemExit(f"watch edit {k} did not arrive in 120 s:\n" + _tail(w))
                time.sleep(0.001)
            latencies.append(time.perf_counter() - t0)
            w.wait_passes(before + 1, 120)  # that pass is over: the next edit finds it idle
            time.sleep(0.3)
        latencies.sort()
        out["ukc_watch_p50_s"] = statistics.median(latencies)
        out["ukc_watch_p95_s"] = latencies[max(0, round(0.95 * len(latencies)) - 1)]
        out["ukc_watch_max_s"] = latencies[-1]
        out["ukc_watch_rss_mb"] = rss_of(w.proc.pid).get("VmHWM", 0) / 1024
    finally:
        w.stop()
    return out


def _tail(w: WatchProc) -> str:
    """The watcher's last lines, and any warning it printed earlier (watchdog logs a lost
    inotify queue as a warning)."""
    warned = [line for line in w.lines[:-20] if "warning" in line.lower() or "overflow" in line]
    return "\n".join(warned[-10:] + w.lines[-20:])


def ukc_side(
    env: UkcEnv,
    master: Path,
    files: list[str],
    work: Path,
    k: int,
    a: argparse.Namespace,
    cleanup: list[Any],
) -> dict[str, float]:
    out: dict[str, float] = {}
    proj = work / f"ukc{k}"
    tree = proj / "tree"
    tree.mkdir(parents=True)
    (tree / "seed.txt").write_text("seed\n")
    (proj / "s.yaml").write_text(f"name: {SESSION}\ndirectory: ./tree\n")
    env.ukc(["apply", "s.yaml"], proj)  # creates the sandbox (not timed: rsync had its own)
    cleanup.append(lambda: env.ukc(["delete", "s.yaml"], proj, check=False))
    uuid = session_status(proj, SESSION)["instance"]["uuid"]
    remote = env.state / "workspaces" / uuid
    shutil.rmtree(tree)
    os.rename(master, tree)  # the one generated tree, lent to this project
    try:

        def phase(name: str) -> None:
            os.sync()
            kinds = KindCpu(env.metro_pid) if name == "initial" else None
            m = env.ukc(["apply", "s.yaml"], proj, cold=a.cold)
            out[f"ukc_{name}_s"] = m.elapsed_s
            out[f"ukc_{name}_rss_mb"] = m.rss_peak_mb
            out[f"ukc_{name}_cpu_s"] = m.cpu_s
            if kinds is not None:
                out.update(_sandbox_cpu(f"ukc_{name}", kinds.stop(), "sync-helper"))

        phase("initial")
        phase("nochange")
        rel, body = edit_one(tree, files, k, "ukc")
        phase("onefile")
        if (remote / rel).read_bytes() != body:
            raise SystemExit(f"one-file apply did not bring {rel} to the sandbox")
        if a.cold:
            for what in ("nochange", "onefile"):
                restart_warm(env)
                if what == "onefile":
                    rel, body = edit_one(tree, files, k + 1, "restart")
                os.sync()
                m = env.ukc(["apply", "s.yaml"], proj)
                out[f"ukc_restart_{what}_s"] = m.elapsed_s
                out[f"ukc_restart_{what}_rss_mb"] = m.rss_peak_mb
                out[f"ukc_restart_{what}_cpu_s"] = m.cpu_s
            if (remote / rel).read_bytes() != body:
                raise SystemExit(f"one-file apply did not bring {rel} to the sandbox")
            # the warm process finds its code changed: the launcher runs the apply itself and
            # starts a new warm process, whose imports the tree's RSS sum counts as well
            os.utime(Path(reconciler.__file__))
            m = env.ukc(["apply", "s.yaml"], proj)
            out["ukc_stale_nochange_s"] = m.elapsed_s
            out["ukc_stale_nochange_rss_mb"] = m.rss_peak_mb
            out["ukc_stale_nochange_rss_max_mb"] = m.rss_max_kib / 1024
            out["ukc_stale_nochange_cpu_s"] = m.cpu_s
        if not a.no_watch:
            out.update(watch_phase(env, proj, tree, files, remote, a))
        if not a.no_back:
            (proj / "s.yaml").write_text(
                f"name: {SESSION}\ndirectory: ./tree\n"
                "commands: ['rm -rf out && mkdir out && cp -a d[0-9]* out/']\n"
                "sync:\n  back: [out/]\n"
            )
            os.sync()
            m = env.ukc(["apply", "s.yaml"], proj, cold=a.cold)
            rec = session_status(proj, SESSION)
            timings = rec.get("timings", {})
            out["ukc_back_s"] = float(timings.get("syncback_s", 0.0))
            out["ukc_back_apply_s"] = m.elapsed_s - float(timings.get("commands_s", 0.0))
            out["ukc_back_rss_mb"] = m.rss_peak_mb
            out["ukc_back_cpu_s"] = m.cpu_s
            got = sum(len(fs) for _, _, fs in os.walk(tree / "out"))
            if got != len(files):
                raise SystemExit(f"sync-back brought {got} files, expected {len(files)}")
    finally:
        # moved aside, not deleted: ext4 without a journal skips inodes freed in the last
        # minute (five while their table block is dirty), scanning past each of them for every
        # new file, so 100,000 new files right after 100,000 deletions took 25 s against 4 s
        # (`rsync_back_s` 110-127 s when rsync's sync-back came next)
        if (tree / "out").exists():
            os.rename(tree / "out", proj / "back-out")
        os.rename(tree, master)
    return out


def _children_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _sandbox_cpu(name: str, by_kind: dict[str, float], receiver: str) -> dict[str, float]:
    """The metro's CPU during a phase (its TLS edge, the sandbox's relay, sshd and the
    receiving process: all on the same cores as the client), and the receiver's share."""
    return {
        f"{name}_sandbox_cpu_s": sum(by_kind.values()),
        f"{name}_receiver_cpu_s": by_kind.get(receiver, 0.0),
    }


def restart_warm(env: UkcEnv) -> None:
    """Stop the warm process and start a new one (its keeper knows no tree yet)."""
    warm.request_stop(env.warm_socket)
    deadline = time.monotonic() + 30
    while warm.status(env.warm_socket) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    env.warm_socket = warm.start(env.env)
    env.warm_pid = int((warm.status(env.warm_socket) or {}).get("pid", 0)) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--runs", type=int, default=2, help=EVEN_RUNS)
    ap.add_argument("--edits", type=int, default=10, help="watch edits per run")
    ap.add_argument("--no-watch", action="store_true")
    ap.add_argument("--no-back", action="store_true")
    ap.add_argument(
        "--cold", action="store_true", help="one-shot applies with UKC_WARM=0, and restarts"
    )
    ap.add_argument("--workdir", default=None, help="parent of the work dir (default $TMPDIR)")
    ap.add_argument(
        "--fresh-fs", type=int, default=0, metavar="GB", help="a new ext4 per run (root only)"
    )
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-scale-bench-", dir=a.workdir))
    try:
        if a.fresh_fs:
            runs, size, gen_s, fs = [], 0, 0.0, ""
            for k in range(a.runs):
                with fresh_fs(work / f"fs{k}", a.fresh_fs) as mnt:
                    got, size, gen_s = runs_in(mnt, range(k, k + 1), a)
                    fs = describe_fs(mnt)
                runs += got
        else:
            runs, size, gen_s = runs_in(work, range(a.runs), a)
            fs = describe_fs(work)
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(
            f"# scale_bench runs={a.runs} files={a.files} dirs={a.dirs} bytes={size} "
            f"gen_s={gen_s:.1f} nproc={os.cpu_count()} load={os.getloadavg()[0]:.2f}"
        )
        print(f"# workdir={work} {fs}" + (" (a fresh one per run)" if a.fresh_fs else ""))
        for key in sorted(med):
            print(f"{key}={med[key]:.3f}")
        for what in ("initial", "nochange", "onefile", "back"):
            if f"rsync_{what}_s" in med and f"ukc_{what}_s" in med:
                print(f"ratio_{what}={med[f'ukc_{what}_s'] / med[f'rsync_{what}_s']:.2f}")
        for what in ("restart_nochange", "restart_onefile", "stale_nochange"):
            if f"ukc_{what}_s" in med:
                ratio = med[f"ukc_{what}_s"] / med[f"rsync_{what.split('_')[1]}_s"]
                print(f"ratio_{what}={ratio:.2f}")
        if "ukc_watch_p50_s" in med:
            print(f"watch_p50_ms={med['ukc_watch_p50_s'] * 1000:.1f}")
            print(f"watch_p95_ms={med['ukc_watch_p95_s'] * 1000:.1f}")
        # (the stale apply's sum counts the warm process it starts: see its _rss_max_mb)
        rss = [v for key, v in med.items() if key.endswith("_rss_mb") and "stale" not in key]
        print(f"rss_peak_mb_max={max(rss):.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def runs_in(
    work: Path, ks: range, a: argparse.Namespace
) -> tuple[list[dict[str, float]], int, float]:
    """Runs `ks` in `work`: one tree (seeded), one metro, one warm process for all of them."""
    env = UkcEnv(work)
    cleanup: list[Any] = []
    try:
        master = work / "tree"
        t0 = time.perf_counter()
        size = gen_scale_tree(master, a.files, a.dirs)
        gen_s = time.perf_counter() - t0
        files = scale_files(master)
        runs = [sides(env, master, files, work, k, a, cleanup) for k in ks]
        for step in cleanup:
            step()
        return runs, size, gen_s
    finally:
        env.close()


@contextlib.contextmanager
def fresh_fs(mnt: Path, gb: int) -> Iterator[Path]:
    """A new ext4 without a journal (as the root here) at `mnt`, from a sparse image.

    why `lazy_itable_init=0`: otherwise the kernel zeroes the inode tables in the background
    after the mount, writing behind whichever side runs first.
    """
    img = mnt.with_suffix(".img")
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(gb << 30)
    subprocess.run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-O",
            "^has_journal",
            "-N",
            "1000000",
            "-E",
            "lazy_itable_init=0",
            str(img),
        ],
        check=True,
    )
    # why direct I/O: a plain loop device caches every block twice (the ext4's page cache and
    # the image file's in the host's), and writes back both
    dev = subprocess.run(
        ["losetup", "--direct-io=on", "-f", "--show", str(img)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # why noatime: the generated tree's atimes are its 2020 mtimes, so whichever side read it
    # first updated 100,000 inodes (0.2-0.5 s more kernel time than a second reader)
    subprocess.run(["mount", "-o", "noatime", dev, str(mnt)], check=True)
    try:
        yield mnt
    finally:
        # lazily: a sandbox process the metro stopped may still be letting go of its cwd;
        # the device is then freed once the last of them lets go (losetup -d sets autoclear)
        subprocess.run(["umount", "-l", str(mnt)], check=False)
        subprocess.run(["losetup", "-d", dev], check=False)
        img.unlink()
        with contextlib.suppress(OSError):
            mnt.rmdir()


def sides(
    env: UkcEnv,
    master: Path,
    files: list[str],
    work: Path,
    k: int,
    a: argparse.Namespace,
    cleanup: list[Any],
) -> dict[str, float]:
    """Run `k`: both sides, the first one alternating with `k`."""
    got: dict[str, float] = {}
    for side in ["rsync", "ukc"] if k % 2 == 0 else ["ukc", "rsync"]:
        if side == "rsync":
            got.update(rsync_side(env, master, files, work, k, a))
        else:
            got.update(ukc_side(env, master, files, work, k, a, cleanup))
    print(f"# run {k}: " + " ".join(f"{key}={v:.3f}" for key, v in got.items()))
    sys.stdout.flush()
    return got


if __name__ == "__main__":
    main()
