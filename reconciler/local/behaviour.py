"""How hard the local metro is: the platform behaviours UKC shows and a kind emulator hides.

Two presets: `realistic` (the default) does what UKC does where a controller can trip over it
(docs/local-metro.md lists each behaviour and the vendor fact behind it); `kind` is the old
forgiving emulator, for tests that pin down something else and say why. The daemon takes its
preset from `UKC_LOCAL_BEHAVIOUR` (a preset name, or a JSON object of a `preset` and
overrides), and `POST /_local/behaviour` changes it at runtime (new instances and boots see
the change; running sandboxes keep what they booted with).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from reconciler.errors import ApiError

__all__ = [
    "ENV_VAR",
    "LOCAL_IMAGES",
    "MINIMAL_IMAGE",
    "PRESETS",
    "Behaviour",
    "BootOptions",
    "from_env",
]

ENV_VAR = "UKC_LOCAL_BEHAVIOUR"
#: the image with the original workflow's contract and no python3
MINIMAL_IMAGE = "ukc/local-minimal:latest"

#: the images the local metro has (`ukc local status` lists them)
LOCAL_IMAGES = {
    "ukc/local-sandbox:latest": "the host's /usr: python3, sshd, rsync, tar, coreutils, /exec",
    MINIMAL_IMAGE: (
        "the original workflow's contract without python3: sshd, rsync, tar, sh, coreutils, /exec"
    ),
}


@dataclass(frozen=True)
class Behaviour:
    """One setting of every behaviour knob (times in seconds; 0 turns a delay off)."""

    #: after a DELETE answers, the instance is torn down for this long: it is listed in state
    #: `deleted` and its name stays taken
    delete_hold_s: float = 1.0
    #: then an account with retention keeps the `deleted` record (name taken) this much
    #: longer, unless the DELETE said `dont_retain`
    retention_s: float = 30.0
    #: a DELETE's `timeout_s` holds its answer until the name is free (false: it answers at
    #: once, as a platform that ignores the field would; the name stays taken after it)
    delete_timeout_honoured: bool = True
    #: sshd listens this long after the instance is `running` (the app reached its entry
    #: point; sshd is the app's child)
    ssh_delay_s: float = 0.3
    #: and the key from `PUBKEY` is installed this long after sshd listens
    key_delay_s: float = 0.3
    #: a cold boot gets new ssh host keys (the rootfs starts from the image)
    host_keys_per_boot: bool = True
    #: only the metro's images boot (`LOCAL_IMAGES` and `extra_images`); another stops at
    #: once with the platform's missing-image stop (stop_reason 4, stop_code 1 NOMEDIUM)
    known_images_only: bool = True
    extra_images: tuple[str, ...] = ()
    #: /workspace lives in the instance's memory (a tmpfs of `memory_mb`): lost on a cold
    #: boot, kept across a stateful standby
    workspace_in_memory: bool = True
    #: the HTTP gateway (port 443 `http` handler) cuts a request after this long (0: never)
    gateway_timeout_s: float = 60.0
    #: tags are checked as UKC does (at most 16, each at most 256 characters of
    #: `[A-Za-z0-9-+_.:=]`)
    tag_rules: bool = True
    #: a stateful standby wake counts as a start (`start_count` moves although memory, and
    #: with it /workspace, is kept): unverified on UKC, so the harder case
    wake_moves_start_count: bool = True
    #: autokill (`{time_ms}`: delete after being stopped this long) also counts the time an
    #: instance sits in `standby` (suspended or scaled to zero); false: only `stopped` counts
    autokill_counts_standby: bool = True
    #: a manual suspend keeps the sandbox's memory (frozen), whatever its scale-to-zero says;
    #: false: it is a stop, and the wake a cold boot
    suspend_keeps_memory: bool = True
    #: traffic (the edge, the plugin proxy) wakes a manually suspended instance as it wakes a
    #: scaled-to-zero one; false: only a start request does
    suspend_woken_by_traffic: bool = False

    def image_known(self, image: str) -> bool:
        return not self.known_images_only or image in LOCAL_IMAGES or image in self.extra_images

    def boot_options(self, image: str) -> BootOptions:
        return BootOptions(
            ssh_delay_s=self.ssh_delay_s,
            key_delay_s=self.key_delay_s,
            fresh_host_key=self.host_keys_per_boot,
            workspace_in_memory=self.workspace_in_memory,
            no_python=image == MINIMAL_IMAGE,
        )

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["extra_images"] = list(self.extra_images)
        return data

    def updated(self, body: Mapping[str, Any]) -> Behaviour:
        """This behaviour with `body` applied: `preset` first (a base), then the knobs.

        Unknown knobs and wrongly typed values are refused: a typo must not pass silently.
        """
        base = self
        if "preset" in body:
            name = body["preset"]
            if name not in PRESETS:
                raise ApiError(
                    f"behaviour preset {name!r} is not one of {', '.join(sorted(PRESETS))}",
                    status=400,
                )
            base = PRESETS[name]
        known = {f.name: f for f in fields(Behaviour)}
        changes: dict[str, Any] = {}
        for key, value in body.items():
            if key == "preset":
                continue
            if key not in known:
                raise ApiError(f"unknown behaviour knob {key!r}", status=400)
            current = getattr(base, key)
            if isinstance(current, bool):
                if not isinstance(value, bool):
                    raise ApiError(f"behaviour knob {key} needs true or false", status=400)
            elif isinstance(current, float):
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ApiError(f"behaviour knob {key} needs seconds >= 0", status=400)
                value = float(value)
            elif isinstance(current, tuple):
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise ApiError(f"behaviour knob {key} needs a list of strings", status=400)
                value = tuple(value)
            changes[key] = value
        return replace(base, **changes)


@dataclass(frozen=True)
class BootOptions:
    """What one sandbox boot is given of the behaviour (the runtime's part)."""

    ssh_delay_s: float = 0.0
    key_delay_s: float = 0.0
    fresh_host_key: bool = False
    workspace_in_memory: bool = False
    #: the minimal image: no python3 on the sandbox's PATH (the agent keeps its own)
    no_python: bool = False


PRESETS: dict[str, Behaviour] = {
    "realistic": Behaviour(),
    "kind": Behaviour(
        delete_hold_s=0.0,
        retention_s=0.0,
        ssh_delay_s=0.0,
        key_delay_s=0.0,
        host_keys_per_boot=False,
        known_images_only=False,
        workspace_in_memory=False,
        gateway_timeout_s=0.0,
        tag_rules=False,
        wake_moves_start_count=False,
        autokill_counts_standby=False,
        suspend_woken_by_traffic=True,
    ),
}

DEFAULT_PRESET = "realistic"


def from_env(environ: Mapping[str, str]) -> Behaviour:
    """The behaviour `UKC_LOCAL_BEHAVIOUR` names: a preset, or a JSON object with an optional
    `preset` and knob overrides; unset, the default preset."""
    raw = environ.get(ENV_VAR, "").strip()
    if not raw:
        return PRESETS[DEFAULT_PRESET]
    if raw in PRESETS:
        return PRESETS[raw]
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ApiError(
            f"{ENV_VAR} must be {' or '.join(sorted(PRESETS))} or a JSON object of knobs",
            status=400,
        )
    return PRESETS[DEFAULT_PRESET].updated(body)
