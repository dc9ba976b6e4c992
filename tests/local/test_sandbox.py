"""Real bubblewrap sandboxes: isolation, lifecycle, freeze/thaw, and a non-root daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import LocalMetroError
from reconciler.local.sandbox.layout import SandboxLayout
from reconciler.local.sandbox.limits import Limiter
from reconciler.local.sandbox.runtime import SandboxRuntime
from tests.support.sandbox_harness import (
    EdgeHarness,
    LoopThread,
    drop_control_dirs,
    needs_metro_tools,
)
from tests.support.sandboxes import cmdline
from tests.support.waiting import eventually
from tests.support.workflow import ssh_argv

pytestmark = [needs_metro_tools, pytest.mark.metro]

ONE = "sbx-one-uuid"
TWO = "sbx-two-uuid"
REPO = Path(__file__).resolve().parents[2]
# why: the venv's interpreter lives under /root (0700); Debian's python3 with its
# python3-cryptography is what an unprivileged user can run here
PY_FOR_USER = "/usr/bin/python3"


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeHarness]:
    h = EdgeHarness(tmp_path_factory.mktemp("sbx"))
    h.start(ONE, "one")
    h.start(TWO, "two")
    yield h
    h.close()


def _exec(h: EdgeHarness, name: str, cmd: str) -> dict[str, object]:
    code, body = h.curl(name, "/exec", "-d", json.dumps({"cmd": cmd}))
    assert code == 200, body
    result: dict[str, object] = json.loads(body)
    return result


def _state(pid: int) -> str:
    """Process state letter from /proc, '' once the pid is gone."""
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return ""
    return data[data.rfind(b")") + 2 :][:1].decode()


def _all_dead(pids: list[int]) -> bool:
    # why: killed sandbox processes may linger as zombies until the host's init reaps them
    return all(_state(p) in ("", "Z", "X") for p in pids)


class TestBoot:
    def test_start_returns_the_boot_id_the_sandbox_wrote_to_run_ukc(
        self, harness: EdgeHarness
    ) -> None:
        boot = harness.runtime.boot_id(ONE)
        assert boot is not None
        assert _exec(harness, "one", "cat /run/ukc/boot_id")["stdout"] == boot + "\n"

    def test_start_is_fast_and_returns_once_sshd_accepts(self, harness: EdgeHarness) -> None:
        t0 = time.monotonic()
        harness.start("sbx-fast-uuid", "fast")
        elapsed = time.monotonic() - t0
        try:
            reader, writer = harness.lt.run(harness.runtime.open_connection("sbx-fast-uuid", 2222))
            banner = harness.lt.run(reader.readline())
            writer.close()
            assert banner.startswith(b"SSH-2.0-")
            assert elapsed < 1.0  # target 0.5 s; leave room for a loaded 2-core machine
        finally:
            harness.lt.run(harness.runtime.destroy("sbx-fast-uuid"))

    def test_the_console_holds_sshd_output(self, harness: EdgeHarness) -> None:
        assert b"Server listening on 127.0.0.1 port 2222" in harness.runtime.console(ONE)

    @pytest.mark.skipif(os.geteuid() != 0, reason="replacing a host /etc file needs root")
    def test_an_ssh_connection_is_served_by_a_fork_of_sshd_not_a_new_exec_of_it(
        self, harness: EdgeHarness
    ) -> None:
        # a fork keeps its parent's address layout; a re-exec'd sshd gets a new one
        def text_base(pid: int) -> str:
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
            return next(line.split("-")[0] for line in maps if line.endswith("/usr/sbin/sshd"))

        argv = ssh_argv(
            harness.key, harness.p2222, harness.fqdn("one"), harness.ca.cert_path, "sleep 20"
        )
        conn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:

            def sshds() -> dict[str, int]:
                found = {}
                for pid in harness.runtime.pids(ONE):
                    title = " ".join(cmdline(pid))  # sshd's titles, as ps shows them
                    if title.startswith("sshd: /usr/sbin/sshd") and "[listener]" in title:
                        found["listener"] = pid
                    elif title == "sshd: root@notty":
                        found["session"] = pid
                return found

            assert eventually(lambda: len(sshds()) == 2, 20, 0.05), [
                cmdline(p) for p in harness.runtime.pids(ONE)
            ]
            found = sshds()
            assert text_base(found["session"]) == text_base(found["listener"])
        finally:
            conn.kill()
            conn.wait()

    def test_a_host_account_change_leaves_the_sandboxs_own_accounts_and_login_alone(
        self, harness: EdgeHarness
    ) -> None:
        before = harness.ssh("one", "cat /etc/passwd /etc/shadow")
        assert before.returncode == 0, before.stderr
        # what useradd, userdel and passwd do to the host's files: a new copy renamed over
        # each (the content stays the same here, so the host notices nothing)
        for name in ("passwd", "group", "shadow"):
            live = Path("/etc") / name
            staged = live.with_name(f"{name}.ukc-test-{os.getpid()}")
            shutil.copy2(live, staged)
            stat = live.stat()
            os.chown(staged, stat.st_uid, stat.st_gid)
            os.replace(staged, live)
        after = harness.ssh("one", "cat /etc/passwd /etc/shadow")
        assert after.returncode == 0, after.stderr
        assert after.stdout == before.stdout

    def test_a_missing_bwrap_names_the_debian_package(self, tmp_path: Path) -> None:
        rt = SandboxRuntime(tmp_path, lambda u, c, m: None, bwrap=str(tmp_path / "no-bwrap"))
        with (
            _control_dirs_dropped(rt),
            pytest.raises(
                LocalMetroError, match=r"^bwrap not found: apt-get install -y bubblewrap$"
            ),
        ):
            asyncio.run(rt.start("x-uuid", env={}))

    def test_a_missing_sshd_names_the_debian_package(self, tmp_path: Path) -> None:
        rt = SandboxRuntime(tmp_path, lambda u, c, m: None, sshd=str(tmp_path / "no-sshd"))
        with (
            _control_dirs_dropped(rt),
            pytest.raises(
                LocalMetroError, match=r"^sshd not found: apt-get install -y openssh-server$"
            ),
        ):
            asyncio.run(rt.start("x-uuid", env={}))

    def test_an_env_name_no_environment_can_hold_fails_the_start_naming_it(
        self, tmp_path: Path
    ) -> None:
        rt = SandboxRuntime(tmp_path, lambda u, c, m: None)
        with (
            _control_dirs_dropped(rt),
            pytest.raises(LocalMetroError, match=r"^sandbox x-uuid: env variable 'A=B'"),
        ):
            asyncio.run(rt.start("x-uuid", env={"A=B": "1"}))
        assert not rt.is_running("x-uuid")

    def test_a_path_like_uuid_is_refused(self, tmp_path: Path) -> None:
        rt = SandboxRuntime(tmp_path, lambda u, c, m: None)
        with pytest.raises(LocalMetroError, match="not a valid instance uuid"):
            rt.workspace("../escape")


class TestIsolation:
    def test_ps_inside_shows_only_the_sandboxs_own_processes(self, harness: EdgeHarness) -> None:
        marker = f"sleep {secrets.randbelow(10**6) + 10**6}"
        try:
            out = harness.ssh("two", f"{marker} >/dev/null 2>&1 & ps -e -o args")
            assert marker in out.stdout
            listing = str(_exec(harness, "one", "ps -e -o args")["stdout"])
            assert marker not in listing
            assert "sshd" in listing and "ukc-host/agent/" in listing
        finally:
            harness.ssh("two", f"pkill -f '{marker}' || true")

    def test_the_other_sandboxs_workspace_is_invisible(self, harness: EdgeHarness) -> None:
        token = secrets.token_hex(8)
        (harness.runtime.workspace(TWO) / "mine.txt").write_text(token)
        other = harness.runtime.workspace(TWO)
        out = _exec(
            harness, "one", f"test -e {other} && echo visible; grep -rs {token} / --include=*.txt"
        )
        assert out["stdout"] == ""

    def test_the_network_namespace_has_only_loopback(self, harness: EdgeHarness) -> None:
        out = str(_exec(harness, "one", "tail -n +3 /proc/net/dev | cut -d: -f1")["stdout"])
        assert out.split() == ["lo"]

    def test_secret_env_reaches_commands_but_never_argv(self, harness: EdgeHarness) -> None:
        value = "s3cr3t-" + secrets.token_hex(8)
        uuid = "sbx-secret-uuid"
        harness.start(uuid, "secret", env={"API_SECRET": value})
        try:
            assert _exec(harness, "secret", "echo $API_SECRET")["stdout"] == value + "\n"
            for pid in harness.runtime.pids(uuid):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                assert value.encode() not in cmdline
        finally:
            harness.lt.run(harness.runtime.destroy(uuid))


class TestLifecycle:
    def test_stop_then_start_keeps_the_workspace_and_changes_the_boot_id(
        self, harness: EdgeHarness
    ) -> None:
        uuid = "sbx-cycle-uuid"
        first = harness.start(uuid, "cycle")
        try:
            assert harness.ssh("cycle", "echo kept > /workspace/k.txt").returncode == 0
            pids = harness.runtime.pids(uuid)
            harness.lt.run(harness.runtime.stop(uuid))
            assert not harness.runtime.is_running(uuid)
            assert _all_dead(pids)
            second = harness.start(uuid, "cycle")
            assert second != first
            assert harness.ssh("cycle", "cat /workspace/k.txt").stdout == "kept\n"
        finally:
            harness.lt.run(harness.runtime.destroy(uuid))

    def test_destroy_kills_every_process_and_removes_the_workspace(
        self, harness: EdgeHarness
    ) -> None:
        uuid = "sbx-doomed-uuid"
        harness.start(uuid, "doomed")
        harness.ssh("doomed", "sleep 300 >/dev/null 2>&1 &")
        pids = harness.runtime.pids(uuid)
        assert len(pids) >= 4  # bwrap monitor, bwrap init, agent, sshd (+ sleep)
        harness.lt.run(harness.runtime.destroy(uuid))
        assert _all_dead(pids)
        assert not harness.runtime.workspace(uuid).exists()

    def test_open_connection_to_a_closed_port_or_stopped_sandbox_is_refused(
        self, harness: EdgeHarness
    ) -> None:
        with pytest.raises(ConnectionRefusedError):
            harness.lt.run(harness.runtime.open_connection(ONE, 9))
        with pytest.raises(ConnectionRefusedError):
            harness.lt.run(harness.runtime.open_connection("sbx-never-uuid", 2222))

    def test_a_sandbox_that_dies_by_itself_is_reported_to_on_exit(
        self, harness: EdgeHarness
    ) -> None:
        uuid = "sbx-crash-uuid"
        harness.start(uuid, "crash")
        agent = next(
            p
            for p in harness.runtime.pids(uuid)
            if b"ukc-host/agent/" in Path(f"/proc/{p}/cmdline").read_bytes()
        )
        harness.exit_event.clear()
        os.kill(agent, signal.SIGKILL)
        assert harness.exit_event.wait(10)
        assert harness.exits[-1][0] == uuid
        assert not harness.runtime.is_running(uuid)
        harness.lt.run(harness.runtime.destroy(uuid))

    def test_close_stops_every_sandbox(self, tmp_path: Path) -> None:
        h = EdgeHarness(tmp_path)
        h.start("sbx-c1-uuid", "c1")
        h.start("sbx-c2-uuid", "c2")
        pids = h.runtime.pids("sbx-c1-uuid") + h.runtime.pids("sbx-c2-uuid")
        h.close()
        assert _all_dead(pids)
        assert not h.exits  # a deliberate close is not a crash


class TestHostIds:
    def test_a_workspace_written_by_host_root_becomes_the_sandboxs_own(
        self, harness: EdgeHarness
    ) -> None:
        if os.geteuid() != 0:
            pytest.skip("only a root daemon gives sandboxes their own host ids")
        uuid = "sbx-legacy-uuid"
        ws = harness.runtime.workspace(uuid)
        (ws / "sub").mkdir(parents=True)
        (ws / "sub" / "old.txt").write_text("from an older daemon\n")
        os.symlink("/etc/hostname", ws / "sub" / "link")
        harness.start(uuid, "legacy")
        try:
            out = harness.ssh("legacy", "echo appended >> /workspace/sub/old.txt && echo ok")
            assert out.stdout == "ok\n", out.stderr
            base = ws.stat().st_uid
            assert base >= 0x70000000
            assert {(ws / "sub" / "old.txt").stat().st_uid, (ws / "sub").stat().st_uid} == {base}
            assert (ws / "sub" / "link").lstat().st_uid == base
            assert Path("/etc/hostname").stat().st_uid == 0  # the link was not followed
        finally:
            harness.lt.run(harness.runtime.destroy(uuid))


@pytest.fixture(scope="module")
def bare(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EdgeHarness]:
    """A sandbox of a runtime that has no cgroups to use."""
    h = EdgeHarness(tmp_path_factory.mktemp("rlimit"), limiter=Limiter("rlimit"), max_pids=64)
    h.start("sbx-rlimit-uuid", "bare", memory_mb=64)
    yield h
    h.close()


class TestRlimitFallback:
    """Where no cgroup can be used, the agent limits tasks and data size with rlimits."""

    def test_the_task_limit_refuses_forks_beyond_it(self, bare: EdgeHarness) -> None:
        bomb = (
            "import os\nn = 0\ntry:\n    while n < 500:\n"
            "        if os.fork() == 0:\n            os.execv('/bin/sleep', ['sleep', '5'])\n"
            "        n += 1\nexcept OSError:\n    print('refused', n)\n"
        )
        out = bare.ssh("bare", f"grep 'Max processes' /proc/self/limits; python3 -c \"{bomb}\"")
        lines = out.stdout.splitlines()
        assert lines[0].split()[2:4] == ["64", "64"], out.stderr
        assert lines[1].split()[0] == "refused" and int(lines[1].split()[1]) < 64

    def test_the_memory_limit_is_a_per_process_data_limit(self, bare: EdgeHarness) -> None:
        out = bare.ssh("bare", "python3 -c 'bytearray(200 << 20)' 2>&1 | tail -1; echo alive")
        assert out.stdout.splitlines() == ["MemoryError", "alive"]
        assert bare.runtime.is_running("sbx-rlimit-uuid")


class TestKilledDaemon:
    SCRIPT = """
