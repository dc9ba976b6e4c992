"""Instance records of the local metro, their state machine and their persistence.

`Metro` owns every instance of the emulated metro: it validates create requests (the same
rules UKC enforces, so the controller meets the same refusals offline), drives the timed
transitions (`starting` → `running`, `stopping` → `stopped`, scale-to-zero → `standby`, restarts
by policy) by calling the sandbox runtime, and writes `instances.json` atomically.
`local.server` feeds it API requests and renders its records; `local.daemon` composes it with
the sandbox runtime and the TLS edge (which calls `resolve_route` and `on_activity`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from reconciler.errors import ApiError, LocalMetroError

__all__ = [
    "CODE_ALREADY_EXISTS",
    "CODE_INVALID",
    "CODE_NOT_FOUND",
    "CODE_QUOTA",
    "CODE_TIMED_OUT",
    "DEFAULT_APP_DOMAIN",
    "STATES",
    "STOP_CODE_OUT_OF_MEMORY",
    "STOP_REASON_APP_EXIT",
    "STOP_REASON_KERNEL",
    "STOP_REASON_PLATFORM",
    "STOP_REASON_SCALE_TO_ZERO",
    "STOP_REASON_USER",
    "InstanceRecord",
    "ItemError",
    "Metro",
    "MetroLimits",
    "Runtime",
    "ServiceSpec",
    "rfc3339",
]

DEFAULT_APP_DOMAIN = "local.ukc.localhost"

#: the only states the SDK accepts (ukc-api.md §7.10)
STATES = frozenset({"stopped", "starting", "running", "draining", "stopping", "standby", "deleted"})

# item error codes (ukc-api.md §3.1)
CODE_INVALID = 7
CODE_NOT_FOUND = 8
CODE_TIMED_OUT = 12
CODE_QUOTA = 19
CODE_ALREADY_EXISTS = 23

# stop_reason bitmask values (ukc-api.md §7.11)
STOP_REASON_USER = 15
STOP_REASON_SCALE_TO_ZERO = 39
STOP_REASON_APP_EXIT = 3
STOP_REASON_PLATFORM = 7
# why: an instance that runs out of memory is stopped by its own (guest) kernel, not by the
# user, the platform or its app: only the K bit (kernel exited, stop_code valid) is set, the
# value UKC documents as a kernel crash; exit_code stays unset as the app never exited
STOP_REASON_KERNEL = 1
# kernel stop code (ukc-api.md §7.11): reason PGFAULT (4), init level 127 (app running),
# errno ENOMEM (12) in bits 16-23
STOP_CODE_OUT_OF_MEMORY = 0x000C7F04

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_PLUGIN_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
# why: back-off of restart_policy (ukc-api.md §7.1), reset after 10 s of healthy running
_RESTART_BACKOFF_S = (0.0, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 300.0)
_HEALTHY_RESET_S = 10.0
_DEFAULT_COOLDOWN_MS = 1000


def rfc3339(ts: float) -> str:
    """Seconds since the epoch as the RFC 3339 `Z` form the SDK parses."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ItemError(ApiError):
    """One request item failed: rendered as an error item (or an HTTP error when `status`)."""


class Runtime(Protocol):
    """What the metro needs from the sandbox runtime (`local.sandbox.SandboxRuntime`)."""

    async def start(self, uuid: str, *, env: dict[str, str], memory_mb: int) -> str: ...

    async def stop(self, uuid: str) -> None: ...

    async def freeze(self, uuid: str) -> None: ...

    async def thaw(self, uuid: str) -> None: ...

    async def destroy(self, uuid: str) -> None: ...

    async def prune(self, keep: Iterable[str]) -> list[str]: ...

    def is_running(self, uuid: str) -> bool: ...

    def plugin_socket(self, uuid: str) -> Path: ...

    def console(self, uuid: str) -> bytes: ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class MetroLimits:
    """Quota-like bounds answered with item code 19."""

    min_memory_mb: int = 16
    max_memory_mb: int = 8192
    max_instances: int = 5000


@dataclass(frozen=True)
class ServiceSpec:
    """One public port of an instance's (ephemeral) service group."""

    port: int
    destination_port: int
    handlers: tuple[str, ...]


