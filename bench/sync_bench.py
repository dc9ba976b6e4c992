#!/usr/bin/env python3
"""ukc's sync against the rsync-over-TLS-SSH baseline, side by side on local-metro sandboxes.

    .venv/bin/python bench/sync_bench.py [--runs 4] [--rss]

Both sides reach a sandbox the way UKC exposes it: TLS on public port 2222 at the metro's edge
(SNI = the instance FQDN), SSH inside. rsync uses the original workflow's command
(`rsync -az --delete` with an `openssl s_client` ProxyCommand), a fresh process per call; ukc is
measured as a user runs it (`ukc apply`, a fresh process, forked by the warm process a first
command starts; `ukc_modified_cold_s` is the same apply with UKC_WARM=0) and, where the issue
asks for counters, through the engine. The tree is the baseline's (bench/treegen.py: 2,000
small files + 5 × 8 MiB, 59.5 MB, seeded). Each run makes fresh sandboxes for both sides;
figures are medians.

Prints key=value lines: rsync_* and ukc_* seconds, their ratios, the no-change counters, and
with --rss the peak RSS of a 1 GiB push (a child process); a header names the filesystem.
The work dir is under $TMPDIR: file creation dominates the initial sync and the sync-back, so
run it where the filesystem is in a known state (see `describe_fs`), e.g. a fresh journaled
ext4 (`truncate -s 8G img; mkfs.ext4 -q img; mount -o loop img /mnt/jfs; TMPDIR=/mnt/jfs`).
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_local_bench import peak_rss_kib
from treegen import gen_tree, modify_tree

import reconciler as reconciler_pkg
from reconciler.cli import warm
from reconciler.cloud.trust import edge_address
from reconciler.local import daemon
from reconciler.spec.models import DEFAULT_LOCAL_IMAGE, DEFAULT_MEMORY_MB
from reconciler.sync import engine
from reconciler.sync.options import SyncOptions
from reconciler.transport import sshclient as ssh_backend
from reconciler.transport.keys import generate_keypair
from reconciler.transport.tls import Dialer

#: why even: runs alternate which side goes first, and the side that runs second pays for fresh
#: memory (both sandboxes share this machine's; measured in PROFILE.md, session 30): an odd
#: count gives one side that disadvantage more often
EVEN_RUNS = "an even number: each order of the two sides equally often"

SERVICES = {"services": [{"port": 2222, "destination_port": 2222, "handlers": ["tls"]}]}
S2Z = {"policy": "on", "stateful": True, "cooldown_time_ms": 5000}


class Metro:
    def __init__(self, state: Path) -> None:
        self.info = daemon.ensure_running(state)
        self.http = httpx.Client(
            base_url=self.info.api_url,
            headers={"Authorization": f"Bearer {self.info.token}"},
            timeout=60,
        )

    def create(self, name: str, pubkey: str, image: str = DEFAULT_LOCAL_IMAGE) -> dict[str, Any]:
        body = {
            "name": name,
            "image": image,
            # ukc's default, the original workflow's: /workspace lives in this memory
            "memory_mb": DEFAULT_MEMORY_MB,
            "env": {"PUBKEY": pubkey},
            "service_group": SERVICES,
            "scale_to_zero": S2Z,
            "autostart": True,
        }
        self.http.post("/v1/instances", json=body).raise_for_status()
        self.http.request(
            "GET", "/v1/instances/wait", json=[{"name": name, "state": "running", "timeout_s": 30}]
        )
        got = self.http.get("/v1/instances", params={"name": name}).json()
        inst: dict[str, Any] = got["data"]["instances"][0]
        return inst

    def delete(self, name: str) -> None:
        self.http.request("DELETE", "/v1/instances", json=[{"name": name}])

    def dialer(self) -> Dialer:
        return Dialer.with_ca(
            self.info.ca_path, edge_address(self.info.edge_host, self.info.edge_ports)
        )


def timed(argv: list[str], **kw: Any) -> float:
    os.sync()  # start every timed phase with no dirty pages of the previous one in flight
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, **kw)
    return time.perf_counter() - t0


def rsync_cmd(metro: Metro, key: Path, fqdn: str, src: str, dst: str) -> list[str]:
    port = metro.info.edge_ports[2222]
    proxy = (
        f"openssl s_client -quiet -verify_quiet -CAfile {metro.info.ca_path} "
        f"-servername {fqdn} -connect {metro.info.edge_host}:{port} 2>/dev/null"
    )
    ssh = (
        f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile=/dev/null "
        f"-o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR "
        f"-o ProxyCommand='{proxy}'"
    )
    return ["rsync", "-az", "--delete", "-e", ssh, src, dst]


def wait_rsync_ready(metro: Metro, key: Path, fqdn: str, timeout_s: float = 60) -> None:
    """Untimed: until rsync can list /workspace. The metro behaves like UKC: `running` comes
    before sshd listens and before the key is installed (the original workflow retries too)."""
    deadline = time.monotonic() + timeout_s
    argv = rsync_cmd(metro, key, fqdn, f"root@{fqdn}:/workspace/", "")[:-1]
    argv.insert(1, "--list-only")
    while subprocess.run(argv, capture_output=True).returncode != 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"rsync could not reach {fqdn} in {timeout_s:g} s")
        time.sleep(0.1)


def wait_engine_ready(metro: Metro, fqdn: str, key: Path, timeout_s: float = 60) -> None:
    """Untimed: until the sandbox takes the key (sshd and the key come after `running`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=key).close()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def one_run(
    metro: Metro, work: Path, env: dict[str, str], k: int, cleanup: list[Any]
) -> dict[str, float]:
    """Both sides once; odd runs measure ukc first, so neither always inherits the other's
    dirty page cache."""
    out: dict[str, float] = {}
    sides = [rsync_side, ukc_side] if k % 2 == 0 else [ukc_side, rsync_side]
    for side in sides:
        out.update(side(metro, work, env, k, cleanup))
    return out


