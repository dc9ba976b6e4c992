#!/usr/bin/env python3
"""Sync engine vs rsync on the same TLS-SSH path, side by side in one run.

The path is the baseline's (/work/shared/bench/rsync_baseline.sh): sshd in bubblewrap with the
remote dir at /workspace, an empty $HOME and a private /run, behind tls_forward.py (the TLS
front). rsync goes through `ssh -o ProxyCommand='openssl s_client ...'` (`-az --delete`, as
the original workflow); the engine goes through `SshShell` (paramiko over the same TLS front).
Every engine figure includes the TLS + SSH handshake (connect, sync, close), like one rsync
call; `engine_modified_oneshot_s` also includes a fresh interpreter and its imports.

Usage: python bench/sync_ssh_bench.py [--runs N] [--shared DIR]   (root or a user with bwrap)
Prints key=value lines (medians) and ratio_* = engine / rsync.
"""

# ruff: noqa: E402, B023  (bench script: sys.path set up first; lambdas run immediately)
from __future__ import annotations

import argparse
import os
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from sync_local_bench import PY, timed
from treegen import gen_tree, modify_tree

from reconciler.sync.engine import SyncOptions, pull, push
from reconciler.transport.keys import generate_keypair
from reconciler.transport.sshclient import SshShell
from reconciler.transport.tls import Dialer

FQDN = "localhost"