@dataclass
class InstanceRecord:
    """Everything the metro knows about one instance; persisted as JSON."""

    uuid: str
    name: str
    seq: int
    created_at: float
    image: str
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    memory_mb: int = 128
    vcpus: int = 1
    tags: list[str] = field(default_factory=list)
    features: list[str] = field(default_factory=list)
    plugins: list[dict[str, Any]] = field(default_factory=list)
    restart_policy: str = "never"
    services: list[ServiceSpec] = field(default_factory=list)
    service_group_uuid: str | None = None
    service_group_name: str | None = None
    fqdn: str | None = None
    scale_to_zero: dict[str, Any] | None = None
    private_ip: str = "10.0.0.2"
    state: str = "stopped"
    start_count: int = 0
    restart_count: int = 0
    started_at: float | None = None
    stopped_at: float | None = None
    uptime_ms_total: int = 0
    stop_reason: int | None = None
    stop_code: int | None = None
    exit_code: int | None = None
    frozen: bool = False
    log: str = ""

    @property
    def has_sandbox_plugin(self) -> bool:
        return any(p.get("name") == "sandbox" for p in self.plugins)

    def uptime_ms(self, now: float) -> int:
        extra = 0
        if self.state in ("running", "draining", "stopping") and self.started_at is not None:
            extra = int((now - self.started_at) * 1000)
        return self.uptime_ms_total + extra

    def identity(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name}

    def to_wire(self, now: float) -> dict[str, Any]:
        """The detailed read shape (ukc-api.md §7.9); only fields the SDK validates strictly."""
        out: dict[str, Any] = {
            "uuid": self.uuid,
            "name": self.name,
            "created_at": rfc3339(self.created_at),
            "state": self.state,
            "private_fqdn": f"{self.name}.internal",
            "private_ip": self.private_ip,
            "image": self.image,
            "memory_mb": self.memory_mb,
            "vcpus": self.vcpus,
            "args": list(self.args),
            "env": dict(self.env),
            "start_count": self.start_count,
            "restart_count": self.restart_count,
            "uptime_ms": self.uptime_ms(now),
            "restart_policy": self.restart_policy,
            "tags": list(self.tags),
            "features": list(self.features),
            "plugins": [dict(p) for p in self.plugins],
            "volumes": [],
            "services": [f"tcp:{s.port}" for s in self.services],
        }
        if self.started_at is not None:
            out["started_at"] = rfc3339(self.started_at)
        if self.stopped_at is not None:
            out["stopped_at"] = rfc3339(self.stopped_at)
        if self.stop_reason is not None:
            out["stop_reason"] = self.stop_reason
        if self.exit_code is not None:
            out["exit_code"] = self.exit_code
        if self.stop_code is not None:
            out["stop_code"] = self.stop_code
        if self.scale_to_zero is not None:
            out["scale_to_zero"] = dict(self.scale_to_zero)
        if self.service_group_uuid is not None:
            group: dict[str, Any] = {
                "uuid": self.service_group_uuid,
                "name": self.service_group_name,
                "domains": [{"fqdn": self.fqdn}] if self.fqdn else [],
                "services": [
                    {
                        "port": s.port,
                        "destination_port": s.destination_port,
                        "handlers": list(s.handlers),
                    }
                    for s in self.services
                ],
            }
            out["service_group"] = group
        return out

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["services"] = [asdict(s) for s in self.services]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> InstanceRecord:
        data = dict(data)
        data["services"] = [
            ServiceSpec(int(s["port"]), int(s["destination_port"]), tuple(s["handlers"]))
            for s in data.get("services", [])
        ]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def _bad(message: str) -> ItemError:
    return ItemError(message, status=400, code=CODE_INVALID)


