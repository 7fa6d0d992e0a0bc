"""Stable front-door ports: one per service key, kept across agent restarts.

A client (or the cluster's EndpointSlice) that knows a service's port must
keep reaching it while the engine behind it moves ports on every respawn, so
each key gets a port once and keeps it until the service is gone for good.
This module only decides; finding a free port and the file belong to
`adapters.port_book_file`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

_KEY = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
BOOK_VERSION = 1


class BadBook(ValueError):
    """A persisted book that is not one: start afresh rather than trust it."""


@dataclass(frozen=True)
class PortBook:
    """key -> port; immutable, each change returns a new book."""

    ports: Mapping[str, int] = field(default_factory=dict)

    def port(self, key: str) -> int | None:
        return self.ports.get(key)

    def taken(self) -> frozenset[int]:
        return frozenset(self.ports.values())

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The keys that need a port, in a stable order."""
        return sorted(k for k in set(keys) if k not in self.ports)

    def assign(self, key: str, port: int) -> PortBook:
        """`key` keeps `port`. A port held by another key is refused: two services on one
        port would route one's requests to the other."""
        if not _KEY.match(key):
            raise ValueError(f"not a namespace/name key: {key[:80]!r}")
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} out of range")
        if self.ports.get(key) == port:
            return self
        if port in self.taken():
            raise ValueError(f"port {port} is already held by another service")
        return PortBook({**self.ports, key: port})

    def release(self, keys: Iterable[str]) -> PortBook:
        gone = set(keys) & set(self.ports)
        if not gone:
            return self
        return PortBook({k: p for k, p in self.ports.items() if k not in gone})

    def keep_only(self, alive: Iterable[str]) -> PortBook:
        """Release every key not in `alive` (services deleted for good)."""
        return self.release(set(self.ports) - set(alive))

    def to_json(self) -> dict:
        return {"version": BOOK_VERSION, "ports": dict(sorted(self.ports.items()))}

    @classmethod
    def from_json(cls, data: object) -> PortBook:
        """Validates everything: the file is in the state dir, but a bad one must not route
        a service to another's port."""
        if not isinstance(data, dict) or data.get("version") != BOOK_VERSION or not isinstance(data.get("ports"), dict):
            raise BadBook("not a port book of version 1")
        book = cls()
        for key, port in data["ports"].items():
            if not isinstance(key, str) or not isinstance(port, int) or isinstance(port, bool):
                raise BadBook(f"bad entry {str(key)[:80]!r}")
            try:
                book = book.assign(key, port)
            except ValueError as err:
                raise BadBook(str(err)) from None
        return book
