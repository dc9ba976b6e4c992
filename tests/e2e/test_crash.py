"""Crash consistency of `ukc apply` / `ukc delete`: SIGKILL, SIGINT, racing appliers, lost answers.

Run end to end: `ukc` is a real process against the real local metro daemon, killed at seeded random
instants; the next run must converge with no duplicate instance, no lost file and a parseable
status, and the run after that must plan nothing. `UKC_CRASH_SEED` replays a failing seed;
`UKC_CRASH_KILLS` sets the number of kill points (a soak: a few hundred).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.local.daemon import MetroInfo
from tests.support.sandboxes import cmdline, sandbox_pids
from tests.support.ukc import Ukc
from tests.support.waiting import eventually

pytestmark = pytest.mark.metro

SEED = int(os.environ.get("UKC_CRASH_SEED", "20261126"))
#: kill points per run of the random-kill test (raise it for a soak: UKC_CRASH_KILLS=200)
KILLS = int(os.environ.get("UKC_CRASH_KILLS", "12"))
SESSION = "crash"

SPEC = f"""\
name: {SESSION}
directory: ./work
commands:
  - name: list
    run: mkdir -p out && find . -path ./out -prune -o -type f -print | sort > out/files.txt
  - name: digest
    run: >-
      find . -path ./out -prune -o -type f -print0 | sort -z | xargs -0 sha256sum
      > out/sums.txt && sleep 0.2
sync:
  back: ["out/"]
"""

#: temp-name prefixes of the sync engine (remote helper, local pull): never left behind
TEMP_MARKERS = (".ukc-tmp.", ".ukc-pull.")


#: how an action's line starts (`actions.*.describe()`); info lines ("synced: ...") do not
ACTION_LINE = re.compile(
    r"^\[[a-z0-9-]+\] (create instance|delete instance|start instance|wait until|full sync|"
    r"send \d|run command|bring back) "
)


# -- helpers ----------------------------------------------------------------------------------


def make_tree(work: Path, rng: random.Random, files: int = 300) -> None:
    """A tree of a few hundred small files in nested directories, plus one 1 MiB file."""
    for i in range(files):
        path = work / f"d{i % 12}" / f"s{i % 5}" / f"f{i}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(rng.randbytes(rng.randint(1, 4000)))
    (work / "big.bin").write_bytes(rng.randbytes(1 << 20))


def new_project(metro: MetroInfo, root: Path, rng: random.Random) -> Ukc:
    root.mkdir(parents=True)
    tool = Ukc(root, metro, {})
    make_tree(root / "work", rng)
    tool.write_spec(SPEC)
    return tool


def tree_digest(root: Path) -> dict[str, str]:
    """relative path → sha256 for every file, and "dir" for every directory, under `root`."""
    out: dict[str, str] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            out[rel] = "symlink"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@dataclass
class Started:
    """A `ukc` process started in its own process group, its output in files."""

    proc: subprocess.Popen[bytes]
    out: Path
    err: Path
    started: float

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")


def start(tool: Ukc, *args: str, tag: str = "run") -> Started:
    logs = tool.project.parent / "logs"
    logs.mkdir(exist_ok=True)
    n = len(list(logs.iterdir()))
    out, err = logs / f"{n:03d}-{tag}.out", logs / f"{n:03d}-{tag}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", *args],
            cwd=tool.project,
            env=tool.env(),
            stdout=fo,
            stderr=fe,
            start_new_session=True,
        )
    return Started(proc, out, err, time.monotonic())


def signal_after(run: Started, delay: float, sig: int) -> bool:
    """Send `sig` to the process group `delay` s after the start; False if it had already exited."""
    remaining = run.started + delay - time.monotonic()
    try:
        run.proc.wait(timeout=max(0.0, remaining))
        return False
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(run.proc.pid, sig)
    except ProcessLookupError:
        return False
    return True


def finish(run: Started, timeout: float = 120) -> int:
    try:
        return run.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        run.proc.wait()
        raise AssertionError(f"ukc did not finish in {timeout}s:\n{run.stderr()}") from None


def owned(tool: Ukc, session: str = SESSION) -> list[dict[str, Any]]:
    """Every instance on the metro carrying this project's owner tags for `session`."""
    project = tool.status()["project"]
    wanted = {f"ukc.project={project}", f"ukc.session={session}"}
    return [i for i in tool.instances() if wanted <= set(i.get("tags", []))]