def _validate_services(raw: object) -> list[ServiceSpec]:
    """Handler rules of ukc-api.md §8."""
    if not isinstance(raw, list) or not raw:
        raise _bad("service_group.services must be a non-empty list")
    out: list[ServiceSpec] = []
    seen: set[int] = set()
    for item in raw:
        if not isinstance(item, dict):
            raise _bad("service_group.services entries must be objects")
        port = item.get("port")
        if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
            raise _bad(f"service port {port!r} is not within 1..65535")
        dest = item.get("destination_port", port)
        if not isinstance(dest, int) or isinstance(dest, bool) or not 1 <= dest <= 65535:
            raise _bad(f"destination port {dest!r} of service {port} is not within 1..65535")
        handlers = item.get("handlers", [])
        if not isinstance(handlers, list) or not all(
            h in ("tls", "http", "redirect") for h in handlers
        ):
            raise _bad(f"handlers of service {port} must be among tls, http, redirect")
        hs = set(handlers)
        if item.get("protocol", "tcp") != "tcp":
            raise _bad(f"service {port}: only protocol tcp is supported")
        if port == 80:
            if "http" not in hs or "tls" in hs:
                raise _bad("service 80 must have handler http and must not have tls")
        elif port == 443:
            if not {"http", "tls"} <= hs:
                raise _bad("service 443 must have handlers http and tls")
            if "redirect" in hs:
                raise _bad("service 443: handler redirect is allowed only on port 80")
        else:
            if "tls" not in hs or "http" in hs:
                raise _bad(f"service {port} must have handler tls and must not have http")
            if "redirect" in hs:
                raise _bad(f"service {port}: handler redirect is allowed only on port 80")
        if port in seen:
            raise _bad(f"service port {port} is declared twice")
        seen.add(port)
        out.append(ServiceSpec(port, dest, tuple(handlers)))
    return out


