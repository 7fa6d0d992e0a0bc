"""Stable front-door ports for the publisher and the table: allocated on first publish,
persisted, released when the service is gone for good (deleted, or no longer ours)."""

from __future__ import annotations

import asyncio
from typing import Callable, Iterable

import structlog

from metal_agent.adapters.port_book_file import PortBookFile, free_port
from metal_agent.core.stable_ports import PortBook

log = structlog.get_logger(__name__)


class StablePorts:
    def __init__(self, store: PortBookFile, host: Callable[[], str]) -> None:
        """`host()`: the registered address the front door listens on (a free port is found there)."""
        self.store = store
        self.host = host
        self.book = PortBook()
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """At start-up, before any publish: the ports of the previous agent's services."""
        self.book = self.store.load()

    def port(self, key: str) -> int | None:
        return self.book.port(key)

    def keys(self) -> list[str]:
        return sorted(self.book.ports)

    async def ensure(self, key: str) -> int:
        """The key's port, allocating and persisting one the first time."""
        if (port := self.book.port(key)) is not None:
            return port
        async with self._lock:
            if (port := self.book.port(key)) is not None:
                return port
            port = await asyncio.to_thread(free_port, self.host(), self.book.taken())
            book = self.book.assign(key, port)
            await asyncio.to_thread(self.store.save, book)
            self.book = book
            log.info("stable front-door port allocated", service=key, port=port)
            return port

    async def release(self, keys: Iterable[str]) -> None:
        async with self._lock:
            book = self.book.release(keys)
            if book is self.book:
                return
            await asyncio.to_thread(self.store.save, book)
            for key in set(self.book.ports) - set(book.ports):
                log.info("stable front-door port released", service=key, port=self.book.port(key))
            self.book = book
