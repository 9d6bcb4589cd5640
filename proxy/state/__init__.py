"""Gateway state shared by workers and instances: limits, health, usage, response cache.

`open_store(spec)` gives the configured backend: `MemoryStore` (in-process, the default)
or `RedisStore` (one Redis-protocol server shared by every worker and instance).
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import StateSpec
from .base import (
    Before,
    CachePut,
    Cooldown,
    HealthEvent,
    Outcome,
    StateStats,
    StateStore,
    Totals,
)
from .memory import MemoryStore

__all__ = [
    "Before",
    "CachePut",
    "Cooldown",
    "HealthEvent",
    "MemoryStore",
    "Outcome",
    "StateStats",
    "StateStore",
    "Totals",
    "open_store",
]


def open_store(spec: StateSpec, on_degraded: Callable[[bool], None] | None = None) -> StateStore:
    if spec.backend == "redis":
        from .redis_store import RedisStore  # redis-py only where it is used

        return RedisStore(spec, on_degraded=on_degraded)
    return MemoryStore()
