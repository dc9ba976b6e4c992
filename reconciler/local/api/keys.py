"""What the local metro's aiohttp application carries for its handlers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from reconciler.local.faults import Faults
from reconciler.local.state.lifecycle import LocalMetro

__all__ = ["FAULTS", "METRO", "SESSIONS", "SHUTDOWN", "STARTED", "STATUS_EXTRA", "TOKEN"]

METRO: web.AppKey[LocalMetro] = web.AppKey("metro", LocalMetro)
FAULTS: web.AppKey[Faults] = web.AppKey("faults", Faults)
TOKEN: web.AppKey[str] = web.AppKey("token", str)
SHUTDOWN: web.AppKey[Callable[[], None]] = web.AppKey("shutdown")
STATUS_EXTRA: web.AppKey[Callable[[], dict[str, Any]]] = web.AppKey("status_extra")
#: plugin proxy client sessions, one per sandbox plugin socket
SESSIONS: web.AppKey[dict[Path, aiohttp.ClientSession]] = web.AppKey("sessions", dict)
#: when the request arrived (perf_counter), for `op_time_us`
STARTED: web.RequestKey[float] = web.RequestKey("t0", float)
