"""Per-provider concurrency: at most `limit` calls at once, a bounded queue behind them."""

from __future__ import annotations

import asyncio

from .errors import UpstreamError


class Gate:
    """`await acquire()` / `release()`; a full queue is the fallback reason `queue_full`."""

    __slots__ = ("_sem", "_max_queue", "waiting", "limit")

    def __init__(self, limit: int | None, max_queue: int) -> None:
        self.limit = limit
        self._sem = asyncio.Semaphore(limit) if limit else None
        self._max_queue = max_queue
        self.waiting = 0

    def try_acquire(self) -> bool:
        """Take a free slot now if there is one (no waiting, so no timer to arm)."""
        sem = self._sem
        if sem is None:
            return True
        if sem.locked():
            return False
        sem._value -= 1  # noqa: SLF001 - what Semaphore.acquire does when it is not locked
        return True

    async def acquire(self) -> None:
        sem = self._sem
        if sem is None:
            return
        if sem.locked() and self.waiting >= self._max_queue:
            raise UpstreamError(
                "queue_full", f"{self.limit} requests running and {self.waiting} queued"
            )
        self.waiting += 1
        try:
            await sem.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        if self._sem is not None:
            self._sem.release()

    @property
    def in_use(self) -> int:
        if self._sem is None or self.limit is None:
            return 0
        return self.limit - self._sem._value  # noqa: SLF001 - asyncio keeps no public count
