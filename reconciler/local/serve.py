"""The local metro daemon: its parts composed and run until shutdown.

`python -m reconciler.local serve` runs `serve()`: the platform API (`api`) over the instances
(`state`), the sandbox runtime (`sandbox`), the TLS edge and the CA, with `/_local/shutdown`,
SIGTERM and SIGINT leading to a graceful shutdown. `metro.json` tells clients where it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import stat
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from reconciler._util.atomic import create_atomic, write_atomic
from reconciler.errors import LocalMetroError
from reconciler.local.api.app import create_app
from reconciler.local.behaviour import from_env as behaviour_from_env
from reconciler.local.ca import CertificateAuthority
from reconciler.local.daemon import check_prerequisites, private_dir
from reconciler.local.edge import Edge, Route
from reconciler.local.faults import Faults
from reconciler.local.sandbox.pidns import become_subreaper
from reconciler.local.sandbox.runtime import DEFAULT_MAX_PIDS, SandboxRuntime
from reconciler.local.state.lifecycle import LocalMetro
from reconciler.local.state.records import DEFAULT_APP_DOMAIN
from reconciler.local.state.validation import MetroLimits

__all__ = ["EDGE_HOST", "load_or_create_token", "serve"]

EDGE_HOST = "127.0.0.1"
_DEFAULT_PORTS = (2222, 443)


def load_or_create_token(state_dir: Path) -> str:
    """The API bearer token, created once in `state_dir/token` (0600)."""
    path = state_dir / "token"
    fresh = secrets.token_urlsafe(32)
    if create_atomic(path, (fresh + "\n").encode(), mode=0o600):
        return fresh
    if stat.S_IMODE(os.lstat(path).st_mode) & 0o077:
        os.chmod(path, 0o600)
    token = path.read_text().strip()
    if not token:
        raise LocalMetroError(f"token file {path} is empty")
    return token


async def serve(
    state_dir: Path,
    *,
    port: int = 0,
    app_domain: str | None = None,
    limits: MetroLimits | None = None,
    max_pids: int | None = None,
) -> None:
    """Run the metro until /_local/shutdown, SIGTERM or SIGINT."""
    app_domain = app_domain or DEFAULT_APP_DOMAIN
    check_prerequisites()
    # why: a sandbox whose bwrap dies before its pid 1 leaves that pid 1 to be reaped; as a
    # subreaper the daemon reaps it at once instead of the host's init, whenever that runs
    if not become_subreaper():
        print("sandboxes: not a child subreaper; host init reaps orphaned sandboxes", flush=True)
    state_dir = state_dir.resolve()
    private_dir(state_dir)
    # why: belt and braces under the private state dir; the workspaces are the sandboxes' files
    for sub in ("workspaces", "sandboxes"):
        private_dir(state_dir / sub)
    token = load_or_create_token(state_dir)
    loop = asyncio.get_running_loop()
    metro = LocalMetro(
        state_dir, app_domain=app_domain, limits=limits, behaviour=behaviour_from_env(os.environ)
    )
    metro.bind_loop(loop)
    runtime = SandboxRuntime(
        state_dir, on_exit=metro.on_exit, max_pids=max_pids or DEFAULT_MAX_PIDS
    )
    metro.runtime = runtime
    ca = CertificateAuthority.load_or_create(state_dir, app_domain)
    faults = Faults()
    started_at = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    async def resolve(fqdn: str, public_port: int) -> Route | None:
        found = await metro.route_for(fqdn, public_port)
        return None if found is None else Route(uuid=found[0], destination_port=found[1])

    edge = Edge(
        ca=ca,
        runtime=runtime,
        resolve=resolve,
        on_activity=metro.on_activity,
        should_drop=faults.take_edge_drop,
        host=EDGE_HOST,
        gateway_timeout=lambda: metro.behaviour.gateway_timeout_s,
    )
    stop_event = asyncio.Event()
    api_port = 0

    def write_metro_json() -> None:
        data = {
            "pid": os.getpid(),
            "api_url": f"http://127.0.0.1:{api_port}",
            "ca": str(ca.cert_path),
            "app_domain": app_domain,
            "edge_host": EDGE_HOST,
            "edge_ports": {str(k): v for k, v in sorted(edge.ports.items())},
            "started_at": started_at,
            "sandbox": sandbox_line,
        }
        write_atomic(state_dir / "metro.json", (json.dumps(data, indent=2) + "\n").encode())

    async def open_ports(ports: set[int]) -> None:
        new = ports - set(edge.ports)
        for p in sorted(new):
            await edge.open_port(p)
        if new and api_port:
            write_metro_json()

    metro.on_ports = open_ports
    metro.load()
    sandbox_line = runtime.describe()
    print(f"sandboxes: {sandbox_line}", flush=True)
    # why: a delete whose teardown a stop or a kill cut short left files no record names
    await runtime.prune(metro.records)
    await metro.prune_volumes()
    app = create_app(
        metro,
        faults,
        token,
        shutdown=stop_event.set,
        status_extra=lambda: {
            "edge_ports": {str(k): v for k, v in edge.ports.items()},
            "sandbox": sandbox_line,
        },
    )
    # why: open waits (timeout -1) must not hold a shutdown for aiohttp's default 60 s
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    api_port = int(runner.addresses[0][1])
    await open_ports(set(_DEFAULT_PORTS) | metro.index.public_ports())
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    await metro.resume()
    write_metro_json()
    print(f"local metro listening on 127.0.0.1:{api_port} (pid {os.getpid()})", flush=True)
    try:
        await stop_event.wait()
    finally:
        print("local metro shutting down", flush=True)
        await runner.cleanup()
        await metro.close()
        await edge.close()
        await runtime.close()
        await runtime.prune(metro.records)
        with contextlib.suppress(FileNotFoundError):
            (state_dir / "metro.json").unlink()