def start_world(w: Path, shared: Path) -> tuple[list[subprocess.Popen[bytes]], int, Path]:
    cfg = w / "cfg"
    cfg.mkdir()
    (w / "remote").mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(cfg / "hostkey")], check=True
    )
    (cfg / "authorized_keys").write_text(generate_keypair(cfg / "clientkey") + "\n")
    with FreePort() as port:
        sshd_port = port
    (cfg / "sshd.conf").write_text(
        "ListenAddress 127.0.0.1\nHostKey /sshcfg/hostkey\n"
        "AuthorizedKeysFile /sshcfg/authorized_keys\nPubkeyAuthentication yes\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\nStrictModes no\nPidFile none\n"
        "MaxStartups 100\nLogLevel ERROR\n"
    )
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)
    home = os.environ.get("HOME", "/root")
    sshd = subprocess.Popen(
        [
            "bwrap",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/sbin",
            "/sbin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--ro-bind",
            "/etc",
            "/etc",
            "--dev",
            "/dev",
            "--proc",
            "/proc",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/run",
            "--dir",
            "/run/sshd",
            "--dir",
            "/var/empty",
            "--dir",
            home,
            "--ro-bind",
            str(cfg),
            "/sshcfg",
            "--bind",
            str(w / "remote"),
            "/workspace",
            "--chdir",
            "/workspace",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--hostname",
            "sandbox",
            "--die-with-parent",
            "/usr/sbin/sshd",
            "-D",
            "-e",
            "-f",
            "/sshcfg/sshd.conf",
            "-p",
            str(sshd_port),
        ],
        stderr=subprocess.DEVNULL,
    )
    fwd = subprocess.Popen(
        [
            sys.executable,
            str(shared / "tls_forward.py"),
            "--listen",
            "127.0.0.1:0",
            "--target",
            f"127.0.0.1:{sshd_port}",
            "--certdir",
            str(w / "tls"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert fwd.stdout is not None
    line = fwd.stdout.readline().decode()
    if not line.startswith("LISTENING"):
        raise SystemExit(f"tls forwarder did not start: {line!r}")
    tls_port = int(line.split()[2])
    return [fwd, sshd], tls_port, cfg


class FreePort:
    def __enter__(self) -> int:
        import socket

        self.s = socket.socket()
        self.s.bind(("127.0.0.1", 0))
        port: int = self.s.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--shared", default="/work/shared/bench")
    args = ap.parse_args()
    w = Path(tempfile.mkdtemp(prefix="sync_ssh_bench."))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs, tls_port, cfg = start_world(w, Path(args.shared))
        ctx = ssl.create_default_context(cafile=str(w / "tls" / "tls.crt"))
        ctx.check_hostname = False  # the forwarder's self-signed cert; bench only
        dialer = Dialer(ctx, lambda fqdn, port: ("127.0.0.1", tls_port))
        key = cfg / "clientkey"
        user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
        ssh = (
            f"ssh -F /dev/null -i {key} -o IdentitiesOnly=yes -o UserKnownHostsFile=/dev/null "
            "-o StrictHostKeyChecking=no -o BatchMode=yes -o LogLevel=ERROR -o ProxyCommand="
            f"'openssl s_client -quiet -verify_quiet -connect 127.0.0.1:{tls_port} 2>/dev/null'"
        )
        deadline = time.monotonic() + 20
        while subprocess.run(f"{ssh} {user}@sandbox true", shell=True).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("ssh through the TLS front never worked")
            time.sleep(0.1)

        def rsync(src: str, dst: str) -> None:
            subprocess.run(["rsync", "-az", "--delete", "-e", ssh, src, dst], check=True)

        def engine(op: object) -> None:
            with SshShell.connect(dialer, FQDN, key_path=key, user=user) as shell:
                op(shell)  # type: ignore[operator]

        runs: list[dict[str, float]] = []
        for k in range(args.runs):
            r: dict[str, float] = {}
            run_dir = w / f"run{k}"
            src = run_dir / "src"
            gen_tree(src)
            o = SyncOptions(
                local_root=src,
                state_dir=run_dir / "state",
                remote_root=f"/workspace/sess_engine_{k}",
                remote_state_dir=f"/run/ukc-sync-{k}",
                remote_python=PY,
            )
            rdst = f"{user}@sandbox:/workspace/sess_rsync_{k}/"
            results = []
            r["engine_initial_s"] = timed(
                lambda: engine(lambda sh: results.append(push(sh, o, instance_uuid="b")))
            )
            r["rsync_initial_s"] = timed(lambda: rsync(f"{src}/", rdst))
            r["engine_nochange_s"] = timed(
                lambda: engine(lambda sh: results.append(push(sh, o, instance_uuid="b")))
            )
            r["rsync_nochange_s"] = timed(lambda: rsync(f"{src}/", rdst))
            nc = results[-1]
            print(
                f"# run {k}: nochange files_sent={nc.files_sent} bytes_sent={nc.bytes_sent} "
                f"remote_scanned={nc.remote_scanned}",
                flush=True,
            )
            modify_tree(src)
            r["engine_modified_s"] = timed(
                lambda: engine(lambda sh: results.append(push(sh, o, instance_uuid="b")))
            )
            r["rsync_modified_s"] = timed(lambda: rsync(f"{src}/", rdst))
            modify_tree(src)
            oneshot = (
                "import sys, ssl\nfrom pathlib import Path\n"
                "from reconciler.transport.sshclient import SshShell\n"
                "from reconciler.transport.tls import Dialer\n"
                "from reconciler.sync.engine import SyncOptions, push\n"
                f"ctx = ssl.create_default_context(cafile={str(w / 'tls' / 'tls.crt')!r})\n"
                "ctx.check_hostname = False\n"
                f"d = Dialer(ctx, lambda f, p: ('127.0.0.1', {tls_port}))\n"
                f"o = SyncOptions(local_root=Path({str(src)!r}), "
                f"state_dir=Path({str(o.state_dir)!r}), remote_root={o.remote_root!r}, "
                f"remote_state_dir={o.remote_state_dir!r}, remote_python={PY!r})\n"
                f"with SshShell.connect(d, 'localhost', key_path=Path({str(key)!r}), "
                f"user={user!r}) as sh:\n"
                "    push(sh, o, instance_uuid='b')\n"
            )
            env = dict(os.environ, PYTHONPATH=str(HERE.parent))
            r["engine_modified_oneshot_s"] = timed(
                lambda: subprocess.run([sys.executable, "-c", oneshot], check=True, env=env)
            )
            r["rsync_modified_oneshot_s"] = timed(lambda: rsync(f"{src}/", rdst))
            back = run_dir / "back_engine"
            back.mkdir()
            po = SyncOptions(
                local_root=back,
                state_dir=run_dir / "state_pull",
                back=(f"sess_engine_{k}/",),
                remote_root="/workspace",
                remote_state_dir=f"/run/ukc-sync-pull-{k}",
                remote_python=PY,
            )
            r["engine_pull_s"] = timed(lambda: engine(lambda sh: pull(sh, po)))
            # the same with file-creation thread pools (write_threads=4), for comparison
            (run_dir / "back_t0").mkdir()
            po0 = replace(
                po, local_root=run_dir / "back_t0", state_dir=run_dir / "st_t0", write_threads=4
            )
            r["engine_pull_t4_s"] = timed(lambda: engine(lambda sh: pull(sh, po0)))
            o0 = replace(
                o, remote_root=f"/workspace/sess_t0_{k}", state_dir=run_dir / "st0", write_threads=4
            )
            r["engine_initial_t4_s"] = timed(
                lambda: engine(lambda sh: push(sh, o0, instance_uuid="b"))
            )
            r["rsync_from_s"] = timed(lambda: rsync(rdst, f"{run_dir / 'back_rsync'}/"))
            same = subprocess.run(
                ["diff", "-r", str(src), str(back / f"sess_engine_{k}")], capture_output=True
            )
            if same.returncode != 0:
                raise SystemExit("engine round trip differs from the source tree")
            print(
                "# run {}: {}".format(k, " ".join(f"{a}={b:.3f}" for a, b in r.items())), flush=True
            )
            runs.append(r)
            shutil.rmtree(run_dir, ignore_errors=True)
        med = {key: statistics.median(x[key] for x in runs) for key in runs[0]}
        for key, value in med.items():
            print(f"{key}={value:.3f}")
        for name in ("initial", "nochange", "modified", "modified_oneshot"):
            print(f"ratio_{name}={med[f'engine_{name}_s'] / med[f'rsync_{name}_s']:.2f}")
        print(f"ratio_pull={med['engine_pull_s'] / med['rsync_from_s']:.2f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(w, ignore_errors=True)


if __name__ == "__main__":
    main()
