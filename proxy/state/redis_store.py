"""Shared state in a Redis-protocol server (Redis, Valkey): every instance sees the same.

One script call before the upstream call; after it, the outcome joins a batch that goes
out a couple of milliseconds later, with those of the other requests that finished
meanwhile, as one script call (`batch.py`, `scripts.py`). Every call is bounded by
`timeout_ms`. When Redis fails or is slow the store turns *degraded*: it logs once,
answers from its local `MemoryStore` (health and cache fail open; limits stay per process
with `on_error: open`, refuse with `on_error: closed`) and never touches Redis on the hot
path again until a background task, backing off, finds it back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

from ..config import StateSpec
from ..ratelimit import quota
from .base import Before, Cooldown, Outcome, StateStats, Totals
from .batch import after_args
from .memory import MemoryStore
from .resp import Client, ReplyError, Script
from .scripts import AFTER, BEFORE

log = logging.getLogger("omnimind.state")

_EXPECTED = (ReplyError, OSError, TimeoutError)  # ConnectionError is an OSError
# Anything else (a bug, a server that answers oddly) degrades the same way, logged in full:
# a request never fails or waits because of the shared state.
_FAILURES = (Exception,)
_STEADY_S = 30.0  # back for this long: an outage after it starts the backoff afresh
_TOTALS = tuple(Totals.__struct_fields__)


def where(url: str) -> str:
    """The URL without its credentials, for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


