"""The emulator's instance records and the UKC wire shapes they are read in.

`LocalInstance` is everything the local metro knows about one instance; `to_wire` renders the
detailed read shape the SDK validates, `to_json`/`from_json` the form kept in `instances.json`.
The constants are UKC's: the states the SDK accepts, per-item error codes and stop reasons.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from reconciler.errors import ApiError

__all__ = [
    "CODE_ALREADY_EXISTS",
    "CODE_CANNOT_BE_USED",
    "CODE_INVALID",
    "CODE_NOT_FOUND",
    "CODE_QUOTA",
    "CODE_TIMED_OUT",
    "CODE_UNSUPPORTED",
    "DEFAULT_APP_DOMAIN",
    "STATES",
    "STOP_CODE_NOMEDIUM",
    "STOP_CODE_OUT_OF_MEMORY",
    "STOP_REASON_APP_EXIT",
    "STOP_REASON_KERNEL",
    "STOP_REASON_PLATFORM",
    "STOP_REASON_PLATFORM_ONLY",
    "STOP_REASON_SCALE_TO_ZERO",
    "STOP_REASON_USER",
    "UP_STATES",
    "ItemError",
    "LocalInstance",
    "LocalVolume",
    "ServiceSpec",
    "rfc3339",
]

DEFAULT_APP_DOMAIN = "local.ukc.localhost"

#: the only states the SDK accepts
STATES = frozenset({"stopped", "starting", "running", "draining", "stopping", "standby", "deleted"})
#: states in which the instance's uptime counts
UP_STATES = frozenset({"running", "draining", "stopping"})

# per-item error codes
CODE_UNSUPPORTED = 1
CODE_INVALID = 7
CODE_NOT_FOUND = 8
CODE_TIMED_OUT = 12
CODE_QUOTA = 19
CODE_ALREADY_EXISTS = 23
CODE_CANNOT_BE_USED = 24

# stop_reason bitmask values
STOP_REASON_USER = 15
STOP_REASON_SCALE_TO_ZERO = 39
STOP_REASON_APP_EXIT = 3
STOP_REASON_PLATFORM = 7
# why: a boot the platform itself gave up on before any kernel ran (the image could not be
# pulled) sets only the P bit; its stop_code is a platform code
STOP_REASON_PLATFORM_ONLY = 4
STOP_CODE_NOMEDIUM = 1
# why: an instance that runs out of memory is stopped by its own (guest) kernel, not by the
# user, the platform or its app: only the K bit (kernel exited, stop_code valid) is set, the
# value UKC documents as a kernel crash; exit_code stays unset as the app never exited
STOP_REASON_KERNEL = 1
# the kernel stop code of an out-of-memory stop: reason PGFAULT (4), init level 127 (app
# running), errno ENOMEM (12) in bits 16-23
STOP_CODE_OUT_OF_MEMORY = 0x000C7F04


def rfc3339(ts: float) -> str:
    """Seconds since the epoch as the RFC 3339 `Z` form the SDK parses."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ItemError(ApiError):
    """One request item failed: rendered as an error item (or an HTTP error when `status`)."""


@dataclass(frozen=True)
class ServiceSpec:
    """One public port of an instance's (ephemeral) service group."""

    port: int
    destination_port: int
    handlers: tuple[str, ...]


@dataclass
class LocalInstance:
    """Everything the local metro knows about one instance; persisted as JSON."""

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
    #: when a `deleted` record (torn down, name still taken) leaves the metro
    retained_until: float | None = None
    #: the attached volumes as the read shows them: `{uuid, name, at, readonly}`
    volumes: list[dict[str, Any]] = field(default_factory=list)
    #: autokill `time_ms`: deleted once stopped this long (0: never)
    autokill_ms: int = 0
    #: when it last went down (`stopped` or `standby`); what autokill counts from
    down_since: float | None = None
    #: in `standby` by a user's suspend (not by scale-to-zero)
    suspended: bool = False

    @property
    def has_sandbox_plugin(self) -> bool:
        return any(p.get("name") == "sandbox" for p in self.plugins)

    @property
    def stateful_standby(self) -> bool:
        """Whether scale-to-zero keeps the sandbox's processes (frozen) instead of stopping it."""
        return bool(self.scale_to_zero and self.scale_to_zero.get("stateful"))

    def uptime_ms(self, now: float) -> int:
        extra = 0
        if self.state in UP_STATES and self.started_at is not None:
            extra = int((now - self.started_at) * 1000)
        return self.uptime_ms_total + extra

    def identity(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name}

    def service_group_wire(self) -> dict[str, Any] | None:
        """The `service_group` object of the read shape, or None without a group."""
        if self.service_group_uuid is None:
            return None
        return {
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

    def to_wire(self, now: float) -> dict[str, Any]:
        """The detailed read shape; only fields the SDK validates strictly."""
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
            "volumes": [dict(v) for v in self.volumes],
            "services": [f"tcp:{s.port}" for s in self.services],
            "autokill": {"time_ms": self.autokill_ms},
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
        if self.state == "deleted" and self.retained_until is not None:
            out["retained_until"] = rfc3339(self.retained_until)
        group = self.service_group_wire()
        if group is not None:
            out["service_group"] = group
        return out

    def to_json(self) -> dict[str, Any]:
        """The record as `instances.json` keeps it (encoded at once: nothing is copied).

        Why not `asdict`: it deep-copies every field, and the store encodes every record at
        each save (every 0.2 s while instances change): with 50 instances booting it was most
        of the daemon's CPU outside the sandboxes' boots.
        """
        data = {name: getattr(self, name) for name in self.__dataclass_fields__}
        data["services"] = [asdict(s) for s in self.services]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocalInstance:
        data = dict(data)
        data["services"] = [
            ServiceSpec(int(s["port"]), int(s["destination_port"]), tuple(s["handlers"]))
            for s in data.get("services", [])
        ]
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class LocalVolume:
    """One volume of the local metro: a host directory, attached to at most one instance.

    `persistent` is False for a volume created inline in an instance create: it goes with
    that instance, as on UKC.
    """

    uuid: str
    name: str
    size_mb: int
    created_at: float
    tags: list[str] = field(default_factory=list)
    persistent: bool = True
    attached_to: str | None = None
    attached_name: str | None = None
    at: str | None = None
    readonly: bool = False

    def identity(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "name": self.name}

    def mount(self) -> dict[str, Any]:
        """The entry of the instance read's `volumes` list."""
        return {"uuid": self.uuid, "name": self.name, "at": self.at, "readonly": self.readonly}

    def to_wire(self, *, mounted: bool) -> dict[str, Any]:
        """The detailed read shape; `mounted`: its instance runs now."""
        out: dict[str, Any] = {
            "uuid": self.uuid,
            "name": self.name,
            "created_at": rfc3339(self.created_at),
            "state": "available" if self.attached_to is None else "idle",
            "size_mb": self.size_mb,
            "persistent": self.persistent,
            "attached_to": [],
            "mounted_by": [],
            "tags": list(self.tags),
            "filesystem": "virtiofs",
            "access_mode": "rwo",
        }
        if self.attached_to is not None:
            ref = {"uuid": self.attached_to, "name": self.attached_name}
            out["attached_to"] = [ref]
            if mounted:
                out["state"] = "mounted"
                out["mounted_by"] = [{**ref, "readonly": self.readonly}]
        return out

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> LocalVolume:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