def rsync_side(
    metro: Metro, work: Path, env: dict[str, str], k: int, cleanup: list[Any]
) -> dict[str, float]:
    out: dict[str, float] = {}
    rs = work / f"rs{k}"
    src = rs / "src"
    src.mkdir(parents=True)
    gen_tree(src)
    key = rs / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"rsync-bench-{k}-{os.getpid()}"
    inst = metro.create(name, key.with_suffix(".pub").read_text().strip())
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    dst = f"root@{fqdn}:/workspace/"
    wait_rsync_ready(metro, key, fqdn)
    out["rsync_initial_s"] = timed(rsync_cmd(metro, key, fqdn, f"{src}/", dst))
    out["rsync_nochange_s"] = timed(rsync_cmd(metro, key, fqdn, f"{src}/", dst))
    modify_tree(src)
    out["rsync_modified_s"] = timed(rsync_cmd(metro, key, fqdn, f"{src}/", dst))
    back = rs / "back"
    out["rsync_from_s"] = timed(rsync_cmd(metro, key, fqdn, dst, f"{back}/"))
    # Deleting thousands of files right before a timed phase slows the next file creations on
    # a journal-less ext4 (recently freed inodes are skipped): every delete waits for the end.
    cleanup.append(lambda: metro.delete(name))
    return out


def engine_initial(metro: Metro, tree: Path, work: Path, cleanup: list[Any]) -> float:
    """The engine alone on a fresh sandbox: connect + push of the whole tree, no process start
    (what `ukc watch` or a long-lived client pays for an initial sync)."""
    work.mkdir(parents=True)
    key = work / "key"
    pub = generate_keypair(key)
    name = f"engine-bench-{work.name}-{os.getpid()}"
    inst = metro.create(name, pub)
    cleanup.append(lambda: metro.delete(name))
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    opts = SyncOptions(local_root=tree, state_dir=work / "state")
    os.sync()
    t0 = time.perf_counter()
    wait_engine_ready(metro, fqdn, key)
    shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=key)
    try:
        engine.push(shell, opts, instance_uuid=inst["uuid"])
    finally:
        shell.close()
    return time.perf_counter() - t0


