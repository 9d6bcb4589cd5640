"""One request's dealings with the state store, around its chain: a `Turn`.

    turn = await begin(guard, caller, alias, entries, breakers, cache, fields, op, headers)
        # one round trip: limits (429 raised here), cooldowns absorbed into the local
        # breakers, the cached answer if there is one
    if turn.cached is not None:   answer from it (turn.replay() for a stream); turn.hit()
    else:                         walk the chain; turn.done(usage, cost, body) or turn.failed()
    reply headers += turn.headers()   # x-ratelimit-*, x-omnimind-cache

`done`/`hit`/`failed` settle the turn once (one round trip, not awaited).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import cache as rcache
from ..auth import Admission, Caller, Guard
from ..config import CacheSpec
from .base import CachePut, Outcome
from .mirror import Breakers, Mirror

_HEADER = rcache.HEADER


class Turn:
    __slots__ = ("guard", "admission", "mirror", "alias", "cache", "key", "keep", "settled")

    def __init__(
        self,
        guard: Guard,
        admission: Admission,
        mirror: Mirror,
        alias: str,
        cache: CacheSpec | None,
        keep: bool,
    ) -> None:
        self.guard = guard
        self.admission = admission
        self.mirror = mirror
        self.alias = alias
        self.cache = cache
        self.key = admission.cache_key
        self.keep = keep  # the answer may be stored (no `Cache-Control: no-store`)
        self.settled = False

    @property
    def cached(self) -> bytes | None:
        return self.admission.cached

    def headers(self) -> dict[str, str]:
        if self.cache is None:
            return self.admission.headers
        headers = dict(self.admission.headers)
        if self.cache is not None:
            headers[_HEADER] = "hit" if self.admission.cached is not None else "miss"
        return headers

    def replay(self, include_usage: bool) -> list[bytes]:
        """The cached answer as `chat.completion.chunk` payloads."""
        assert self.admission.cached is not None
        return rcache.replay(self.admission.cached, include_usage)

    def assembler(self) -> rcache.Assembler | None:
        """For a streamed miss that may be cached: feed it the payloads, pass it to done()."""
        return rcache.Assembler() if self.key is not None and self.keep else None

    def hit(self) -> None:
        self._settle(Outcome(key_id="", alias=self.alias, cached=True))

    def failed(self) -> None:
        self._settle(Outcome(key_id="", alias=self.alias, health=self.mirror.events()))

    def done(
        self,
        usage: Any,
        cost_usd: float | None,
        body: bytes | rcache.Assembler | None = None,
    ) -> None:
        """The chain answered. `usage`: anything with prompt_tokens/completion_tokens."""
        put = None
        if self.key is not None and self.keep and self.cache is not None:
            if isinstance(body, rcache.Assembler):
                body = body.body()
            if body and len(body) <= rcache.MAX_ENTRY_BYTES:
                put = CachePut(self.key, body, self.cache.ttl, self.cache.max_entries)
        self._settle(
            Outcome(
                key_id="",
                alias=self.alias,
                prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                cost_usd=cost_usd or 0.0,
                health=self.mirror.events(),
                cache_put=put,
            )
        )

    def _settle(self, outcome: Outcome) -> None:
        if not self.settled:
            self.settled = True
            self.guard.settle(self.admission, outcome)


async def begin(
    guard: Guard,
    caller: Caller,
    alias: str,
    entries: Iterable[tuple[str, str]],
    breakers: Mapping[str, Breakers],
    cache: CacheSpec | None,
    fields: Mapping[str, Any],
    op: str,
    cache_control: str | None,
    limits: bool = True,
) -> Turn:
    """Admit a request for `alias`'s chain (`entries`: (provider, model) pairs)."""
    if nothing_to_ask(guard, caller, cache, limits):
        return plain(guard, caller, alias)
    local = guard.store.backend == "memory"
    # In-process state has nothing to add to this process's own breakers.
    mirror = Mirror(breakers, () if local else entries)
    key = None
    if cache is not None and not rcache.bypass(cache_control):
        key = rcache.cache_key(alias, fields, op)
    admission = await guard.admit(caller, health_ids=mirror.ids, cache_key=key, limits=limits)
    mirror.absorb(admission.cooling)
    if cache is not None and key is None:
        admission.cache_key = None
    keep = rcache.storable(cache_control)
    if cache is not None and rcache.bypass(cache_control) and keep:
        # no-cache: a fresh answer, which then replaces the stored one
        admission.cache_key = rcache.cache_key(alias, fields, op)
    return Turn(guard, admission, mirror, alias, cache, keep)


def nothing_to_ask(guard: Guard, caller: Caller, cache: CacheSpec | None, limits: bool) -> bool:
    """True when `begin` needs no round trip: in-process state, no cache, no limits to check
    (`plain` is then the turn, at no cost)."""
    return (
        cache is None
        and not (limits and (caller.rpm or caller.tpm))
        and guard.store.backend == "memory"
    )


def plain(guard: Guard, caller: Caller, alias: str) -> Turn:
    return Turn(guard, Admission(caller), _NO_MIRROR, alias, None, False)


_NO_MIRROR = Mirror({}, ())


def pairs(entries: Sequence[Any]) -> list[tuple[str, str]]:
    """(provider, model) of chain entries."""
    return [(e.provider, e.model) for e in entries]