class RedisStore:
    backend = "redis"

    def __init__(
        self,
        spec: StateSpec,
        local: MemoryStore | None = None,
        on_degraded: Callable[[bool], None] | None = None,
    ) -> None:
        self.spec = spec
        self.prefix = spec.prefix
        self.timeout = spec.timeout_ms / 1000
        self.local = local or MemoryStore()
        self.client = Client(spec.url, connect_timeout=self.timeout)
        self._before = Script(BEFORE)
        self._after = Script(AFTER)
        self._degraded = False
        self.on_degraded = on_degraded
        self._rejoin: asyncio.Task[None] | None = None
        self._pause = 0.05  # the reconnect backoff, kept across outages close together
        self._back_at = float("-inf")
        self._queue: list[Outcome] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self.flush_delay = 0.002  # seconds an outcome waits for others to share its write
        self._asks: list[tuple[list[Any], asyncio.Future[Any]]] = []
        self._asking: set[asyncio.Task[None]] = set()

    @property
    def degraded(self) -> bool:
        return self._degraded

    async def before(
        self,
        key_id: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        health_ids: Sequence[str] = (),
        cache_key: str | None = None,
    ) -> Before:
        if not self._degraded:
            loop = asyncio.get_running_loop()
            ask: list[Any] = [key_id, rpm or 0, tpm or 0, cache_key or "", len(health_ids)]
            ask += health_ids
            future = loop.create_future()
            self._asks.append((ask, future))
            if len(self._asks) == 1:
                loop.call_soon(self._send_asks)
            try:
                return _parse_before(await future, rpm, tpm)
            except _FAILURES as exc:
                self._fail(exc)
        answer = self.local.before_now(key_id, rpm, tpm, health_ids, cache_key)
        answer.degraded = True
        if self.spec.on_error == "closed" and (rpm or tpm):
            answer.admitted, answer.retry_after, answer.cached = False, 1.0, None
        return answer

    def _send_asks(self) -> None:
        """Everyone who asked in this turn of the event loop: one script call."""
        asks, self._asks = self._asks, []
        task = asyncio.ensure_future(self._ask(asks))
        self._asking.add(task)
        task.add_done_callback(self._asking.discard)

    async def _ask(self, asks: list[tuple[list[Any], asyncio.Future[Any]]]) -> None:
        args: list[Any] = [self.prefix, len(asks)]
        for ask, _ in asks:
            args += ask
        try:
            async with asyncio.timeout(self.timeout):
                replies = await self.client.run(self._before, args)
            for (_, future), reply in zip(asks, replies, strict=True):
                if not future.done():
                    future.set_result(reply)
        except _FAILURES as exc:
            for _, future in asks:  # every asker hears back, whatever went wrong
                if not future.done():
                    future.set_exception(exc)

    def after(self, outcome: Outcome) -> None:
        if self._degraded:
            self.local.after(outcome)
            return
        self._queue.append(outcome)
        if self._timer is None and self._flushing is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self.flush_delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._flushing is None:
            self._flushing = asyncio.ensure_future(self._flush())

    async def _flush(self) -> None:
        try:
            while self._queue and not self._degraded:
                batch, self._queue = self._queue, []
                try:
                    async with asyncio.timeout(self.timeout):
                        await self.client.run(self._after, after_args(self.prefix, batch))
                except _FAILURES as exc:
                    self._fail(exc)
                    self._queue[:0] = batch
        finally:
            self._flushing = None
            if self._degraded:  # what could not be written counts here, locally
                batch, self._queue = self._queue, []
                for outcome in batch:
                    self.local.after(outcome)

    async def flush(self) -> None:
        """Wait until every outcome so far is written (or, Redis failing, kept locally)."""
        if self._timer is not None:
            self._timer.cancel()
            self._start_flush()
        while self._flushing is not None:
            await asyncio.shield(self._flushing)

    async def stats(self) -> StateStats:
        if not self._degraded:
            try:
                async with asyncio.timeout(self.timeout * 4):
                    return await self._shared_stats()
            except _FAILURES as exc:
                self._fail(exc)
        stats = await self.local.stats()
        stats.backend, stats.degraded = self.backend, True
        return stats

    async def _shared_stats(self) -> StateStats:
        p, call = self.prefix, self.client.call
        keys, aliases = await asyncio.gather(
            call("SMEMBERS", f"{p}:uk"), call("SMEMBERS", f"{p}:ua")
        )
        names = [(f"{p}:u:k:", k.decode()) for k in keys]
        names += [(f"{p}:u:a:", a.decode()) for a in aliases]
        rows = await asyncio.gather(*(call("HMGET", head + name, *_TOTALS) for head, name in names))
        out = StateStats(backend=self.backend, keys={}, aliases={})
        for (head, name), row in zip(names, rows, strict=True):
            totals = Totals(**{f: _number(v, f) for f, v in zip(_TOTALS, row, strict=True)})
            (out.keys if head.endswith(":k:") else out.aliases)[name] = totals
        return out

    def _fail(self, exc: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        if time.monotonic() - self._back_at > _STEADY_S:
            self._pause = 0.05
        self.client.drop()  # after a timeout its replies may still come: start afresh
        log.error(
            "shared state at %s unreachable (%s: %s): serving on this process's own state "
            "(rate limits %s) until it is back",
            where(self.spec.url), type(exc).__name__, exc or "timed out",
            "per process" if self.spec.on_error == "open" else "refuse requests",
            exc_info=None if isinstance(exc, _EXPECTED) else exc,
        )  # fmt: skip
        if self.on_degraded is not None:
            self.on_degraded(True)
        if self._rejoin is None or self._rejoin.done():
            self._rejoin = asyncio.ensure_future(self._reconnect())

    async def _reconnect(self) -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(self._pause)
            self._pause = min(self._pause * 2, 2.0)
            try:
                async with asyncio.timeout(max(self.timeout, 0.25)):
                    await self.client.call("PING")
            except _FAILURES:
                continue
            self._degraded = False
            self._back_at = time.monotonic()
            log.warning(
                "shared state at %s is back after %.1f s: limits, health and cache shared again",
                where(self.spec.url), time.monotonic() - started,
            )  # fmt: skip
            if self.on_degraded is not None:
                self.on_degraded(False)
            return

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                return bool(await self.client.call("PING"))
        except _FAILURES:
            return False

    async def aclose(self) -> None:
        if self._rejoin is not None:
            self._rejoin.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rejoin
        await self.flush()
        await self.client.aclose()


def _parse_before(raw: list[Any], rpm: int | None, tpm: int | None) -> Before:
    cooling = {}
    for i in range(5, len(raw) - 2, 3):
        cooling[raw[i].decode()] = Cooldown(raw[i + 1].decode(), raw[i + 2] / 1000)
    admitted = raw[0] == 1
    return Before(
        admitted=admitted,
        retry_after=0.0 if admitted else raw[1] / 1000,
        requests=quota(rpm, raw[2] / 1000) if rpm else None,
        tokens=quota(tpm, raw[3] / 1000) if tpm else None,
        cooling=cooling,
        cached=raw[4] or None,
    )


def _number(value: bytes | None, field: str) -> Any:
    if value is None:
        return 0.0 if field == "cost_usd" else 0
    return round(float(value), 8) if field == "cost_usd" else int(value)
