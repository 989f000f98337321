"""At most N requests use the database at once; the others queue on the event loop.

Why: FastAPI runs sync dependencies and endpoints in a pool of 40 threads. Without these slots,
a burst of requests took every thread, each waiting for one of the few pooled connections, while
the requests that held a connection waited for a thread to run their endpoint: nothing moved
until SQLAlchemy's 30 s checkout timeout, and every request ended in a 500. With the slots
(`db_pool_size` of them, as many as the pool has connections) a request that holds a slot always
finds a connection, so no thread ever waits for the pool; the excess waits here, holding no
thread and no connection, for at most `db_queue_timeout_seconds`, and is then a 503 `busy`
with Retry-After.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio

from service.domain.errors import ServiceBusy


class DatabaseSlots:
    def __init__(self, slots: int, wait_seconds: float) -> None:
        self.slots = slots
        self.wait_seconds = wait_seconds
        self._semaphore: anyio.Semaphore | None = None

    def open(self) -> None:
        """A fresh semaphore on the running event loop (called by the app's lifespan)."""
        self._semaphore = anyio.Semaphore(self.slots)

    @property
    def in_use(self) -> int:
        return 0 if self._semaphore is None else self.slots - self._semaphore.value

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._semaphore is None:
            self.open()
        semaphore = self._semaphore
        assert semaphore is not None
        try:
            with anyio.fail_after(self.wait_seconds):
                await semaphore.acquire()
        except TimeoutError:
            raise ServiceBusy(
                f"All {self.slots} database slots stayed busy for {self.wait_seconds:g} s; "
                "retry after Retry-After."
            ) from None
        try:
            yield
        finally:
            semaphore.release()
