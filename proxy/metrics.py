"""Prometheus metrics (`omnimind_*`), in a registry of our own, updated from records.

Under several workers (`serve --workers N`) prometheus_client's multiprocess mode
aggregates them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

if TYPE_CHECKING:
    from .observe import RequestRecord

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STATES = {"closed": 0, "half_open": 1, "open": 2}


class Metrics:
    """The Prometheus side: counters and histograms updated from records."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._rows: dict[tuple[str, str, str, str], tuple[Any, ...]] = {}
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "omnimind_requests", "Requests by alias, answering provider and outcome",
            ["alias", "provider", "outcome"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "omnimind_request_duration_seconds", "Whole request duration by provider",
            ["provider"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft = Histogram(
            "omnimind_time_to_first_token_seconds", "Streams: time to the first chunk",
            ["provider"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.fallbacks = Counter(
            "omnimind_fallbacks", "Failed or skipped attempts that moved down the chain",
            ["alias", "provider", "model", "reason"], registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "omnimind_tokens", "Tokens by provider, model and kind (prompt/completion)",
            ["provider", "model", "kind"], registry=r,
        )  # fmt: skip
        self.cost = Counter(
            "omnimind_cost_usd", "Cost in USD by provider and model", ["provider", "model"],
            registry=r,
        )  # fmt: skip
        self.available = Gauge(
            "omnimind_provider_available", "1 if the provider can be tried now", ["provider"],
            registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.circuit = Gauge(
            "omnimind_provider_circuit_state", "Breaker: 0 closed, 1 half-open, 2 open",
            ["provider"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.deployment_circuit = Gauge(
            "omnimind_deployment_circuit_state",
            "Breaker of one provider's model: 0 closed, 1 half-open, 2 open",
            ["provider", "model"], registry=r, multiprocess_mode="liveall",
        )  # fmt: skip
        self.audit_dropped = Gauge(
            "omnimind_audit_dropped_lines", "Audit lines dropped: the writer fell behind",
            registry=r, multiprocess_mode="livesum",
        )  # fmt: skip
        self.sink_failures = Counter(
            "omnimind_observer_sink_failures", "Records a sink (metrics/stats/audit) failed on",
            ["sink"], registry=r,
        )  # fmt: skip
        self.dropped_lines: Callable[[], int] = lambda: 0

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(...)`, cached: label lookup is most of a metric update's cost."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, rec: RequestRecord, alias_label: str) -> None:
        provider = rec.provider or "none"
        key = (alias_label, provider, rec.outcome, rec.model)
        row = self._rows.get(key)
        if row is None:
            row = self._rows[key] = self._row(*key)
        requests, duration, prompt, completion = row
        requests.inc()
        for a in rec.attempts:
            self._child(self.fallbacks, alias_label, a.provider, a.model, a.reason).inc()
        if rec.provider:
            duration.observe(rec.duration_ms / 1000)
            if rec.stream:
                self._child(self.ttft, provider).observe(rec.latency_ms / 1000)
            if rec.prompt_tokens is not None:
                prompt.inc(rec.prompt_tokens)
            if rec.completion_tokens is not None:
                completion.inc(rec.completion_tokens)
            if rec.cost_usd:
                self._child(self.cost, provider, rec.model).inc(rec.cost_usd)

    def _row(self, alias: str, provider: str, outcome: str, model: str) -> tuple[Any, ...]:
        """The children every record of one kind updates, looked up once for all of them
        (a record without a provider updates only the first)."""
        requests = self._child(self.requests, alias, provider, outcome)
        if provider == "none":
            return requests, None, None, None
        return (
            requests,
            self._child(self.duration, provider),
            self._child(self.tokens, provider, model, "prompt"),
            self._child(self.tokens, provider, model, "completion"),
        )

    def exposition(self, health: dict[str, Any]) -> bytes:
        """`health`: provider id -> its status (`available`, `state`)."""
        self.audit_dropped.set(self.dropped_lines())
        for name, h in health.items():
            self.available.labels(name).set(1 if h.available else 0)
            self.circuit.labels(name).set(_STATES.get(h.state, 0))
            for model, d in getattr(h, "deployments", {}).items():
                self.deployment_circuit.labels(name, model).set(_STATES.get(d.state, 0))
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)
