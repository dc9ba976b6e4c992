"""What the controller knows of the cloud: instances, what a create sends, the API's shape.

`CloudApi` is the platform API of one metro (list / create / start / stop / delete / wait,
volumes, and requests to an instance's plugin), implemented over httpx by `cloud.api.UkcApi`;
the local metro speaks the same wire protocol.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from reconciler.cloud.quotas import Quota
from reconciler.errors import ApiError

__all__ = [
    "CloudApi",
    "ConsoleLog",
    "CreateRequest",
    "Instance",
    "Plugin",
    "PluginReply",
    "Service",
    "Volume",
    "VolumeMount",
]


@dataclass(frozen=True)
class Service:
    """One public port of an instance's service group."""

    port: int
    destination_port: int
    handlers: tuple[str, ...]


@dataclass(frozen=True)
class Plugin:
    """A platform plugin loaded into an instance (e.g. the sandbox API, reached through the
    metro's proxy)."""

    name: str
    image: str
    config: Mapping[str, object] | None = None


@dataclass(frozen=True)
class Instance:
    """An instance as observed through the API (already parsed tolerantly from the wire).

    `state` is kept as the raw string the API sent: unknown states must not crash us.
    `start_count` and `started_at` together identify one boot as far as the API can tell.
    """

    uuid: str
    name: str
    state: str
    fqdn: str | None = None
    tags: tuple[str, ...] = ()
    image: str | None = None
    memory_mb: int | None = None
    created_at: str | None = None
    started_at: str | None = None
    start_count: int | None = None
    metro: str = ""
    #: why it last stopped (`cloud.stops.decode` reads them); None when the platform says nothing
    stop_reason: int | None = None
    stop_code: int | None = None
    exit_code: int | None = None
    stopped_at: str | None = None
    #: its autokill `time_ms` as the read says it (0: none); None when the read says nothing
    autokill_ms: int | None = None


@dataclass(frozen=True)
class VolumeMount:
    """A new volume created with the instance (deleted with it) and where it is mounted."""

    at: str
    size_mb: int
    tags: Sequence[str] = ()


@dataclass(frozen=True)
class Volume:
    """A volume as observed through the API (parsed tolerantly)."""

    uuid: str
    name: str
    tags: tuple[str, ...] = ()
    state: str = ""
    size_mb: int | None = None
    #: names (or uuids, when the platform gives no name) of the instances it is attached to
    attached_to: tuple[str, ...] = ()
    metro: str = ""


@dataclass(frozen=True)
class CreateRequest:
    """Everything `ukc` sends when it creates a session instance."""

    name: str
    image: str
    env: Mapping[str, str]
    tags: Sequence[str]
    memory_mb: int | None = None
    services: Sequence[Service] = field(default_factory=tuple)
    plugins: Sequence[Plugin] = field(default_factory=tuple)
    scale_to_zero: Mapping[str, object] | None = None
    autostart: bool = True
    volumes: Sequence[VolumeMount] = field(default_factory=tuple)
    #: the platform deletes the instance once it has been stopped this long (None: never)
    autokill_ms: int | None = None


@dataclass(frozen=True)
class ConsoleLog:
    """A slice of an instance's console output (the guest's stdout, stderr and kernel lines):
    bytes `start`..`end` of the `available_end` the platform keeps."""

    data: bytes
    start: int
    end: int
    available_end: int


@dataclass(frozen=True)
class PluginReply:
    """A plugin's answer, as it came: the HTTP status, the body (at most the bytes asked for)
    and the `Content-Range` header. Everything in it is the sandbox's and untrusted."""

    status: int
    body: bytes
    content_range: str | None = None


class CloudApi(Protocol):
    """The platform API of one metro. Every method is one logical operation (retries inside)."""

    #: the metro label results are tagged with (e.g. "local", "fra", or a URL)
    metro: str

    def list_instances(self, tags: Sequence[str]) -> list[Instance]:
        """All instances carrying every tag in `tags`, across all pages."""
        ...

    def get_instance(self, name: str) -> Instance | None:
        """One instance by name, or None when it does not exist (or is deleted, retained)."""
        ...

    def create_instance(self, request: CreateRequest) -> Instance:
        """Create; raises `AlreadyExistsError` when the name is taken."""
        ...

    def start_instance(self, name: str) -> None: ...

    def stop_instance(self, name: str) -> None: ...

    def suspend_instances(self, names: Sequence[str]) -> dict[str, ApiError]:
        """Suspend (`PUT /v1/instances/suspend`) every instance of `names` in one request (the
        platform takes a list): each goes to `standby`, costing no live quota; a start brings
        it back. The instances it refused, by name, with why (empty: all accepted). Raises
        when the whole request failed."""
        ...

    def set_autokill(self, name: str, *, uuid: str, time_ms: int) -> None:
        """Set the autokill `time_ms` of exactly the instance `uuid` (0: never)."""
        ...

    def get_quotas(self) -> Quota:
        """The account's quota (`GET /v1/users/quotas`); raises `ApiError` when the answer
        holds none."""
        ...

    def delete_instance(self, name: str, *, uuid: str | None = None, wait: bool = True) -> bool:
        """Delete (exactly the instance `uuid` when given) without retention, waiting a while
        for it to be gone unless not `wait`; False when it was already gone. The name may
        still be taken after it returns (deletes are asynchronous): for a while when it did
        not wait, for a moment when it did."""
        ...

    def set_tags(self, name: str, *, uuid: str, tags: Sequence[str]) -> None:
        """Replace the tags of exactly the instance `uuid` (`name` is for messages); raises
        `NotFoundError` when it is gone. The platform takes it for stopped instances."""
        ...

    def wait_instance(self, name: str, state: str, timeout_s: float) -> Instance:
        """Block until the instance is in `state`; raises `SandboxNotReadyError` at the deadline."""
        ...

    def list_volumes(self, tags: Sequence[str]) -> list[Volume]:
        """All volumes carrying every tag in `tags`."""
        ...

    def delete_volume(self, name: str, *, uuid: str) -> bool:
        """Delete exactly the volume `uuid` (`name` is for messages); False when it was
        already gone. Raises `ApiError` when the platform refuses (e.g. still attached)."""
        ...

    def instance_log(self, uuid: str, *, offset: int, limit: int | None = None) -> ConsoleLog:
        """The console of exactly the instance `uuid`, from byte `offset` (negative: that far
        from the end), at most `limit` bytes."""
        ...

    def plugin_request(
        self,
        uuid: str,
        plugin: str,
        method: str,
        path: str,
        *,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 30.0,
        max_bytes: int,
    ) -> PluginReply:
        """One request to `/v1/instances/{uuid}/plugins/{plugin}/{path}` (no retry: a plugin
        request need not be idempotent), `body` a JSON value or its encoding as bytes. Any
        HTTP status is a reply, except a refused token (`AuthError`); a broken connection, a
        timeout or an answer over `max_bytes` is a `TransportError`."""
        ...

    def close(self) -> None: ...