def ukc_side(
    metro: Metro, work: Path, env: dict[str, str], k: int, cleanup: list[Any]
) -> dict[str, float]:
    out: dict[str, float] = {}
    proj = work / f"ukc{k}"
    tree = proj / "tree"
    tree.mkdir(parents=True)
    (tree / "seed.txt").write_text("seed\n")
    # suspend: false: the bench reaches the sandbox over ssh between applies, and it
    # measures the sync, not a wake (rsync's sandbox is up throughout)
    (proj / "s.yaml").write_text("name: bench\ndirectory: ./tree\nsuspend: false\n")
    ukc = [sys.executable, "-m", "reconciler", "apply", "s.yaml"]
    timed(ukc, cwd=proj, env=env)  # creates the sandbox (not measured: rsync had its own)
    (tree / "seed.txt").unlink()
    gen_tree(tree)
    out["ukc_initial_s"] = timed(ukc, cwd=proj, env=env)
    out["ukc_nochange_s"] = timed(ukc, cwd=proj, env=env)
    out["ukc_engine_initial_s"] = engine_initial(metro, tree, work / f"eng{k}", cleanup)
    modify_tree(tree)
    out["ukc_modified_s"] = timed(ukc, cwd=proj, env=env)
    # the same again without the warm process (a user's first command, or UKC_WARM=0)
    modify_tree(tree)
    out["ukc_modified_cold_s"] = timed(ukc, cwd=proj, env={**env, "UKC_WARM": "0"})

    status = json.loads((proj / ".ukc" / "status.json").read_text())["sessions"]["bench"]
    fqdn = status["instance"]["fqdn"]
    uuid = status["instance"]["uuid"]
    keyp = proj / ".ukc" / "keys" / "bench"
    opts = SyncOptions(local_root=tree, state_dir=proj / ".ukc" / "sync" / "bench")
    # No change, the same sandbox booted once: prove it with the engine's counters.
    shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=keyp)
    try:
        t0 = time.perf_counter()
        res = engine.push(shell, opts, instance_uuid=uuid)
        out["ukc_push_nochange_s"] = time.perf_counter() - t0
        out["nochange_files_sent"] = res.files_sent
        out["nochange_bytes_sent"] = res.bytes_sent
        out["nochange_remote_scanned"] = int(res.remote_scanned)
    finally:
        shell.close()
    # Sync-back of the whole tree into an empty directory, connection included.
    back = proj / "back"
    back.mkdir()
    top = tuple(sorted(p.name + ("/" if p.is_dir() else "") for p in tree.iterdir()))
    pull_opts = SyncOptions(local_root=back, state_dir=proj / "pullstate", back=top)
    os.sync()
    t0 = time.perf_counter()
    shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=keyp)
    try:
        got = engine.pull(shell, pull_opts)
    finally:
        shell.close()
    out["ukc_from_s"] = time.perf_counter() - t0
    if got.files_written < 2005:
        raise SystemExit(f"sync-back brought {got.files_written} files, expected 2005")
    cleanup.append(
        lambda: subprocess.run(
            [sys.executable, "-m", "reconciler", "delete", "s.yaml"],
            cwd=proj,
            env=env,
            check=True,
            capture_output=True,
        )
    )
    return out


def rss_child(state: Path, work: Path) -> None:
    """Push a 1 GiB tree through the edge and print this process's peak RSS."""
    metro = Metro(state)
    tree = work / "gib"
    (tree / "big").mkdir(parents=True)
    chunk = os.urandom(1024 * 1024)
    for i in range(16):  # 16 × 64 MiB
        with open(tree / "big" / f"f{i:02d}.bin", "wb") as fh:
            for j in range(64):
                fh.write(chunk[j:] + chunk[:j])
    for i in range(200):
        (tree / f"small{i:03d}.txt").write_text("x" * 4096)
    key = work / "key"
    pub = generate_keypair(key)
    name = f"rss-bench-{os.getpid()}"
    inst = metro.create(name, pub)
    fqdn = inst["service_group"]["domains"][0]["fqdn"]
    before = peak_rss_kib()
    t0 = time.perf_counter()
    wait_engine_ready(metro, fqdn, key)
    shell = ssh_backend.SshShell.connect(metro.dialer(), fqdn, key_path=key)
    try:
        res = engine.push(
            shell, SyncOptions(local_root=tree, state_dir=work / "st"), instance_uuid=inst["uuid"]
        )
    finally:
        shell.close()
    elapsed = time.perf_counter() - t0
    peak = peak_rss_kib()
    metro.delete(name)
    print(f"gib_push_s={elapsed:.2f}")
    print(f"gib_push_bytes={res.bytes_sent}")
    print(f"gib_push_peak_rss_mb={peak / 1024:.1f}")
    print(f"gib_push_rss_before_mb={before / 1024:.1f}")