def temp_leftovers(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.name.endswith(".tmp") or p.name.startswith(TEMP_MARKERS)
    )


def delete_everything(tool: Ukc) -> None:
    """Cleanup: every instance this project created, found by its owner tag."""
    status_file = tool.project / ".ukc" / "status.json"
    if not status_file.exists():
        return
    project = json.loads(status_file.read_text()).get("project")
    names = [i["name"] for i in tool.instances() if f"ukc.project={project}" in i.get("tags", [])]
    if names:
        with tool.api() as client:
            client.request("DELETE", "/v1/instances", json=[{"name": n} for n in names])


def assert_converged(tool: Ukc) -> dict[str, Any]:
    """The end state every interrupted apply must reach after one more apply."""
    rec: dict[str, Any] = tool.status()["sessions"][SESSION]
    assert rec["phase"] == "Ready", rec
    instances = owned(tool)
    assert len(instances) == 1, [i["name"] for i in instances]
    assert instances[0]["uuid"] == rec["instance"]["uuid"]
    local = tree_digest(tool.project / "work")
    remote = tree_digest(tool.workspace(rec["instance"]["uuid"]))
    assert local == remote, {
        "only local": sorted(set(local) - set(remote))[:10],
        "only remote": sorted(set(remote) - set(local))[:10],
        "differ": sorted(k for k in set(local) & set(remote) if local[k] != remote[k])[:10],
    }
    # outputs are home and describe the tree that was synced
    files = (tool.project / "work" / "out" / "files.txt").read_text().splitlines()
    assert len(files) == 301 and "./big.bin" in files
    assert len((tool.project / "work" / "out" / "sums.txt").read_text().splitlines()) == 301
    assert temp_leftovers(tool.project / ".ukc") == []
    assert temp_leftovers(tool.project / "work") == []
    return rec


def assert_plans_nothing(tool: Ukc) -> None:
    proc = tool.run("apply", "session.yaml", "--output", "json", check=0)
    group = json.loads(proc.stdout)["groups"][0]
    assert group["changes_made"] is False and group["rounds"] == 0, group["plan"]


@pytest.fixture
def projects(metro: MetroInfo, tmp_path: Path) -> Iterator[list[Ukc]]:
    made: list[Ukc] = []
    yield made
    for tool in made:
        delete_everything(tool)


@pytest.fixture
def clean_run_s(metro: MetroInfo, tmp_path: Path) -> tuple[float, float]:
    """When an uninterrupted first apply starts acting and when it ends, in s after its start.

    Kill points are spread over that span: before the first action the process only imports
    and reads, which the kills would otherwise spend most of their budget on.
    """
    spans = []
    for attempt in range(3):
        tool = new_project(metro, tmp_path / f"measure{attempt}", random.Random(SEED))
        try:
            started = time.monotonic()
            proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
                cwd=tool.project,
                env=tool.env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            assert proc.stdout is not None
            first_action = 0.0
            for raw in proc.stdout:
                if not first_action and ACTION_LINE.match(raw.decode(errors="replace")):
                    first_action = time.monotonic() - started
            assert proc.wait(timeout=120) == 0
            spans.append((first_action, time.monotonic() - started))
            assert_converged(tool)
        finally:
            delete_everything(tool)
    # the fastest of three: the first run on a fresh metro warms caches the later ones find
    # warm, a busy moment can slow another, and kill points past the end of a typical run kill
    # nothing (with two, 12 of 40 points once fell after the end)
    first_action, elapsed = min(spans, key=lambda span: span[1])
    return first_action, elapsed


# -- 1. SIGKILL at random instants of a first apply ------------------------------------------


