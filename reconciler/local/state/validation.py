"""What the local metro accepts: create bodies, updates and quotas, with UKC's refusals.

The same rules UKC enforces, so the controller meets the same refusals offline. A malformed
request is an `ItemError` with HTTP status 400 and item code 7; a quota an item code 19.
"""

from __future__ import annotations

import re
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from reconciler._util.names import is_dns_label
from reconciler.local.state.index import InstanceIndex
from reconciler.local.state.quotas import check_live_memory
from reconciler.local.state.records import (
    CODE_ALREADY_EXISTS,
    CODE_INVALID,
    CODE_QUOTA,
    CODE_UNSUPPORTED,
    ItemError,
    LocalInstance,
    ServiceSpec,
)
from reconciler.local.state.volumes import VolumeAttach, parse_attach

__all__ = [
    "CreateRequest",
    "MetroLimits",
    "admit",
    "apply_update",
    "check_memory",
    "parse_autokill",
    "parse_create",
]

_PLUGIN_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
_DEFAULT_COOLDOWN_MS = 1000


@dataclass(frozen=True)
class MetroLimits:
    """Quota-like bounds answered with item code 19."""

    min_memory_mb: int = 16
    max_memory_mb: int = 8192
    max_instances: int = 5000
    #: the memory of all live instances together (a boot past it is refused); a local
    #: account's is large: 64 sessions of the default 4096 MiB fit
    max_live_memory_mb: int = 1 << 20


@dataclass(frozen=True)
class CreateRequest:
    """A create body that passed validation; the metro gives it a uuid and addresses."""

    name: str
    image: str
    args: list[str]
    env: dict[str, str]
    memory_mb: int
    vcpus: int
    tags: list[str]
    features: list[str]
    plugins: list[dict[str, Any]]
    restart_policy: str
    services: list[ServiceSpec]
    #: the ephemeral service group's name when the body declared one (None: no group)
    group_name: str | None
    scale_to_zero: dict[str, Any] | None
    autostart: bool
    #: the volumes to attach (existing ones by reference, or new ones)
    volumes: list[VolumeAttach]
    #: autokill `time_ms` (0: never)
    autokill_ms: int = 0

    def to_instance(self, *, seq: int, app_domain: str) -> LocalInstance:
        """The new instance: a fresh uuid, the private address of its sequence number, and the
        FQDN `<name>.<app_domain>` when it has a service group."""
        rec = LocalInstance(
            uuid=str(uuidlib.uuid4()),
            name=self.name,
            seq=seq,
            created_at=time.time(),
            image=self.image,
            args=self.args,
            env=self.env,
            memory_mb=self.memory_mb,
            vcpus=self.vcpus,
            tags=self.tags,
            features=self.features,
            plugins=self.plugins,
            restart_policy=self.restart_policy,
            services=self.services,
            scale_to_zero=self.scale_to_zero,
            private_ip=f"10.0.{(seq >> 8) & 255}.{seq & 255}",
            autokill_ms=self.autokill_ms,
        )
        if self.group_name is not None:
            rec.service_group_uuid = str(uuidlib.uuid4())
            rec.service_group_name = self.group_name
            rec.fqdn = f"{self.name}.{app_domain}"
        return rec


def _bad(message: str) -> ItemError:
    return ItemError(message, status=400, code=CODE_INVALID)


def check_memory(limits: MetroLimits, memory_mb: int) -> None:
    """Refuse a memory size outside the quota (item code 19)."""
    if not limits.min_memory_mb <= memory_mb <= limits.max_memory_mb:
        raise ItemError(
            f"memory_mb {memory_mb} is outside the quota limits "
            f"{limits.min_memory_mb}..{limits.max_memory_mb}",
            code=CODE_QUOTA,
        )


def _validate_services(raw: object) -> list[ServiceSpec]:
    """UKC's handler rules: 80 is plain http, 443 tls+http, any other port tls only."""
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


def _scale_to_zero(raw: object, *, has_group: bool, features: list[str]) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _bad("scale_to_zero must be an object")
    policy = raw.get("policy", "off")
    if policy not in ("on", "off", "idle"):
        raise _bad(f"scale_to_zero.policy {policy!r} is not on, off or idle")
    cooldown = _int_field(raw, "cooldown_time_ms", _DEFAULT_COOLDOWN_MS)
    notify = _int_field(raw, "notify_time_ms", 0)
    if policy != "off":
        if not has_group:
            raise _bad("scale_to_zero needs a service_group")
        if "delete-on-stop" in features:
            raise _bad("scale_to_zero cannot be combined with delete-on-stop")
    if notify >= cooldown and notify > 0:
        raise _bad(
            f"scale_to_zero notify_time_ms {notify} must be below cooldown_time_ms {cooldown}"
        )
    return {
        "enabled": policy != "off",
        "policy": policy,
        "stateful": bool(raw.get("stateful", False)),
        "cooldown_time_ms": cooldown,
        "notify_time_ms": notify,
    }


