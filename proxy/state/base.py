"""What every state store answers: one call before the upstream call, one after.

    before(key_id, rpm, tpm, health_ids, cache_key) -> Before
        admitted or not (and for how long not), the limits' standing for the
        `x-ratelimit-*` headers, the cooldowns other instances published for the
        chain's deployments and providers, and the cached answer if there is one.
    after(Outcome)   (not awaited: written with other requests' in one batch)
        the tokens to charge, usage and spend per key and alias, health events to
        publish, the answer to cache.

Health ids: a deployment is "provider/model", a provider is "provider".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from ..ratelimit import Quota, headers, retry_after


class Cooldown(msgspec.Struct, frozen=True):
    """A deployment or provider another instance saw fail: skip it for `seconds`."""

    reason: str  # cooling_down (asked to wait by Retry-After) | circuit_open
    seconds: float


class Before(msgspec.Struct, kw_only=True):
    admitted: bool = True
    retry_after: float = 0.0  # seconds, when not admitted
    requests: Quota | None = None
    tokens: Quota | None = None
    cooling: dict[str, Cooldown] = {}
    cached: bytes | None = None
    degraded: bool = False  # answered from this process's state: Redis is unreachable

    def headers(self) -> dict[str, str]:
        """`x-ratelimit-*` (and `retry-after` when refused), as OpenAI sends them."""
        out = headers(self.requests, self.tokens)
        if not self.admitted:
            out["retry-after"] = retry_after(self.retry_after)
        return out


class HealthEvent(msgspec.Struct, frozen=True):
    """Publish that `id` is to be skipped for `seconds` (0: it recovered, clear it)."""

    id: str
    reason: str
    seconds: float


class CachePut(msgspec.Struct, frozen=True):
    key: str  # from cache.cache_key(): "<alias>/<hash>"
    body: bytes  # the non-stream answer (chat.completion JSON, usage included)
    ttl: float
    max_entries: int


class Outcome(msgspec.Struct, kw_only=True):
    """One finished request, for `after()`."""

    key_id: str
    alias: str
    tpm: int | None = None  # the key's token limit: charge it
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False  # answered from the cache: no tokens charged, no cost
    health: Sequence[HealthEvent] = ()
    cache_put: CachePut | None = None


class Totals(msgspec.Struct, kw_only=True):
    requests: int = 0
    cached: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


class StateStats(msgspec.Struct, kw_only=True):
    backend: str
    degraded: bool = False
    keys: dict[str, Totals] = {}
    aliases: dict[str, Totals] = {}


class StateStore(Protocol):
    backend: str

    @property
    def degraded(self) -> bool: ...

    async def before(
        self,
        key_id: str,
        *,
        rpm: int | None = None,
        tpm: int | None = None,
        health_ids: Sequence[str] = (),
        cache_key: str | None = None,
    ) -> Before: ...

    def after(self, outcome: Outcome) -> None:
        """Record a finished request; not awaited (the Redis store batches the writes)."""

    async def flush(self) -> None:
        """Wait until every `after()` so far is recorded."""

    async def stats(self) -> StateStats: ...

    async def aclose(self) -> None: ...


def counted(key_id: str) -> bool:
    """Usage is kept per configured key, not per anonymous client address."""
    return bool(key_id) and not key_id.startswith("addr:")