def test_apply_killed_at_random_instants_converges_on_the_next_run_with_one_instance(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc], clean_run_s: tuple[float, float]
) -> None:
    rng = random.Random(SEED)
    kills = KILLS
    # Spread the kill points evenly (jittered) from a little before the first action to the end
    # of the clean run, so every phase (create, wait, sync, commands, sync-back) gets some.
    begin, end = clean_run_s[0] * 0.8, clean_run_s[1]
    delays = [begin + (end - begin) * (i + rng.random()) / kills for i in range(kills)]
    killed = 0
    for i, delay in enumerate(delays):
        # A run that finished before its kill point (the shared machine got faster than during
        # the measured run) is tried again on a fresh project with an earlier kill point.
        for attempt in range(3):
            tool = new_project(metro, tmp_path / f"k{i:02d}-{attempt}", random.Random(SEED + i))
            projects.append(tool)
            run = start(tool, "apply", "session.yaml", tag="killed")
            hit = signal_after(run, delay, signal.SIGKILL)
            run.proc.wait()
            if hit:
                break
            delay *= 0.7
        killed += hit
        again = start(tool, "apply", "session.yaml", tag="rerun")
        assert finish(again) == 0, f"kill at {delay:.3f}s: {again.stderr()}"
        assert_converged(tool)
        assert_plans_nothing(tool)
    assert killed >= kills * 3 // 4, f"only {killed} of {kills} runs were actually killed"


#: SPEC whose last command, once its outputs are written, waits for the test's go-ahead
HELD_SPEC = SPEC.replace(
    "&& sleep 0.2", "&& while [ ! -e /workspace/.go ]; do sleep 0.05; done; rm /workspace/.go"
)


def sync_helpers(workspace: Path) -> list[int]:
    """The sandbox's sync helpers (`python3 -E -S`, the sandbox's agent runs `-I -S`)."""
    return [p for p in sandbox_pids(workspace) if cmdline(p)[:3] == ["python3", "-E", "-S"]]


def test_apply_killed_during_sync_back_brings_the_outputs_home_without_rerunning_commands(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc]
) -> None:
    # Regression (seed 20261126, kill point 9): the commands were journaled as succeeded, so
    # the next apply skipped them and, with them, the sync-back; the outputs never came home.
    tool = new_project(metro, tmp_path / "back", random.Random(SEED + 50))
    tool.write_spec(HELD_SPEC)
    projects.append(tool)
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
        cwd=tool.project,
        env=tool.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    assert proc.stdout is not None
    # why held: a kill sent when "bring back out/" is read came after a pull of two small
    # files had ended on a loaded machine. While the last command waits, the pull's helper
    # (started ahead, beside the push's) is stopped: the sync-back that follows cannot end.
    workspace: list[Path] = []

    def held() -> bool:
        try:
            uuid = tool.status()["sessions"][SESSION]["instance"]["uuid"]
        except (FileNotFoundError, KeyError, TypeError, ValueError):
            return False
        workspace[:] = [tool.workspace(uuid)]
        return (workspace[0] / "out" / "sums.txt").exists()

    assert eventually(held, 120), "the last command never wrote its outputs"
    assert eventually(lambda: len(sync_helpers(workspace[0])) >= 2, 60), "no pull started ahead"
    helpers = sync_helpers(workspace[0])
    for pid in helpers:
        os.kill(pid, signal.SIGSTOP)
    (workspace[0] / ".go").touch()
    seen = []
    for line in proc.stdout:
        seen.append(line.decode(errors="replace"))
        if b"bring back out/" in line:  # printed as the sync-back starts
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    for pid in helpers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert "bring back out/" in seen[-1], "".join(seen)
    assert not (tool.project / "work" / "out" / "sums.txt").exists(), "the pull was not held"
    out = json.loads(tool.run("apply", "session.yaml", "--output", "json", check=0).stdout)
    group = out["groups"][0]
    rec = assert_converged(tool)
    assert [c["skipped"] for c in rec["commands"]] == [True, True], group
    assert_plans_nothing(tool)


# -- 2. SIGKILL during delete ----------------------------------------------------------------