def parse_autokill(raw: object) -> int:
    """The `time_ms` of an `autokill` object (0: never); `num_requests` is not emulated."""
    if raw is None:
        return 0
    if not isinstance(raw, dict):
        raise _bad("autokill must be an object")
    unknown = sorted(set(raw) - {"time_ms", "num_requests"})
    if unknown:
        raise _bad(f"autokill has unknown fields: {', '.join(unknown)}")
    time_ms = raw.get("time_ms", 0)
    if time_ms is None:
        time_ms = 0
    if not isinstance(time_ms, int) or isinstance(time_ms, bool) or time_ms < 0:
        raise _bad(f"autokill.time_ms must be a whole number >= 0, got {time_ms!r}")
    if raw.get("num_requests") not in (None, 0):
        raise ItemError(
            "autokill.num_requests is not emulated by the local metro", code=CODE_UNSUPPORTED
        )
    return time_ms


def _string_list(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, []) or []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _bad(f"{key} must be a list of strings")
    return list(value)


def parse_create(body: object) -> CreateRequest:
    """Validate a create body (every refusal UKC answers with HTTP 400 / code 7)."""
    if not isinstance(body, dict):
        raise _bad("the create body must be a JSON object")
    name = body.get("name")
    if name is None:
        name = f"instance-{uuidlib.uuid4().hex[:8]}"
    if not isinstance(name, str) or not is_dns_label(name):
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
    tags = _string_list(body, "tags")
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
    if body.get("timeout_s") is not None and not autostart:
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
    s2z = _scale_to_zero(body.get("scale_to_zero"), has_group=group is not None, features=features)
    return CreateRequest(
        name=name,
        image=image,
        args=list(args),
        env=dict(env),
        memory_mb=memory_mb,
        vcpus=vcpus,
        tags=tags,
        features=list(features),
        plugins=[
            {"name": p["name"], "image": p.get("image") or p.get("rom"), "config": p.get("config")}
            for p in plugins
        ],
        restart_policy=restart_policy,
        services=services,
        group_name=None if group is None else str(group.get("name") or f"{name}-group"),
        scale_to_zero=s2z,
        autostart=autostart,
        volumes=parse_attach(body.get("volumes")),
        autokill_ms=parse_autokill(body.get("autokill")),
    )


#: UKC's tag rules: at most 16 tags per instance, each 1..256 of these characters
MAX_TAGS = 16
_TAG = re.compile(r"[A-Za-z0-9\-+_.:=]{1,256}")


def check_tags(tags: list[str]) -> None:
    """Refuse tags UKC refuses (400), naming the first offender."""
    if len(tags) > MAX_TAGS:
        raise _bad(f"an instance carries at most {MAX_TAGS} tags, got {len(tags)}")
    for tag in tags:
        if not _TAG.fullmatch(tag):
            shown = tag[:40] + ("..." if len(tag) > 40 else "")
            raise _bad(f"tag {shown!r} is not 1 to 256 characters of letters, digits and -+_.:=")


def admit(
    body: object, limits: MetroLimits, index: InstanceIndex, *, tag_rules: bool = False
) -> CreateRequest:
    """A create body that is valid, within the quotas, and names a free instance name."""
    req = parse_create(body)
    if tag_rules:
        check_tags(req.tags)
    check_memory(limits, req.memory_mb)
    if len(index) >= limits.max_instances:
        raise ItemError(
            f"instance quota reached: {len(index)} of {limits.max_instances} instances",
            code=CODE_QUOTA,
        )
    if index.name_taken(req.name):
        raise ItemError(f"instance name '{req.name}' is already taken", code=CODE_ALREADY_EXISTS)
    if req.autostart:
        check_live_memory(index.records.values(), req.memory_mb, limits.max_live_memory_mb)
    return req


def apply_update(
    rec: LocalInstance, opts: dict[str, Any], limits: MetroLimits, *, tag_rules: bool = False
) -> None:
    """Apply one PATCH operation (`prop`, `op`, `value`) to `rec`; ItemError when unsupported."""
    prop, kind, value = opts.get("prop"), opts.get("op"), opts.get("value")
    if prop == "env" and kind in ("set", "add") and isinstance(value, dict):
        if kind == "set":
            rec.env = {}
        rec.env.update({str(k): str(v) for k, v in value.items()})
    elif prop == "env" and kind == "set" and value is None:
        rec.env = {}
    elif prop == "env" and kind == "del" and isinstance(value, list):
        for k in value:
            rec.env.pop(str(k), None)
    elif prop == "memory_mb" and kind == "set" and isinstance(value, int):
        check_memory(limits, value)
        rec.memory_mb = value
    elif prop == "autokill" and kind == "set":
        # why in any state: it is bookkeeping of the platform's, not of the guest [inferred]
        rec.autokill_ms = parse_autokill(value)
    elif prop == "tags" and kind in ("set", "add", "del"):
        vals = value if isinstance(value, list) else ([] if value is None else [value])
        vals = [str(v) for v in vals]
        if kind == "set":
            tags = vals
        elif kind == "add":
            tags = rec.tags + [v for v in vals if v not in rec.tags]
        else:
            tags = [t for t in rec.tags if t not in vals]
        if tag_rules:
            check_tags(tags)
        rec.tags = tags
    else:
        raise ItemError(
            f"update of {prop!r} with op {kind!r} is not supported", code=CODE_UNSUPPORTED
        )
