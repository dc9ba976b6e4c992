"""The local metro's instances by uuid, by name and by FQDN.

Requests name an instance by `{uuid}` or `{name}`; the TLS edge by the FQDN its client sent as
SNI and a public port, which `route` turns into the instance and the port inside its sandbox.
"""

from __future__ import annotations

from collections.abc import Iterable

from reconciler.local.state.records import (
    CODE_INVALID,
    CODE_NOT_FOUND,
    ItemError,
    LocalInstance,
)

__all__ = ["InstanceIndex"]


def _bad(message: str) -> ItemError:
    return ItemError(message, status=400, code=CODE_INVALID)


class InstanceIndex:
    """Every instance of one metro, and the sequence number of the last one created."""

    def __init__(self) -> None:
        self.records: dict[str, LocalInstance] = {}
        self._by_name: dict[str, str] = {}
        self._by_fqdn: dict[str, str] = {}
        self.last_seq = 0

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, uuid: object) -> bool:
        return uuid in self.records

    def next_seq(self) -> int:
        self.last_seq += 1
        return self.last_seq

    def add(self, rec: LocalInstance) -> None:
        self.records[rec.uuid] = rec
        self._by_name[rec.name] = rec.uuid
        if rec.fqdn:
            self._by_fqdn[rec.fqdn] = rec.uuid
        self.last_seq = max(self.last_seq, rec.seq)

    def remove(self, rec: LocalInstance) -> None:
        self.records.pop(rec.uuid, None)
        self._by_name.pop(rec.name, None)
        if rec.fqdn:
            self._by_fqdn.pop(rec.fqdn, None)

    def name_taken(self, name: str) -> bool:
        return name in self._by_name

    def lookup(self, ref: object) -> LocalInstance:
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

    def select(self, tags: Iterable[str]) -> list[LocalInstance]:
        """Every instance carrying all of `tags` (all instances when none is given)."""
        wanted = [t for t in tags if t]
        recs = list(self.records.values())
        if wanted:
            recs = [r for r in recs if all(t in r.tags for t in wanted)]
        return recs

    def by_fqdn(self, fqdn: str) -> LocalInstance | None:
        u = self._by_fqdn.get(fqdn.lower().rstrip("."))
        return self.records.get(u) if u else None

    def route(self, fqdn: str, public_port: int) -> tuple[LocalInstance, int] | None:
        """The instance behind `fqdn` and the destination port of its `public_port`."""
        rec = self.by_fqdn(fqdn)
        if rec is None:
            return None
        service = next((s for s in rec.services if s.port == public_port), None)
        return None if service is None else (rec, service.destination_port)

    def public_ports(self) -> set[int]:
        """Every public port some instance's service group declares."""
        return {s.port for r in self.records.values() for s in r.services}
