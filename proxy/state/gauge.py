"""The state in /metrics: `omnimind_state_degraded` (1 while the shared state is
unreachable and this process serves on its own, see redis_store.py) and, with a shared
store, the usage and spend of every instance (`omnimind_shared_*`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.core import GaugeMetricFamily

from .base import StateStats, Totals


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


class _Usage:
    """A one-scrape collector: the shared totals as gauges (the same on every instance,
    so aggregate them with max(), not sum())."""

    def __init__(self, stats: StateStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        for field in Totals.__struct_fields__:
            family = GaugeMetricFamily(
                f"omnimind_shared_{field}",
                f"{field.replace('_', ' ').capitalize()} by key and alias, across every "
                "instance sharing the state",
                labels=["scope", "name"],
            )
            for scope, table in (("key", self.stats.keys), ("alias", self.stats.aliases)):
                for name, totals in table.items():
                    family.add_metric([scope, name], float(getattr(totals, field)))
            yield family


def usage_exposition(stats: StateStats) -> bytes:
    """Prometheus text for the shared usage and spend (appended to /metrics)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Usage(stats))
    return generate_latest(registry)