def test_delete_killed_at_random_instants_is_finished_by_running_it_again(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc]
) -> None:
    rng = random.Random(SEED + 100)
    for i in range(4):
        tool = new_project(metro, tmp_path / f"d{i}", random.Random(SEED + 100 + i))
        projects.append(tool)
        tool.run("apply", "session.yaml", check=0)
        name = tool.status()["sessions"][SESSION]["instance"]["name"]
        run = start(tool, "delete", "session.yaml", tag="killed-delete")
        signal_after(run, rng.uniform(0.15, 0.6), signal.SIGKILL)
        run.proc.wait()
        tool.run("delete", "session.yaml", check=0)
        assert name not in [x["name"] for x in tool.instances()]
        assert owned(tool) == []
        assert not (tool.project / ".ukc" / "keys" / SESSION).exists()
        assert tool.status()["sessions"][SESSION]["phase"] == "Deleted"
        assert temp_leftovers(tool.project / ".ukc") == []


# -- 3. SIGINT once during apply -------------------------------------------------------------


@pytest.mark.parametrize(
    "trigger",
    ["wait until", "full sync", "run command 'list'", None],
    ids=["waiting", "syncing", "in-a-command", "random-instant"],
)
def test_one_sigint_during_apply_starts_no_new_action_and_the_next_apply_converges(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc], trigger: str | None
) -> None:
    rng = random.Random(SEED + 200)
    tool = new_project(metro, tmp_path / "sigint", random.Random(SEED + 200))
    projects.append(tool)
    # A slow first command keeps the window between "signal sent" and "next action" wide.
    tool.write_spec(SPEC.replace("sort > out/files.txt", "sort > out/files.txt && sleep 0.5"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "apply", "session.yaml"],
        cwd=tool.project,
        env=tool.env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + rng.uniform(0.3, 1.0)
    lines: list[str] = []
    sent = threading.Event()

    def interrupt() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            sent.set()

    if trigger is None:
        timer = threading.Timer(deadline - time.monotonic(), interrupt)
        timer.start()
        lines = [raw.decode(errors="replace") for raw in proc.stdout]
        timer.join()
    else:
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace"))
            if lines[-1].startswith(f"[{SESSION}] {trigger}"):
                interrupt()
                break
        after = [raw.decode(errors="replace") for raw in proc.stdout]
        # The action in flight finishes (and is journaled); no new one starts.
        assert [line for line in after if ACTION_LINE.match(line)] == [], after
    code = proc.wait(timeout=60)
    stderr = proc.stderr.read().decode(errors="replace")
    assert sent.is_set() or trigger is None, lines
    if sent.is_set():
        assert code in (130, 1), (code, stderr)
        assert len(stderr.strip().splitlines()) == 1, stderr
    else:  # the random instant came after a fast run had finished
        assert code == 0, stderr
    status_file = tool.project / ".ukc" / "status.json"
    if status_file.exists():  # an early signal may come before the first journal entry
        json.loads(status_file.read_text())
    tool.run("apply", "session.yaml", check=0)
    assert_converged(tool)
    assert_plans_nothing(tool)


# -- 4. Two appliers racing on one spec directory --------------------------------------------


def test_two_appliers_started_together_one_proceeds_the_other_exits_1_no_duplicate(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc]
) -> None:
    rng = random.Random(SEED + 300)
    tool = new_project(metro, tmp_path / "race", random.Random(SEED + 300))
    projects.append(tool)
    work = tool.project / "work"
    for pair in range(10):
        # Change one file so that every pair has work to do (sync + commands).
        (work / "d0" / "s0" / "f0.txt").write_text(f"pair {pair}\n")
        first = start(tool, "apply", "session.yaml", tag=f"race{pair}a")
        time.sleep(rng.uniform(0.0, 0.05))  # the gap between the two starts is the test input
        second = start(tool, "apply", "session.yaml", tag=f"race{pair}b")
        codes = sorted([finish(first), finish(second)])
        assert codes == [0, 1], (codes, first.stderr(), second.stderr())
        loser = first if first.proc.returncode == 1 else second
        lines = loser.stderr().strip().splitlines()
        assert len(lines) == 1 and "another ukc holds" in lines[0], loser.stderr()
        assert len(owned(tool)) == 1
    assert_converged(tool)
    assert_plans_nothing(tool)


# -- 5. A create whose answer is lost --------------------------------------------------------