def describe_fs(path: Path) -> str:
    """The filesystem both sides write to, and whether ext4 keeps a journal there.

    why: on ext4 without a journal every new inode is searched past the inodes freed in the
    last minutes (`recently_deleted` in the kernel), so after a test run that deleted thousands
    of files both tools spend most of an initial sync allocating inodes; name it in the output.
    """
    best = ("", "?", "?")
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            mount_point = fields[4]
            sep = fields.index("-")
            fstype, source = fields[sep + 1], fields[sep + 2]
            inside = str(path) == mount_point or str(path).startswith(mount_point.rstrip("/") + "/")
            if inside and len(mount_point) > len(best[0]):
                best = (mount_point, fstype, source)
    mount_point, fstype, source = best
    journal = ""
    if fstype == "ext4":
        dev = os.path.basename(source)
        has = (
            any(n.startswith(dev + "-") for n in os.listdir("/proc/fs/jbd2"))
            if os.path.isdir("/proc/fs/jbd2")
            else False
        )
        journal = f" journal={'yes' if has else 'no'}"
    return f"fs={fstype} source={source} mount={mount_point}{journal}"


def main() -> None:
    # Byte-compile ukc as `pip install` would: with PYTHONDONTWRITEBYTECODE set (as on these
    # machines) every fresh `ukc` process would otherwise recompile its modules from source.
    compileall.compile_dir(str(Path(reconciler_pkg.__file__).parent), quiet=1)
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=4, help=EVEN_RUNS)
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS of a 1 GiB push")
    ap.add_argument("--rss-child", nargs=2, metavar=("STATE", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rss_child:
        rss_child(Path(a.rss_child[0]), Path(a.rss_child[1]))
        return
    work = Path(tempfile.mkdtemp(prefix="ukc-sync-bench-"))
    state = work / "metro"
    env = {k: v for k, v in os.environ.items() if not k.startswith("UKC_")}
    env["UKC_LOCAL_STATE_DIR"] = str(state)
    # ukc as a user runs it a second time: its warm process is up (`ukc_modified_cold_s` is
    # measured without it). The bench's own, in a private dir, stopped at the end.
    env["UKC_WARM_DIR"] = str(work / "warm")
    warm_socket = warm.start(env)
    try:
        metro = Metro(state)
        cleanup: list[Any] = []
        runs = [one_run(metro, work, env, k, cleanup) for k in range(a.runs)]
        for step in cleanup:
            step()
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"# runs={a.runs} nproc={os.cpu_count()} tree=2000x1-16KiB+5x8MiB")
        print(f"# workdir={work} {describe_fs(work)}")
        for key in sorted(med):
            print(f"{key}={med[key]:.3f}" if key.endswith("_s") else f"{key}={int(med[key])}")
        for what in ("initial", "nochange", "modified", "from"):
            print(f"ratio_{what}={med[f'ukc_{what}_s'] / med[f'rsync_{what}_s']:.2f}")
        print(f"ratio_engine_initial={med['ukc_engine_initial_s'] / med['rsync_initial_s']:.2f}")
        print(f"ratio_modified_cold={med['ukc_modified_cold_s'] / med['rsync_modified_s']:.2f}")
        if a.rss:
            proc = subprocess.run(
                [sys.executable, __file__, "--rss-child", str(state), str(work / "rss")],
                check=True,
                capture_output=True,
                text=True,
            )
            print(proc.stdout.strip())
    finally:
        warm.request_stop(warm_socket)
        daemon.stop(state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
