#!/usr/bin/env python3
"""ukc's sync with and without `sync.compress` against rsync -az, over a rate-limited link.

    .venv/bin/python bench/link_bench.py [--mbit 20] [--runs 2] [--small 2000] [--big 5]

The local metro's loopback has no bandwidth limit, so there compressing the content only adds
CPU. This bench puts a throttling TCP proxy (`Link`: one bottleneck per direction, shared by
every connection, paced at `--mbit`) between the clients and the metro's TLS edge, and times
through it, in alternating order per run, on a fresh sandbox each:

- rsync: `rsync -az --delete` of the tree (the `sync_bench` baseline command), then its
  sync-back into an empty directory;
- ukc off / on: the engine's connect + push of the tree, then connect + pull of all of it
  (`SyncOptions.compress` False / True).

The tree is `treegen`'s (2,000 text-like files + five incompressible 8 MiB files by default).
Prints key=value lines: medians of each side's seconds, and the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sync_bench import Metro, rsync_cmd, timed, wait_engine_ready, wait_rsync_ready
from treegen import gen_tree

from reconciler.cloud.trust import edge_address
from reconciler.local import daemon
from reconciler.sync import engine
from reconciler.sync.options import SyncOptions
from reconciler.transport import sshclient as ssh_backend
from reconciler.transport.keys import generate_keypair
from reconciler.transport.tls import Dialer

_PIECE = 16 << 10


class Pacer:
    """One direction of the link: bytes leave at most at `rate` bytes a second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.lock = threading.Lock()
        self.free_at = 0.0

    def wait(self, n: int) -> None:
        with self.lock:
            now = time.monotonic()
            start = max(now, self.free_at)
            self.free_at = start + n / self.rate
        if start > now:
            time.sleep(start - now)


class Link:
    """A TCP proxy on 127.0.0.1 to `target`, paced both ways (a thread per direction)."""

    def __init__(self, target: tuple[str, int], mbit: float) -> None:
        self.target = target
        self.up = Pacer(mbit * 1e6 / 8)
        self.down = Pacer(mbit * 1e6 / 8)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(client, server, self.up), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(server, client, self.down), daemon=True
            ).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, pacer: Pacer) -> None:
        try:
            while True:
                data = src.recv(_PIECE)
                if not data:
                    break
                pacer.wait(len(data))
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.sock.close()


def rsync_side(metro: Metro, link: Link, tree: Path, work: Path, k: int) -> dict[str, float]:
    rs = work / f"rs{k}"
    rs.mkdir()
    key = rs / "key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    name = f"link-rsync-{k}-{os.getpid()}"
    inst = metro.create(name, key.with_suffix(".pub").read_text().strip())
    try:
        fqdn = inst["service_group"]["domains"][0]["fqdn"]
        wait_rsync_ready(metro, key, fqdn)
        metro.info.edge_ports[2222], real = link.port, metro.info.edge_ports[2222]
        try:
            dst = f"root@{fqdn}:/workspace/"
            out = {"rsync_initial_s": timed(rsync_cmd(metro, key, fqdn, f"{tree}/", dst))}
            back = rs / "back"
            out["rsync_from_s"] = timed(rsync_cmd(metro, key, fqdn, dst, f"{back}/"))
        finally:
            metro.info.edge_ports[2222] = real
        shutil.rmtree(back)
        return out
    finally:
        metro.delete(name)


def ukc_side(
    metro: Metro, link: Link, tree: Path, work: Path, k: int, compress: bool
) -> dict[str, float]:
    tag = "on" if compress else "off"
    w = work / f"ukc{k}{tag}"
    w.mkdir()
    key = w / "key"
    pub = generate_keypair(key)
    name = f"link-ukc-{k}-{tag}-{os.getpid()}"
    inst = metro.create(name, pub)
    try:
        fqdn = inst["service_group"]["domains"][0]["fqdn"]
        wait_engine_ready(metro, fqdn, key)
        dialer = Dialer.with_ca(metro.info.ca_path, edge_address("127.0.0.1", {2222: link.port}))
        opts = SyncOptions(local_root=tree, state_dir=w / "state", compress=compress)
        os.sync()
        t0 = time.perf_counter()
        shell = ssh_backend.SshShell.connect(dialer, fqdn, key_path=key)
        try:
            engine.push(shell, opts, instance_uuid=inst["uuid"])
        finally:
            shell.close()
        out = {f"ukc_{tag}_initial_s": time.perf_counter() - t0}
        back = w / "back"
        back.mkdir()
        top = tuple(sorted(p.name + ("/" if p.is_dir() else "") for p in tree.iterdir()))
        pull_opts = SyncOptions(
            local_root=back, state_dir=w / "pullstate", back=top, compress=compress
        )
        os.sync()
        t0 = time.perf_counter()
        shell = ssh_backend.SshShell.connect(dialer, fqdn, key_path=key)
        try:
            got = engine.pull(shell, pull_opts)
        finally:
            shell.close()
        out[f"ukc_{tag}_from_s"] = time.perf_counter() - t0
        if got.files_written != sum(1 for p in tree.rglob("*") if p.is_file()):
            raise SystemExit(f"sync-back brought {got.files_written} files")
        shutil.rmtree(back)
        return out
    finally:
        metro.delete(name)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mbit", type=float, default=20.0, help="the link's rate each way")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--small", type=int, default=2000)
    ap.add_argument("--big", type=int, default=5)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ukc-link-bench-"))
    state = work / "metro"
    try:
        metro = Metro(state)
        link = Link((metro.info.edge_host, metro.info.edge_ports[2222]), a.mbit)
        tree = work / "tree"
        size = gen_tree(tree, n_small=a.small, n_big=a.big)
        sides: list[Any] = [
            lambda k: rsync_side(metro, link, tree, work, k),
            lambda k: ukc_side(metro, link, tree, work, k, False),
            lambda k: ukc_side(metro, link, tree, work, k, True),
        ]
        runs: list[dict[str, float]] = []
        for k in range(a.runs):
            out: dict[str, float] = {}
            order = sides[k % 3 :] + sides[: k % 3]  # each side goes first in turn
            for side in order if k % 2 == 0 else order[::-1]:
                out.update(side(k))
            print(f"# run {k}: " + " ".join(f"{x}={v:.3f}" for x, v in sorted(out.items())))
            runs.append(out)
        med = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        print(f"# runs={a.runs} mbit={a.mbit:g} nproc={os.cpu_count()} bytes={size}")
        for key in sorted(med):
            print(f"{key}={med[key]:.3f}")
        for what in ("initial", "from"):
            r = med[f"rsync_{what}_s"]
            off, on = med[f"ukc_off_{what}_s"], med[f"ukc_on_{what}_s"]
            print(f"ratio_off_{what}={off / r:.2f}")
            print(f"ratio_on_{what}={on / r:.2f}")
            print(f"on_vs_off_{what}={on / off:.2f}")
        link.close()
    finally:
        daemon.stop(state)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