def set_faults(tool: Ukc, body: dict[str, Any]) -> None:
    with tool.api() as client:
        client.post("/_local/faults", json=body).raise_for_status()


@pytest.fixture
def faults(metro: MetroInfo) -> Iterator[None]:
    yield
    tool = Ukc(Path("/"), metro, {})
    set_faults(tool, {"reset": True})


def metro_instance_count(tool: Ukc) -> int:
    """Instances the metro holds (admin route: not slowed or failed by the fault knobs)."""
    with tool.api() as client:
        return int(client.get("/_local/status").json()["data"]["instances"])


def test_an_apply_that_fails_right_after_the_create_is_adopted_on_the_next_run(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc], faults: None
) -> None:
    tool = new_project(metro, tmp_path / "lost", random.Random(SEED + 400))
    projects.append(tool)
    before = metro_instance_count(tool)
    # Every API request waits 1 s before it is handled and the fault knobs are consulted after
    # that wait: once the create has been applied, the next request (the first look at the new
    # instance) is still waiting and will meet the server errors set now.
    set_faults(tool, {"latency_ms": 1000})
    run = start(tool, "apply", "session.yaml", tag="lost-create")
    deadline = time.monotonic() + 30
    while metro_instance_count(tool) == before:
        assert run.proc.poll() is None, run.stderr()
        assert time.monotonic() < deadline, "the create never reached the metro"
        time.sleep(0.02)
    set_faults(tool, {"latency_ms": 0, "server_error": {"count": 1000, "status": 503}})
    assert finish(run) == 1, run.stderr()
    assert "503" in run.stderr()
    rec = tool.status()["sessions"][SESSION]
    assert rec["phase"] == "Failed" and rec["instance"]["uuid"] == ""  # intent only
    set_faults(tool, {"reset": True})
    tool.run("apply", "session.yaml", check=0)
    assert len(owned(tool)) == 1
    assert_converged(tool)
    assert_plans_nothing(tool)


def test_apply_killed_right_after_the_create_with_a_lagging_list_adopts_by_name(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc], faults: None
) -> None:
    tool = new_project(metro, tmp_path / "lag", random.Random(SEED + 500))
    projects.append(tool)
    before = metro_instance_count(tool)
    # The list lags behind creates from now on: the killed run's one list uses up one answer,
    # the next run's first list is the other and does not show the new instance yet.
    set_faults(tool, {"latency_ms": 1000, "list_lag": {"count": 2}})
    run = start(tool, "apply", "session.yaml", tag="killed-after-create")
    deadline = time.monotonic() + 30
    while metro_instance_count(tool) == before:
        assert run.proc.poll() is None, run.stderr()
        assert time.monotonic() < deadline, "the create never reached the metro"
        time.sleep(0.02)
    os.killpg(run.proc.pid, signal.SIGKILL)  # the create's answer dies with the process
    run.proc.wait()
    # So the next run plans a create, meets "name taken" and must adopt the instance by its
    # owner tags instead of failing or duplicating it.
    set_faults(tool, {"latency_ms": 0})
    proc = tool.run("apply", "session.yaml", check=0)
    assert "adopted existing instance" in proc.stdout
    assert len(owned(tool)) == 1
    assert_converged(tool)
    assert_plans_nothing(tool)


def test_a_public_key_file_left_empty_by_a_kill_is_regenerated_before_the_create(
    metro: MetroInfo, tmp_path: Path, projects: list[Ukc]
) -> None:
    # The state a kill leaves between creating `keys/<session>.pub` and writing it (the private
    # key is complete: it is written and fsynced first). The create must not send an empty key.
    tool = new_project(metro, tmp_path / "pub", random.Random(SEED + 600))
    projects.append(tool)
    keys = tool.project / ".ukc" / "keys"
    keys.mkdir(parents=True, mode=0o700)
    from reconciler.transport.keys import generate_keypair

    generate_keypair(keys / SESSION)
    (keys / f"{SESSION}.pub").write_text("")
    tool.run("apply", "session.yaml", check=0, timeout=120)
    assert (keys / f"{SESSION}.pub").read_text().startswith("ssh-ed25519 ")
    assert_converged(tool)
