"""`omnimind_state_degraded`: 1 while the shared state is unreachable and this process
serves on its own (see redis_store.py), 0 otherwise."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge


def degraded_gauge(registry: CollectorRegistry) -> Callable[[bool], None]:
    """Register the gauge (once per registry) and return its setter, for `Guard.watch()`."""
    gauge = Gauge(
        "omnimind_state_degraded",
        "1 while the shared state (Redis) is unreachable: limits, health and cache are local",
        registry=registry, multiprocess_mode="liveall",
    )  # fmt: skip
    gauge.set(0)

    def set_degraded(degraded: bool) -> None:
        gauge.set(1 if degraded else 0)

    return set_degraded
