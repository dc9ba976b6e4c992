"""The account's quota as `GET /v1/users/quotas` answers it, read tolerantly.

A cloud answer is untrusted and may lack any field or carry another type: every figure is a
whole number >= 0 or None (not said), never an error. `Quota.room` is what is left of one
figure; None when the platform did not say both how much is used and the hard limit.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["Quota", "QuotaLimits", "QuotaStats"]


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class QuotaStats(BaseModel):
    """`used` or `hard`: counts of the account's resources."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    instances: int | None = None
    live_instances: int | None = None
    live_vcpus: int | None = None
    live_memory_mb: int | None = None
    service_groups: int | None = None
    services: int | None = None
    volumes: int | None = None
    total_volume_mb: int | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> int | None:
        return _count(value)


class QuotaLimits(BaseModel):
    """The bounds of one resource (memory of one instance, size of one volume)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    min_memory_mb: int | None = None
    max_memory_mb: int | None = None
    min_volume_mb: int | None = None
    max_volume_mb: int | None = None
    min_vcpus: int | None = None
    max_vcpus: int | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _whole(cls, value: Any) -> int | None:
        return _count(value)


def _stats(value: Any) -> Any:
    return value if isinstance(value, dict) else {}


class Quota(BaseModel):
    """One item of `data.quotas`."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    used: QuotaStats = Field(default_factory=QuotaStats)
    hard: QuotaStats = Field(default_factory=QuotaStats)
    limits: QuotaLimits = Field(default_factory=QuotaLimits)

    @field_validator("used", "hard", "limits", mode="before")
    @classmethod
    def _object(cls, value: Any) -> Any:
        return _stats(value)

    def room(self, figure: str) -> int | None:
        """How much of `figure` (a `QuotaStats` field) is left; None when not said."""
        used: int | None = getattr(self.used, figure)
        hard: int | None = getattr(self.hard, figure)
        if used is None or hard is None:
            return None
        return max(hard - used, 0)
