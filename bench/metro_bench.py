"""Local metro figures: daemon start, create → sshd accepting through the edge, list of 1000.

Prints one `name value` line per figure (seconds):
  daemon_start_s               ensure_running() on a fresh state dir
  create_to_sshd_accepting_s   POST /v1/instances (autostart) until the SSH banner arrives
                               through the TLS edge on public port 2222 (SNI = the FQDN)
  ssh_connect_s                TLS + SSH handshake + key auth through the edge (`SshShell`),
                               median of 5
  ssh_first_exec_s             then the connection's first command (`true`): channel open,
                               exec, exit status; median of 5
  list_1000_s                  GET /v1/instances over 1000 instances, median of 5
Targets: < 1 s, < 1 s, < 0.1 s (connect and first exec: no target; they are what every sync
and command pays). Everything runs on loopback in a tmp state dir and is
stopped at the end.

    /tmp/venv/bin/python bench/metro_bench.py
"""

from __future__ import annotations

import socket
import ssl
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

from reconciler.cloud.trust import edge_address
from reconciler.local import daemon as metro_daemon
from reconciler.local.daemon import MetroInfo
from reconciler.transport.keys import generate_keypair
from reconciler.transport.sshclient import SshShell
from reconciler.transport.tls import Dialer


def _ssh_figures(info: MetroInfo, fqdn: str, key: Path) -> tuple[float, float]:
    """Median connect time and median first-command time over 5 fresh connections."""
    dialer = Dialer.with_ca(info.ca_path, edge_address(info.edge_host, info.edge_ports))
    connects, firsts = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        shell = SshShell.connect(dialer, fqdn, key_path=key)
        t1 = time.perf_counter()
        try:
            proc = shell.start("true")
            proc.close_stdin()
            if proc.wait(10) != 0:
                raise SystemExit("`true` failed in the sandbox")
        finally:
            t2 = time.perf_counter()
            shell.close()
        connects.append(t1 - t0)
        firsts.append(t2 - t1)
    return statistics.median(connects), statistics.median(firsts)


def _banner(info: MetroInfo, fqdn: str, deadline: float) -> bool:
    ctx = ssl.create_default_context(cafile=str(info.ca_path))
    while time.monotonic() < deadline:
        try:
            with (
                socket.create_connection((info.edge_host, info.edge_ports[2222]), timeout=2) as raw,
                ctx.wrap_socket(raw, server_hostname=fqdn) as tls,
            ):
                tls.settimeout(2)
                if tls.recv(64).startswith(b"SSH-"):
                    return True
        except (OSError, ssl.SSLError):
            pass
        time.sleep(0.01)
    return False


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="metro-bench-") as tmp:
        sd = Path(tmp) / "metro"
        key = Path(tmp) / "key"
        t0 = time.perf_counter()
        info = metro_daemon.ensure_running(sd)
        print(f"daemon_start_s {time.perf_counter() - t0:.3f}", flush=True)
        try:
            with httpx.Client(
                base_url=info.api_url,
                headers={"Authorization": f"Bearer {info.token}"},
                timeout=60,
            ) as api:
                name = f"bench-{uuid.uuid4().hex[:8]}"
                body = {
                    "name": name,
                    "image": "ukc/local-sandbox:latest",
                    "autostart": True,
                    "env": {"PUBKEY": generate_keypair(key)},
                    "service_group": {
                        "services": [{"port": 2222, "destination_port": 2222, "handlers": ["tls"]}]
                    },
                }
                t0 = time.perf_counter()
                r = api.post("/v1/instances", json=body)
                fqdn = r.json()["data"]["instances"][0]["service_group"]["domains"][0]["fqdn"]
                ok = _banner(info, fqdn, time.monotonic() + 30)
                took = time.perf_counter() - t0
                print(f"create_to_sshd_accepting_s {took:.3f}" + ("" if ok else " (failed)"))
                if ok:
                    connect_s, first_s = _ssh_figures(info, fqdn, key)
                    print(f"ssh_connect_s {connect_s:.3f}")
                    print(f"ssh_first_exec_s {first_s:.3f}", flush=True)
                api.request("DELETE", "/v1/instances", json=[{"name": name, "timeout_s": 10}])

                for i in range(1000):
                    api.post(
                        "/v1/instances",
                        json={"name": f"list-{i:04d}", "image": "x", "autostart": False},
                    )
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    r = api.get("/v1/instances")
                    n = len(r.json()["data"]["instances"])
                    times.append(time.perf_counter() - t0)
                assert n >= 1000, n
                print(f"list_1000_s {statistics.median(times):.4f}", flush=True)
        finally:
            metro_daemon.stop(sd)
    return 0


if __name__ == "__main__":
    sys.exit(main())
