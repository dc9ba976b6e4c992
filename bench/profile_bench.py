#!/usr/bin/env python3
"""Where the time goes: the scale and fan-out phases under py-spy, controller and metro side.

    .venv/bin/python bench/profile_bench.py OUTDIR [--files 100000] [--edits 5]
        [--sessions 50] [--concurrency 8]
        [--phases initial,nochange,onefile,watch,back,fanout]
        [--rate 100] [--cprofile]

Needs py-spy (`.venv/bin/pip install py-spy`). Sets up what `scale_bench.py` does (one
session whose sandbox exists, the `treegen.gen_scale_tree` tree lent to it), then records:

  controller  `py-spy record --threads --idle` of the `ukc` process: `ukc apply` runs with
              UKC_WARM=0 (py-spy starts it; the import time then shows as `<module>` frames
              under the launcher, which the warm process would have saved), `ukc watch` is
              attached to once it has converged, for `--edits` one-file edits
  metro       `py-spy record --subprocesses` (CPU samples only) of the metro daemon for the
              same span:
              the daemon (API, TLS edge), each sandbox's agent (the relay between the edge
              and sshd) and the in-sandbox sync helper (a Python process under sshd)

With `--cprofile` the `ukc apply` phases run under `cprofile_all.py` instead (every thread,
deterministic: for call counts; times are inflated).
Writes OUTDIR/<phase>.controller.txt and OUTDIR/<phase>.metro.txt (collapsed stacks, one
`frames count` line each; `stacks.py` summarises them, so do flamegraph tools) and
OUTDIR/<phase>.summary.txt (the main thread's top functions and the metro's), plus the
phase's wall time, CPU and peak RSS in OUTDIR/figures.txt.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stacks
from fanout_bench import make_project
from procmeter import KindCpu, rss_of, tree_cpu_s
from scale_bench import SESSION, WatchProc
from treegen import edit_one, gen_scale_tree, scale_files
from ukcenv import UKC, UkcEnv, session_status

PY_SPY = str(Path(sys.executable).with_name("py-spy"))
CPROFILE_ALL = str(Path(__file__).resolve().with_name("cprofile_all.py"))


class Recorder:
    """`py-spy record` of a running process (tree) until `stop()`."""

    def __init__(self, pid: int, out: Path, rate: int, subprocesses: bool) -> None:
        # the metro (subprocesses) is recorded on CPU only: its many idle server threads would
        # drown what it does; the controller with --idle, so waiting shows on its wall path
        argv = [PY_SPY, "record", "--pid", str(pid), "-r", str(rate), "--threads"]
        argv += [] if subprocesses else ["--idle"]
        argv += ["--nonblocking", "-f", "raw", "-o", str(out)]
        if subprocesses:
            argv.append("--subprocesses")
        self.out = out
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        time.sleep(0.5)  # attached before the phase starts

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Profiler:
    def __init__(self, env: UkcEnv, out: Path, a: argparse.Namespace) -> None:
        self.env = env
        self.out = out
        self.a = a
        self.figures = out / "figures.txt"

    def note(self, line: str) -> None:
        print(line, flush=True)
        with open(self.figures, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def apply(self, phase: str, project: Path, args: list[str]) -> None:
        """One `ukc` command, recorded from spawn to exit, with the metro recorded meanwhile."""
        ctl = self.out / f"{phase}.controller.txt"
        met = self.out / f"{phase}.metro.txt"
        metro = Recorder(self.env.metro_pid, met, self.a.rate, subprocesses=True)
        metro_cpu0 = tree_cpu_s(self.env.metro_pid)
        kinds = KindCpu(self.env.metro_pid)
        env = dict(self.env.env, UKC_WARM="0")
        if self.a.cprofile:
            argv = [sys.executable, CPROFILE_ALL, str(self.out / f"{phase}.prof"), "--", *args]
        else:
            # --nonblocking: pausing a process of 60 threads 100 times a second to read its
            # stacks doubled a 50-session apply; unpaused reads are slightly less exact
            argv = [PY_SPY, "record", "-r", str(self.a.rate), "--idle", "--threads"]
            argv += ["--nonblocking", "-f", "raw", "-o", str(ctl), "--", *UKC, *args]
        os.sync()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True)
        elapsed = time.perf_counter() - t0
        metro.stop()
        by_kind = kinds.stop()
        metro_cpu = tree_cpu_s(self.env.metro_pid) - metro_cpu0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
        if self.a.cprofile:
            (self.out / f"{phase}.cprofile.txt").write_text(proc.stderr)
        self.note(
            f"{phase}: wall_s={elapsed:.2f} exit={proc.returncode} metro_cpu_s={metro_cpu:.2f}"
            + (" (under cProfile)" if self.a.cprofile else " (under py-spy, UKC_WARM=0)")
            + " metro_cpu_by_kind: "
            + " ".join(f"{k}={v:.2f}" for k, v in by_kind.items())
        )
        self.write_summary(phase, ctl, met)

    def write_summary(self, phase: str, ctl: Path, met: Path) -> None:
        text = ""
        if ctl.exists():
            st = stacks.load(ctl)
            text += stacks.report(
                st, f"{phase} controller: critical path", keep=stacks.critical_path
            )
            text += stacks.report(
                st, f"{phase} controller: sessions' work", under="Executor.run_session"
            )
            if phase == "watch":
                text += stacks.report(st, "watch passes", under="Watcher._pass")
            text += stacks.report(st, f"{phase} controller: every thread")
        if met.exists():
            st = stacks.load(met)
            for kind in ("daemon", "agent", "sync-helper"):
                text += stacks.report(
                    st, f"{phase} metro: {kind}", keep=lambda f, k=kind: stacks.process_kind(f) == k
                )
        (self.out / f"{phase}.summary.txt").write_text(text)

    def watch(self, project: Path, tree: Path, files: list[str], remote: Path) -> None:
        w = WatchProc(self.env, project)
        try:
            if not w.wait_passes(1, 900):
                raise SystemExit("watch did not converge in 900 s")
            time.sleep(0.5)
            ctl = self.out / "watch.controller.txt"
            met = self.out / "watch.metro.txt"
            rec = Recorder(w.proc.pid, ctl, self.a.rate, subprocesses=False)
            metro = Recorder(self.env.metro_pid, met, self.a.rate, subprocesses=True)
            kinds = KindCpu(self.env.metro_pid)
            cpu0 = tree_cpu_s(w.proc.pid)
            lat = []
            t_all = time.perf_counter()
            for k in range(self.a.edits):
                before = w.passes
                t0 = time.perf_counter()
                rel, body = edit_one(tree, files, k, "profile")
                while True:
                    try:
                        if (remote / rel).read_bytes() == body:
                            break
                    except FileNotFoundError:
                        pass
                    if time.perf_counter() - t0 > 300:
                        raise SystemExit("watch edit did not arrive in 300 s")
                    time.sleep(0.002)
                lat.append(time.perf_counter() - t0)
                w.wait_passes(before + 1, 300)
                time.sleep(0.3)
            span = time.perf_counter() - t_all
            cpu = tree_cpu_s(w.proc.pid) - cpu0
            rec.stop()
            metro.stop()
            by_kind = kinds.stop()
            lat.sort()
            self.note(
                f"watch: edits={len(lat)} p50_s={lat[len(lat) // 2]:.2f} max_s={lat[-1]:.2f} "
                f"span_s={span:.1f} watch_cpu_s={cpu:.2f} "
                f"watch_rss_hwm_mb={rss_of(w.proc.pid).get('VmHWM', 0) / 1024:.0f} "
                + "metro_cpu_by_kind: "
                + " ".join(f"{k}={v:.2f}" for k, v in by_kind.items())
            )
            self.write_summary("watch", ctl, met)
        finally:
            w.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--dirs", type=int, default=1000)
    ap.add_argument("--edits", type=int, default=5)
    ap.add_argument("--sessions", type=int, default=50)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--phases", default="initial,nochange,onefile,watch,back,fanout")
    ap.add_argument("--rate", type=int, default=100)
    ap.add_argument("--cprofile", action="store_true")
    a = ap.parse_args()
    if not a.cprofile and not Path(PY_SPY).exists():
        raise SystemExit(f"{PY_SPY} not found: .venv/bin/pip install py-spy")
    phases = a.phases.split(",")
    a.outdir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ukc-profile-bench-"))
    env = UkcEnv(work)
    p = Profiler(env, a.outdir, a)
    try:
        if {"initial", "nochange", "onefile", "watch", "back"} & set(phases):
            proj = work / "proj"
            tree = proj / "tree"
            tree.mkdir(parents=True)
            (tree / "seed.txt").write_text("seed\n")
            (proj / "s.yaml").write_text(f"name: {SESSION}\ndirectory: ./tree\n")
            env.ukc(["apply", "s.yaml"], proj)
            uuid = session_status(proj, SESSION)["instance"]["uuid"]
            shutil.rmtree(tree)
            gen_scale_tree(tree, a.files, a.dirs)
            files = scale_files(tree)
            p.note(f"# profile_bench files={a.files} dirs={a.dirs} load={os.getloadavg()[0]:.2f}")
            if "initial" in phases:
                p.apply("initial", proj, ["apply", "s.yaml"])
            else:
                env.ukc(["apply", "s.yaml"], proj)
            if "nochange" in phases:
                p.apply("nochange", proj, ["apply", "s.yaml"])
            if "onefile" in phases:
                edit_one(tree, files, 0, "onefile")
                p.apply("onefile", proj, ["apply", "s.yaml"])
            if "watch" in phases and not a.cprofile:
                p.watch(proj, tree, files, env.state / "workspaces" / uuid)
            if "back" in phases:
                # as scale_bench: a command copies the tree to out/ in the sandbox (untimed
                # here: its share shows as run_command), sync-back brings out/ home
                (proj / "s.yaml").write_text(
                    f"name: {SESSION}\ndirectory: ./tree\n"
                    "commands: ['rm -rf out && mkdir out && cp -a d[0-9]* out/']\n"
                    "sync:\n  back: [out/]\n"
                )
                p.apply("back", proj, ["apply", "s.yaml"])
            env.ukc(["delete", "s.yaml"], proj, check=False)
        if "fanout" in phases:
            fan = make_project(work / "fan", a.sessions, 3)
            p.apply("fanout", fan, ["apply", "--concurrency", str(a.concurrency), "specs.yaml"])
            env.ukc(["delete", "specs.yaml"], fan, check=False, timeout_s=600)
    finally:
        env.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
