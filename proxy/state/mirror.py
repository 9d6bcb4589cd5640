"""Between this process's breakers and the shared store, for one request's chain.

Before the chain is walked, `absorb()` applies the cooldowns and open circuits that other
instances published (`Before.cooling`) to the local breakers, so the chain skips those
entries with its usual reasons; after the walk, `events()` says what this request changed
(a Retry-After cooldown, an ejection, a circuit closed again) for `Outcome.health`.

Ids: a deployment is "provider/model" (its breaker: `health.deployment(model)`), a
provider is "provider" (its host breaker: `health.host`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

from .base import Cooldown, HealthEvent

CIRCUIT_OPEN = "circuit_open"
COOLING_DOWN = "cooling_down"


class Breaker(Protocol):
    cool_until: float
    open_until: float
    clock: Callable[[], float]


class Breakers(Protocol):
    """A provider's breakers: its host's, and one per deployment (`health.ProviderHealth`)."""

    @property
    def host(self) -> Breaker: ...

    def deployment(self, model: str) -> Breaker: ...


def health_ids(entries: Iterable[tuple[str, str]]) -> list[str]:
    """The ids to ask `before()` about for a chain of (provider, model) entries."""
    ids: dict[str, None] = {}
    for provider, model in entries:
        ids[f"{provider}/{model}"] = None
        ids[provider] = None
    return list(ids)


class Mirror:
    __slots__ = ("_pairs", "_seen")
    _seen: list[tuple[float, float]]

    def __init__(self, breakers: Mapping[str, Breakers], entries: Iterable[tuple[str, str]]):
        pairs: dict[str, Breaker] = {}
        self._pairs, self._seen = pairs, []
        if not entries:
            return
        for provider, model in entries:
            held = breakers.get(provider)
            if held is not None:
                pairs[f"{provider}/{model}"] = held.deployment(model)
                pairs[provider] = held.host
        self._seen = [(b.cool_until, b.open_until) for b in pairs.values()]

    @property
    def ids(self) -> list[str]:
        return list(self._pairs)

    def absorb(self, cooling: Mapping[str, Cooldown]) -> None:
        for id_, cooldown in cooling.items():
            breaker = self._pairs.get(id_)
            if breaker is None:
                continue
            until = breaker.clock() + cooldown.seconds
            if cooldown.reason == CIRCUIT_OPEN:
                breaker.open_until = max(breaker.open_until, until)
            else:
                breaker.cool_until = max(breaker.cool_until, until)
        self._seen = [(b.cool_until, b.open_until) for b in self._pairs.values()]

    def events(self) -> list[HealthEvent]:
        out = []
        for (id_, b), (cool, opened) in zip(self._pairs.items(), self._seen, strict=True):
            now = b.clock()
            if b.cool_until > cool and b.cool_until > now:
                out.append(HealthEvent(id_, COOLING_DOWN, b.cool_until - now))
            if b.open_until > opened and b.open_until > now:
                out.append(HealthEvent(id_, CIRCUIT_OPEN, b.open_until - now))
            elif opened and not b.open_until:
                out.append(HealthEvent(id_, "closed", 0.0))
        return out