def _int_field(body: dict[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad(f"{key} must be an integer, got {type(value).__name__}")
    return value


class Metro:
    """The instances of one emulated metro and the transitions between their states.

    All methods run on the daemon's event loop. Transitions that take time run as tasks; a
    per-instance lock orders them so a stop never overtakes the start it follows.
    """

    def __init__(
        self,
        state_dir: Path,
        runtime: Runtime | None = None,
        *,
        app_domain: str = DEFAULT_APP_DOMAIN,
        limits: MetroLimits | None = None,
        on_ports: Callable[[set[int]], Awaitable[None]] | None = None,
        save_delay_s: float = 0.2,
    ) -> None:
        self.state_dir = state_dir
        self.runtime: Runtime | None = runtime
        self.app_domain = app_domain
        self.limits = limits or MetroLimits()
        self.on_ports = on_ports
        self.records: dict[str, InstanceRecord] = {}
        self._by_name: dict[str, str] = {}
        self._by_fqdn: dict[str, str] = {}
        self._seq = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._teardowns: set[asyncio.Task[None]] = set()
        self._connections: dict[str, int] = {}
        self._last_activity: dict[str, float] = {}
        self._stopping_by_us: set[str] = set()
        self._restart_attempt: dict[str, int] = {}
        self._dirty = False
        self._save_delay_s = save_delay_s
        self._saver: asyncio.Task[None] | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._closed = False

    # ---------------------------------------------------------------- persistence

    @property
    def instances_path(self) -> Path:
        return self.state_dir / "instances.json"

    def load(self) -> None:
        """Read instances.json (missing = empty metro)."""
        try:
            raw = json.loads(self.instances_path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            raise LocalMetroError(
                f"instances file {self.instances_path} is unreadable: {exc}"
            ) from None
        for item in raw.get("instances", []):
            rec = InstanceRecord.from_json(item)
            self._index(rec)
            self._seq = max(self._seq, rec.seq)

    def save_now(self) -> None:
        """Write instances.json atomically (tmp + fsync + replace); 0600: env may hold secrets."""
        self._dirty = False
        data = {"instances": [r.to_json() for r in self.records.values()]}
        tmp = self.instances_path.with_suffix(".json.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.instances_path)

    def _mark_dirty(self) -> None:
        # why: saving on every change would make 1000 creates quadratic; coalesce instead
        self._dirty = True
        if self._saver is None or self._saver.done():
            self._saver = asyncio.get_running_loop().create_task(self._save_soon())

    async def _save_soon(self) -> None:
        await asyncio.sleep(self._save_delay_s)
        if self._dirty:
            self.save_now()

    async def resume(self) -> None:
        """After `load()`: run again what was starting/running; start the idle monitor."""
        for rec in list(self.records.values()):
            if rec.state in ("starting", "running", "draining"):
                rec.state = "stopped"
                self._begin_start(rec, reason="metro restarted")
            elif rec.state == "stopping":
                rec.state = "stopped"
            elif rec.state == "standby":
                # why: a frozen sandbox did not survive the daemon; waking must boot it cold
                rec.frozen = False
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._idle_monitor())
        await self._notify()

    async def close(self) -> None:
        """Finish deletes, cancel other transitions and the monitor, persist.

        The runtime is closed by the daemon. A delete already answered must not leave its
        workspace behind, so its teardown runs to the end.
        """
        self._closed = True
        teardowns = [t for t in self._teardowns if not t.done()]
        if teardowns:
            await asyncio.wait(teardowns)
        tasks = [t for t in self._tasks if not t.done()]
        for t in [*tasks, self._monitor, self._saver]:
            if t is not None and not t.done():
                t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self.save_now()

    # ---------------------------------------------------------------- indexes

    def _index(self, rec: InstanceRecord) -> None:
        self.records[rec.uuid] = rec
        self._by_name[rec.name] = rec.uuid
        if rec.fqdn:
            self._by_fqdn[rec.fqdn] = rec.uuid

    def _unindex(self, rec: InstanceRecord) -> None:
        self.records.pop(rec.uuid, None)
        self._by_name.pop(rec.name, None)
        if rec.fqdn:
            self._by_fqdn.pop(rec.fqdn, None)
        self._locks.pop(rec.uuid, None)
        self._connections.pop(rec.uuid, None)
        self._last_activity.pop(rec.uuid, None)

    def lookup(self, ref: object) -> InstanceRecord:
        """Resolve a `{uuid}` / `{name}` reference; ItemError code 8 when absent."""
        if not isinstance(ref, dict):
            raise _bad("a reference must be an object with uuid or name")
        if "uuid" in ref and "name" in ref:
            raise _bad("give either uuid or name, not both")
        if "uuid" in ref:
            u = str(ref["uuid"])
            rec = self.records.get(u)
            if rec is None:
                raise ItemError(f"no instance with uuid '{u}'", code=CODE_NOT_FOUND)
            return rec
        if "name" in ref:
            n = str(ref["name"])
            u2 = self._by_name.get(n)
            if u2 is None:
                raise ItemError(f"no instance with name '{n}'", code=CODE_NOT_FOUND)
            return self.records[u2]
        raise _bad("a reference must have uuid or name")

    def by_fqdn(self, fqdn: str) -> InstanceRecord | None:
        u = self._by_fqdn.get(fqdn.lower().rstrip("."))
        return self.records.get(u) if u else None

    def public_ports(self) -> set[int]:
        return {s.port for r in self.records.values() for s in r.services}

    # ---------------------------------------------------------------- state changes

    def _lock(self, uuid: str) -> asyncio.Lock:
        lock = self._locks.get(uuid)
        if lock is None:
            lock = self._locks[uuid] = asyncio.Lock()
        return lock

    def _log(self, rec: InstanceRecord, line: str) -> None:
        rec.log += f"[{rfc3339(time.time())}] {line}\n"
        # why: a chatty restart loop must not grow the record (and instances.json) forever
        if len(rec.log) > 65536:
            rec.log = rec.log[-32768:]

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _set_state(self, rec: InstanceRecord, state: str) -> None:
        assert state in STATES, state
        now = time.time()
        was_up = rec.state in ("running", "draining", "stopping")
        if state == "running":
            rec.started_at = now
            self._last_activity[rec.uuid] = time.monotonic()
        if was_up and state in ("stopped", "standby") and rec.started_at is not None:
            rec.uptime_ms_total += int((now - rec.started_at) * 1000)
            rec.stopped_at = now
        elif state in ("stopped", "standby") and rec.stopped_at is None:
            rec.stopped_at = now
        rec.state = state
        self._log(rec, f"state {state}")
        self._mark_dirty()
        self._spawn(self._notify())

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def run() -> None:
            await coro

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def wait_for(self, pred: Callable[[], bool], timeout_s: float | None) -> bool:
        """Block until `pred()` holds (re-checked on every state change) or the timeout lapses."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(pred), timeout_s)
            except TimeoutError:
                return pred()
        return True

    # ---------------------------------------------------------------- create

    def create(self, body: object) -> InstanceRecord:
        """Validate a create body and add the record (stopped, or starting with autostart)."""
        if not isinstance(body, dict):
            raise _bad("the create body must be a JSON object")
        name = body.get("name")
        if name is None:
            name = f"instance-{uuidlib.uuid4().hex[:8]}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise _bad(f"instance name {name!r} is not a valid DNS label")
        image = body.get("image")
        if isinstance(image, dict):
            image = image.get("url")
        if not isinstance(image, str) or not image:
            raise _bad("image is required")
        args = body.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise _bad("args must be a list of strings")
        env = body.get("env", {}) or {}
        if not isinstance(env, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in env.items()
        ):
            raise _bad("env must map strings to strings")
        memory_mb = _int_field(body, "memory_mb", 128)
        vcpus = _int_field(body, "vcpus", 1)
        tags = body.get("tags", []) or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _bad("tags must be a list of strings")
        features = body.get("features", []) or []
        if not isinstance(features, list) or not all(
            f in ("delete-on-stop", "nested-virt") for f in features
        ):
            raise _bad("features must be among delete-on-stop, nested-virt")
        restart_policy = body.get("restart_policy", "never")
        if restart_policy not in ("never", "always", "on-failure"):
            raise _bad(f"restart_policy {restart_policy!r} is not never, always or on-failure")
        if "delete-on-stop" in features and restart_policy != "never":
            raise _bad("feature delete-on-stop needs restart_policy never")
        # why: an absent autostart means false, so timeout_s alone is refused as UKC does
        autostart = body.get("autostart", False)
        if not isinstance(autostart, bool):
            raise _bad("autostart must be a boolean")
        timeout_s = body.get("timeout_s")
        if timeout_s is not None and not autostart:
            raise _bad("timeout_s needs autostart true")
        plugins = body.get("plugins", []) or []
        if not isinstance(plugins, list) or len(plugins) > 8:
            raise _bad("plugins must be a list of at most 8 entries")
        for p in plugins:
            if not isinstance(p, dict) or not _PLUGIN_NAME_RE.match(str(p.get("name", ""))):
                raise _bad("each plugin needs a name of 1..63 characters [A-Za-z0-9_-]")
        services: list[ServiceSpec] = []
        group = body.get("service_group")
        if group is not None:
            if not isinstance(group, dict):
                raise _bad("service_group must be an object")
            if "services" not in group:
                raise _bad("service_group must describe services (persistent groups unsupported)")
            services = _validate_services(group["services"])
        s2z_raw = body.get("scale_to_zero")
        s2z: dict[str, Any] | None = None
        if s2z_raw is not None:
            if not isinstance(s2z_raw, dict):
                raise _bad("scale_to_zero must be an object")
            policy = s2z_raw.get("policy", "off")
            if policy not in ("on", "off", "idle"):
                raise _bad(f"scale_to_zero.policy {policy!r} is not on, off or idle")
            cooldown = _int_field(s2z_raw, "cooldown_time_ms", _DEFAULT_COOLDOWN_MS)
            notify = _int_field(s2z_raw, "notify_time_ms", 0)
            if policy != "off":
                if group is None:
                    raise _bad("scale_to_zero needs a service_group")
                if "delete-on-stop" in features:
                    raise _bad("scale_to_zero cannot be combined with delete-on-stop")
            if notify >= cooldown and notify > 0:
                raise _bad(
                    f"scale_to_zero notify_time_ms {notify} must be below "
                    f"cooldown_time_ms {cooldown}"
                )
            s2z = {
                "enabled": policy != "off",
                "policy": policy,
                "stateful": bool(s2z_raw.get("stateful", False)),
                "cooldown_time_ms": cooldown,
                "notify_time_ms": notify,
            }
        if not self.limits.min_memory_mb <= memory_mb <= self.limits.max_memory_mb:
            raise ItemError(
                f"memory_mb {memory_mb} is outside the quota limits "
                f"{self.limits.min_memory_mb}..{self.limits.max_memory_mb}",
                code=CODE_QUOTA,
            )
        if len(self.records) >= self.limits.max_instances:
            raise ItemError(
                f"instance quota reached: {len(self.records)} of "
                f"{self.limits.max_instances} instances",
                code=CODE_QUOTA,
            )
        if name in self._by_name:
            raise ItemError(f"instance name '{name}' is already taken", code=CODE_ALREADY_EXISTS)
        self._seq += 1
        seq = self._seq
        uid = str(uuidlib.uuid4())
        rec = InstanceRecord(
            uuid=uid,
            name=name,
            seq=seq,
            created_at=time.time(),
            image=image,
            args=list(args),
            env=dict(env),
            memory_mb=memory_mb,
            vcpus=vcpus,
            tags=list(tags),
            features=list(features),
            plugins=[
                {
                    "name": p["name"],
                    "image": p.get("image") or p.get("rom"),
                    "config": p.get("config"),
                }
                for p in plugins
            ],
            restart_policy=restart_policy,
            services=services,
            scale_to_zero=s2z,
            private_ip=f"10.0.{(seq >> 8) & 255}.{seq & 255}",
        )
        if group is not None:
            rec.service_group_uuid = str(uuidlib.uuid4())
            rec.service_group_name = str(group.get("name") or f"{name}-group")
            rec.fqdn = f"{name}.{self.app_domain}"
        self._index(rec)
        self._log(rec, f"created image {image}")
        self._mark_dirty()
        if autostart:
            self._begin_start(rec, reason="autostart")
        return rec

    async def publish_ports(self, rec: InstanceRecord) -> None:
        """Have the edge listen on the instance's public ports (and metro.json name them).

        Awaited before the create is answered, so a client that reads metro.json after
        its create finds every port it declared.
        """
        if rec.services and self.on_ports is not None:
            await self.on_ports({s.port for s in rec.services})

    # ---------------------------------------------------------------- start / stop

    def _require_runtime(self) -> Runtime:
        if self.runtime is None:
            raise LocalMetroError("local metro has no sandbox runtime")
        return self.runtime

    def _begin_start(self, rec: InstanceRecord, *, reason: str) -> None:
        """Enter `starting` now and boot (or thaw) in a task."""
        was_frozen = rec.frozen and rec.state == "standby"
        self._set_state(rec, "starting")
        self._log(rec, f"start ({reason})")
        self._spawn(self._boot(rec, was_frozen))

    async def _boot(self, rec: InstanceRecord, thaw: bool) -> None:
        runtime = self._require_runtime()
        async with self._lock(rec.uuid):
            if rec.state != "starting" or rec.uuid not in self.records:
                return
            try:
                if thaw:
                    await runtime.thaw(rec.uuid)
                else:
                    await runtime.start(rec.uuid, env=dict(rec.env), memory_mb=rec.memory_mb)
            except Exception as exc:  # any runtime failure ends this boot as a platform stop
                self._log(rec, f"boot failed: {str(exc).splitlines()[0] if str(exc) else exc!r}")
                rec.stop_reason = STOP_REASON_PLATFORM
                rec.frozen = False
                if rec.state == "starting":
                    self._set_state(rec, "stopped")
                return
            if rec.state != "starting" or rec.uuid not in self.records:
                return
            rec.frozen = False
            if not thaw:
                rec.start_count += 1
            rec.stop_reason = None
            rec.stop_code = None
            rec.exit_code = None
            self._set_state(rec, "running")

    def start(self, rec: InstanceRecord) -> str:
        """PUT start: no-op unless stopped/standby. Returns the previous state."""
        prev = rec.state
        if prev in ("stopped", "standby"):
            self._restart_attempt.pop(rec.uuid, None)
            self._begin_start(rec, reason="user start")
        return prev

    def wake(self, rec: InstanceRecord) -> None:
        """Traffic or a plugin request reached a standby instance."""
        if rec.state == "standby":
            self._begin_start(rec, reason="woken by traffic")

    def stop(self, rec: InstanceRecord, *, drain_timeout_ms: int = 0) -> str:
        """PUT stop: enter draining/stopping now, stop the sandbox in a task."""
        prev = rec.state
        if prev in ("stopped", "stopping", "draining"):
            return prev
        if prev == "standby":
            # why: a standby sandbox holds frozen processes (stateful); they must go too
            self._spawn(self._halt(rec, STOP_REASON_USER, 0, to_state="stopped"))
            return prev
        self._set_state(rec, "draining" if drain_timeout_ms > 0 else "stopping")
        self._spawn(self._halt(rec, STOP_REASON_USER, drain_timeout_ms, to_state="stopped"))
        return prev

    def suspend(self, rec: InstanceRecord, *, drain_timeout_ms: int = 0) -> str:
        """PUT suspend: running → standby (frozen when stateful)."""
        prev = rec.state
        if prev not in ("running", "starting"):
            return prev
        if drain_timeout_ms > 0:
            self._set_state(rec, "draining")
        self._spawn(self._halt(rec, STOP_REASON_USER, drain_timeout_ms, to_state="standby"))
        return prev

    async def _halt(
        self, rec: InstanceRecord, reason: int, drain_ms: int, *, to_state: str
    ) -> None:
        runtime = self._require_runtime()
        if drain_ms > 0:
            await asyncio.sleep(min(drain_ms, 60000) / 1000)
        async with self._lock(rec.uuid):
            if rec.uuid not in self.records:
                return
            stateful = bool(rec.scale_to_zero and rec.scale_to_zero.get("stateful"))
            self._stopping_by_us.add(rec.uuid)
            try:
                if to_state == "standby" and stateful and rec.state != "standby":
                    await runtime.freeze(rec.uuid)
                    rec.frozen = True
                else:
                    if to_state == "stopped" and rec.state != "stopping":
                        self._set_state(rec, "stopping")
                    await runtime.stop(rec.uuid)
                    rec.frozen = False
            except Exception as exc:  # the sandbox is gone or broken: record and move on
                self._log(rec, f"halt error: {exc}")
            finally:
                self._stopping_by_us.discard(rec.uuid)
            rec.stop_reason = reason
            rec.stop_code = None
            self._set_state(rec, to_state)
            if to_state == "stopped" and "delete-on-stop" in rec.features:
                await self._destroy_locked(rec)

    # ---------------------------------------------------------------- delete

    async def delete(self, rec: InstanceRecord) -> asyncio.Task[None]:
        """Force-stop and remove; the record disappears at once, the sandbox when the task ends."""
        self._unindex(rec)
        self._mark_dirty()
        await self._notify()
        return self._spawn_teardown(self._destroy_unindexed(rec))

    def _spawn_teardown(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        """A task that removes an instance's sandbox; `close` waits for it, never cancels."""
        task = self._spawn(coro)
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)
        return task

    async def _destroy_unindexed(self, rec: InstanceRecord) -> None:
        runtime = self._require_runtime()
        self._stopping_by_us.add(rec.uuid)
        try:
            await runtime.destroy(rec.uuid)
        except Exception as exc:  # nothing left to report to: the record is already gone
            self._log(rec, f"destroy error: {exc}")
        finally:
            self._stopping_by_us.discard(rec.uuid)

    async def _destroy_locked(self, rec: InstanceRecord) -> None:
        self._unindex(rec)
        self._mark_dirty()
        await self._destroy_unindexed(rec)
        await self._notify()

    # ---------------------------------------------------------------- runtime callbacks

    def on_exit(self, uuid: str, exit_code: int, out_of_memory: bool = False) -> None:
        """The runtime says a sandbox died on its own (may be called from any thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            loop.call_soon(self._handle_exit, uuid, exit_code, out_of_memory)
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._handle_exit, uuid, exit_code, out_of_memory)

    _loop: asyncio.AbstractEventLoop | None = None

    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _handle_exit(self, uuid: str, exit_code: int, out_of_memory: bool) -> None:
        rec = self.records.get(uuid)
        if self._closed or rec is None or uuid in self._stopping_by_us:
            return
        if rec.state not in ("running", "starting", "draining"):
            return
        if out_of_memory:
            self._log(rec, f"out of memory: more than memory_mb {rec.memory_mb} in use")
            rec.exit_code = None
            rec.stop_reason = STOP_REASON_KERNEL
            rec.stop_code = STOP_CODE_OUT_OF_MEMORY
        else:
            self._log(rec, f"sandbox exited with code {exit_code}")
            rec.exit_code = exit_code
            rec.stop_reason = STOP_REASON_APP_EXIT
            rec.stop_code = None
        healthy_for = time.time() - (rec.started_at or time.time())
        self._set_state(rec, "stopped")
        if "delete-on-stop" in rec.features:
            self._spawn_teardown(self._destroy_locked(rec))
            return
        failed = out_of_memory or exit_code != 0
        if rec.restart_policy == "always" or (rec.restart_policy == "on-failure" and failed):
            if healthy_for >= _HEALTHY_RESET_S:
                self._restart_attempt.pop(uuid, None)
            attempt = self._restart_attempt.get(uuid, 0)
            self._restart_attempt[uuid] = attempt + 1
            delay = _RESTART_BACKOFF_S[min(attempt, len(_RESTART_BACKOFF_S) - 1)]
            self._spawn(self._restart_later(rec, delay))

    async def _restart_later(self, rec: InstanceRecord, delay: float) -> None:
        await asyncio.sleep(delay)
        if rec.uuid in self.records and rec.state == "stopped":
            rec.restart_count += 1
            self._begin_start(rec, reason=f"restart_policy {rec.restart_policy}")

    # ---------------------------------------------------------------- traffic / scale-to-zero

    def on_activity(self, uuid: str, delta: int) -> None:
        """Edge (or plugin proxy) connection opened (+1) or closed (-1)."""
        if uuid not in self.records:
            return
        n = self._connections.get(uuid, 0) + delta
        self._connections[uuid] = max(n, 0)
        self._last_activity[uuid] = time.monotonic()

    async def ensure_running(self, rec: InstanceRecord, timeout_s: float) -> bool:
        """Wake a standby instance and wait until it runs; False when it does not in time."""
        self.wake(rec)
        return (
            await self.wait_for(
                lambda: (
                    rec.state == "running" or rec.uuid not in self.records or rec.state == "stopped"
                ),
                timeout_s,
            )
            and rec.state == "running"
        )

    async def route_for(
        self, fqdn: str, public_port: int, wake_timeout_s: float = 30.0
    ) -> tuple[str, int] | None:
        """(uuid, destination port) behind an edge connection; wakes a standby instance.

        None when no instance has that FQDN, it publishes no such port, or it is not running
        (and could not be woken) in time.
        """
        rec = self.by_fqdn(fqdn)
        if rec is None:
            return None
        service = next((s for s in rec.services if s.port == public_port), None)
        if service is None:
            return None
        if rec.state != "running" and not await self.ensure_running(rec, wake_timeout_s):
            return None
        return rec.uuid, service.destination_port

    async def _idle_monitor(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for rec in list(self.records.values()):
                s2z = rec.scale_to_zero
                if not s2z or not s2z.get("enabled") or rec.state != "running":
                    continue
                if self._connections.get(rec.uuid, 0) > 0 and s2z.get("policy") == "on":
                    continue
                last = self._last_activity.get(rec.uuid, now)
                if s2z.get("policy") == "idle" and self._connections.get(rec.uuid, 0) > 0:
                    # why: idle policy treats open-but-quiet connections as idle, but the edge
                    # reports only connects/closes, so an open connection counts as traffic
                    continue
                if (now - last) * 1000 >= int(s2z.get("cooldown_time_ms", 1000)):
                    self._log(rec, "scale-to-zero: idle for the cooldown")
                    self._spawn(self._halt(rec, STOP_REASON_SCALE_TO_ZERO, 0, to_state="standby"))
                    # why: mark it so the next tick does not schedule a second halt
                    self._last_activity[rec.uuid] = now + 3600

    # ---------------------------------------------------------------- listing

    def select(self, tags: Iterable[str]) -> list[InstanceRecord]:
        wanted = [t for t in tags if t]
        recs = list(self.records.values())
        if wanted:
            recs = [r for r in recs if all(t in r.tags for t in wanted)]
        return recs

    def console(self, rec: InstanceRecord) -> bytes:
        """Lifecycle lines plus what the sandbox printed (agent + sshd stderr)."""
        out = rec.log.encode()
        if self.runtime is not None:
            # a sandbox that never ran may have no console at all
            with contextlib.suppress(Exception):
                out += self.runtime.console(rec.uuid)
        return out
