"""In-process state: this worker's own limits, cooldowns, usage and cache, all bounded.

The default backend, and the Redis backend's local fallback while Redis is unreachable.
Buckets and cache entries live in LRU maps of fixed size; cooldowns expire on their own.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from .. import ratelimit
from ..ratelimit import Bucket
from .base import Before, CachePut, Cooldown, Outcome, StateStats, Totals, counted

K = TypeVar("K")
V = TypeVar("V")


class LRU(Generic[K, V]):
    """A dict of at most `size` items; the least recently used goes first."""

    __slots__ = ("_items", "size")

    def __init__(self, size: int) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self.size = size

    def get(self, key: K) -> V | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: K, value: V, size: int | None = None) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        limit = size or self.size
        while len(self._items) > limit:
            self._items.popitem(last=False)

    def pop(self, key: K) -> None:
        self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


class MemoryStore:
    backend = "memory"
    degraded = False

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        max_buckets: int = 100_000,
        max_cache_bytes: int = 64 << 20,
    ) -> None:
        self.clock = clock
        self._buckets: LRU[tuple[str, str], Bucket] = LRU(max_buckets)
        self._cooling: LRU[str, tuple[str, float]] = LRU(10_000)  # id -> (reason, until)
        # alias -> key -> (expires, body): each alias's entries bounded by its max_entries,
        # all of them together by max_cache_bytes
        self._cache: dict[str, OrderedDict[str, tuple[float, bytes]]] = {}
        self._cache_bytes = 0
        self.max_cache_bytes = max_cache_bytes
        self._keys: dict[str, Totals] = {}
        self._aliases: dict[str, Totals] = {}

    def _bucket(self, key_id: str, kind: str, limit: int, now: float) -> Bucket:
        bucket = self._buckets.get((key_id, kind))
        if bucket is None:
            bucket = ratelimit.full(limit, now)
            self._buckets.put((key_id, kind), bucket)
        return bucket

    async def before(
        self,
        key_id: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        health_ids: Sequence[str] = (),
        cache_key: str | None = None,
    ) -> Before:
        return self.before_now(key_id, rpm, tpm, health_ids, cache_key)

    def before_now(
        self,
        key_id: str,
        rpm: int | None,
        tpm: int | None,
        health_ids: Sequence[str] = (),
        cache_key: str | None = None,
    ) -> Before:
        now = self.clock()
        answer = Before()
        wait = 0.0
        requests = tokens = None
        if rpm:
            requests = self._bucket(key_id, "r", rpm, now)
            wait = ratelimit.wait_for(rpm, requests.refill(rpm, now))
        if tpm:
            tokens = self._bucket(key_id, "t", tpm, now)
            wait = max(wait, ratelimit.wait_for(tpm, tokens.refill(tpm, now)))
        if wait:
            answer.admitted, answer.retry_after = False, wait
        elif requests is not None:
            requests.level -= 1
        if rpm and requests is not None:
            answer.requests = ratelimit.quota(rpm, requests.level)
        if tpm and tokens is not None:
            answer.tokens = ratelimit.quota(tpm, tokens.level)
        cooling = {}
        for id_ in health_ids:
            mark = self._cooling.get(id_)
            if mark is not None and mark[1] > now:
                cooling[id_] = Cooldown(mark[0], mark[1] - now)
        answer.cooling = cooling
        if cache_key and answer.admitted:
            answer.cached = self._cache_get(cache_key, now)
        return answer

    def _cache_get(self, key: str, now: float) -> bytes | None:
        entries = self._cache.get(key.rpartition("/")[0])
        entry = entries.get(key) if entries is not None else None
        if entry is None or entries is None:
            return None
        if entry[0] <= now:
            self._cache_bytes -= len(entries.pop(key)[1])
            return None
        entries.move_to_end(key)
        return entry[1]

    def _cache_put(self, put: CachePut, now: float) -> None:
        entries = self._cache.setdefault(put.key.rpartition("/")[0], OrderedDict())
        old = entries.pop(put.key, None)
        if old is not None:
            self._cache_bytes -= len(old[1])
        entries[put.key] = (now + put.ttl, put.body)
        self._cache_bytes += len(put.body)
        while len(entries) > put.max_entries:
            self._cache_bytes -= len(entries.popitem(last=False)[1][1])
        while self._cache_bytes > self.max_cache_bytes:
            victim = entries if len(entries) > 1 else max(self._cache.values(), key=len)
            self._cache_bytes -= len(victim.popitem(last=False)[1][1])

    def after(self, o: Outcome) -> None:
        now = self.clock()
        tokens = o.prompt_tokens + o.completion_tokens
        if o.tpm and tokens and not o.cached:
            ratelimit.charge(self._bucket(o.key_id, "t", o.tpm, now), o.tpm, tokens, now)
        if o.alias:
            _add(self._aliases.setdefault(o.alias, Totals()), o)
        if counted(o.key_id):
            _add(self._keys.setdefault(o.key_id, Totals()), o)
        for event in o.health:
            if event.seconds <= 0:
                self._cooling.pop(event.id)
                continue
            mark = self._cooling.get(event.id)
            until = now + event.seconds
            if mark is None or mark[1] < until:
                self._cooling.put(event.id, (event.reason, until))
        if o.cache_put is not None:
            self._cache_put(o.cache_put, now)

    async def stats(self) -> StateStats:
        return StateStats(
            backend=self.backend,
            keys={k: _copy(v) for k, v in self._keys.items()},
            aliases={k: _copy(v) for k, v in self._aliases.items()},
        )

    async def flush(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


def _add(totals: Totals, o: Outcome) -> None:
    totals.requests += 1
    if o.cached:
        totals.cached += 1
        return
    totals.prompt_tokens += o.prompt_tokens
    totals.completion_tokens += o.completion_tokens
    totals.cost_usd += o.cost_usd


def _copy(t: Totals) -> Totals:
    return Totals(
        requests=t.requests, cached=t.cached, prompt_tokens=t.prompt_tokens,
        completion_tokens=t.completion_tokens, cost_usd=round(t.cost_usd, 8),
    )  # fmt: skip