import asyncio, sys
from pathlib import Path
from reconciler.local.sandbox.runtime import SandboxRuntime

async def main() -> None:
    rt = SandboxRuntime(Path(sys.argv[1]), lambda u, c, m: None)
    await rt.start("orphan-uuid", env={})
    print(" ".join(map(str, rt.pids("orphan-uuid"))), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""

    def test_a_sigkilled_daemon_takes_its_sandboxes_with_it(self, tmp_path: Path) -> None:
        script = tmp_path / "daemon.py"
        script.write_text(self.SCRIPT)
        state = Path(tempfile.mkdtemp(prefix="ukc-killed-"))
        try:
            proc = subprocess.Popen(
                [PY_FOR_USER, str(script), str(state)],
                stdout=subprocess.PIPE,
                text=True,
                cwd=str(REPO),
                env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
            )
            try:
                assert proc.stdout is not None
                pids = [int(p) for p in proc.stdout.readline().split()]
                assert len(pids) >= 4
            finally:
                proc.kill()
                proc.wait()
            assert eventually(lambda: _all_dead(pids), 5.0)
        finally:
            drop_control_dirs(SandboxLayout(state))  # the killed daemon's sockets
            shutil.rmtree(state, ignore_errors=True)


class TestFreeze:
    def test_freeze_stops_every_process_and_thaw_resumes_them(self, harness: EdgeHarness) -> None:
        harness.lt.run(harness.runtime.freeze(TWO))
        pids = [p for p in harness.runtime.pids(TWO) if p != harness.runtime.pids(TWO)[0]]
        try:
            inside = [p for p in harness.runtime.pids(TWO) if _state(p) not in ("", "Z")]
            frozen = [p for p in inside if _state(p) == "T"]
            # the bwrap monitor outside the namespace keeps running; everything inside stops
            assert len(frozen) == len(inside) - 1
        finally:
            harness.lt.run(harness.runtime.thaw(TWO))
        assert all(_state(p) != "T" for p in pids)
        assert harness.ssh("two", "echo awake").stdout == "awake\n"

    def test_freeze_stops_a_process_that_left_its_parent_as_a_walk_of_proc_finds_it(
        self, harness: EdgeHarness
    ) -> None:
        # why: the members come from the sandbox's cgroup, not a walk of /proc; an orphan
        # (reparented to the namespace's pid 1) must be among them all the same
        _exec(harness, "two", "setsid sleep 300 >/dev/null 2>&1 < /dev/null &")
        host_ns = os.stat("/proc/self/ns/pid").st_ino
        namespaces = {os.stat(f"/proc/{p}/ns/pid").st_ino for p in harness.runtime.pids(TWO)}
        (ns,) = namespaces - {host_ns}  # the bwrap monitor is in the host's
        harness.lt.run(harness.runtime.freeze(TWO))
        try:
            inside = []
            for entry in os.listdir("/proc"):
                with contextlib.suppress(OSError):
                    if entry.isdigit() and os.stat(f"/proc/{entry}/ns/pid").st_ino == ns:
                        inside.append(int(entry))
            running = [p for p in inside if _state(p) not in ("", "Z", "T")]
            assert len(inside) >= 3 and running == []
        finally:
            harness.lt.run(harness.runtime.thaw(TWO))
            _exec(harness, "two", "pkill -x sleep || true")


class TestNamespaceReuse:
    """A destroyed sandbox's pid namespace number goes to the next namespace made; the
    runtime must never take the processes of a sandbox booting then for the destroyed one's."""

    SANDBOXES = 24
    ROUNDS = 2

    def test_sandboxes_booting_while_others_are_destroyed_are_not_killed(
        self, tmp_path: Path
    ) -> None:
        exits: list[tuple[str, int, bool]] = []
        lt = LoopThread()
        rt = SandboxRuntime(tmp_path / "state", lambda u, c, m: exits.append((u, c, m)))

        async def destroy_and_boot(old: list[str], new: list[str]) -> list[str]:
            destroys = [asyncio.create_task(rt.destroy(u)) for u in old]
            # why: the new namespaces are made while the destroys are still at work
            await asyncio.sleep(0.3)
            booted = await asyncio.gather(
                *(rt.start(u, env={}) for u in new), return_exceptions=True
            )
            await asyncio.gather(*destroys)
            await asyncio.sleep(0.5)
            failed = [
                f"{u}: {b}" for u, b in zip(new, booted, strict=True) if isinstance(b, Exception)
            ]
            return failed + [f"{u}: not running" for u in new if not rt.is_running(u)]

        async def scenario() -> list[str]:
            old = [f"reuse-0-{i:02d}-uuid" for i in range(self.SANDBOXES)]
            await asyncio.gather(*(rt.start(u, env={}) for u in old))
            failures: list[str] = []
            for r in range(1, self.ROUNDS + 1):
                new = [f"reuse-{r}-{i:02d}-uuid" for i in range(self.SANDBOXES)]
                failures += await destroy_and_boot(old, new)
                old = new
            return failures

        try:
            failures = lt.run(scenario(), timeout=600)
        finally:
            lt.run(rt.close(), timeout=120)
            lt.close()
        assert failures == []
        assert exits == []


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a throwaway user needs root")
@pytest.mark.skipif(not shutil.which("useradd"), reason="needs useradd (passwd package)")
class TestNonRootDaemon:
    SCRIPT = """
import asyncio, sys
from pathlib import Path
from reconciler.local.ca import CertificateAuthority
from reconciler.local.edge import Edge, Route
from reconciler.local.sandbox.runtime import SandboxRuntime

async def main() -> None:
    root = Path(sys.argv[1])
    rt = SandboxRuntime(root / "state", lambda u, c, m: None)
    ca = CertificateAuthority.load_or_create(root / "state" / "ca", "local.ukc.localhost")
    async def resolve(sni: str, port: int) -> Route | None:
        return Route("nr-uuid", 2222)
    edge = Edge(ca=ca, runtime=rt, resolve=resolve, on_activity=lambda u, d: None,
                should_drop=lambda: False)
    port = await edge.open_port(2222)
    await rt.start("nr-uuid", env={"PUBKEY": sys.argv[2]})
    print(port, ca.cert_path, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await edge.close()
    await rt.close()

asyncio.run(main())
"""

    def test_ssh_as_root_logs_in_as_the_daemons_own_uid(self, tmp_path: Path) -> None:
        user = "ukcprobe" + secrets.token_hex(3)
        subprocess.run(["useradd", "-M", "-s", "/usr/sbin/nologin", user], check=True)
        root = Path(tempfile.mkdtemp(prefix="ukc-nonroot-"))
        try:
            uid = pwd.getpwnam(user).pw_uid
            os.chown(root, uid, -1)
            (tmp_path / "k").mkdir()
            key = tmp_path / "k" / "id"
            subprocess.run(
                ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True
            )
            script = root / "run.py"
            script.write_text(self.SCRIPT)
            proc = subprocess.Popen(
                ["runuser", "-u", user, "--", PY_FOR_USER, str(script), str(root),
                 key.with_suffix(".pub").read_text().strip()],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, cwd=str(REPO), env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)},
            )  # fmt: skip
            try:
                assert proc.stdout is not None
                line = proc.stdout.readline()
                assert line, proc.stderr.read() if proc.stderr else ""
                port, ca = line.split()
                fqdn = "nonroot.local.ukc.localhost"
                probe = "whoami; id -u; pwd; touch /workspace/f"
                out = subprocess.run(
                    ssh_argv(key, int(port), fqdn, Path(ca), probe),
                    capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
                )  # fmt: skip
                assert out.returncode == 0, out.stderr
                assert out.stdout.split() == ["root", str(uid), "/root"]
                ws_file = root / "state" / "workspaces" / "nr-uuid" / "f"
                assert ws_file.stat().st_uid == uid
            finally:
                proc.communicate("\n", timeout=30)
        finally:
            subprocess.run(["userdel", user], check=False)
            shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _control_dirs_dropped(rt: SandboxRuntime) -> Iterator[None]:
    """The runtime of a failed start is never closed: its control dirs go here."""
    try:
        yield
    finally:
        drop_control_dirs(rt.layout)
