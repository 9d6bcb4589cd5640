"""What the gateway saw: one `RequestRecord` per request, fed to three sinks in one place.

- Prometheus metrics (`omnimind_*`), in a registry of our own; under several workers
  (`serve --workers N`) prometheus_client's multiprocess mode aggregates them.
- The seed's counters (`requests_total`, `requests_success`, `fallback_used`,
  `latency_by_provider`), for `GET /v1/stats` and the Python router.
- The audit log: one JSON line per request (`server.audit_log`: stdout, stderr, a file
  path, or off), batched and written once per 50 ms, so a request never pays for a write.
  Message content only with `server.log_content: true`; secrets never (none reach a record).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess as prom_multiprocess

from .errors import Attempt

log = logging.getLogger("omnimind.observe")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    alias: str
    stream: bool
    status: int = 200
    outcome: str = "ok"  # ok | client_error | failed | cancelled | stream_error
    provider: str = ""
    model: str = ""
    attempts: list[Attempt] = field(default_factory=list)
    latency_ms: float = 0.0  # non-stream: whole answer; stream: first chunk
    duration_ms: float = 0.0
    queue_ms: float = 0.0  # waiting for providers' concurrency slots
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    key_id: str = ""
    messages: Any = None  # only with log_content
    error: str = ""


class _AuditLine(msgspec.Struct, omit_defaults=True):
    ts: float
    request_id: str
    alias: str
    stream: bool
    status: int
    outcome: str
    attempts: list[dict[str, Any]]
    duration_ms: float
    queue_ms: float = 0.0
    provider: str | None = None
    model: str | None = None
    latency_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    key_id: str | None = None
    error: str | None = None
    messages: Any = None


_encode = msgspec.json.Encoder().encode


class Metrics:
    """The Prometheus side: counters and histograms updated from records."""

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
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
            ["alias", "provider", "reason"], registry=r,
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

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(...)`, cached: label lookup is most of a metric update's cost."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def record(self, rec: RequestRecord, alias_label: str) -> None:
        provider = rec.provider or "none"
        self._child(self.requests, alias_label, provider, rec.outcome).inc()
        for a in rec.attempts:
            self._child(self.fallbacks, alias_label, a.provider, a.reason).inc()
        if rec.provider:
            self._child(self.duration, provider).observe(rec.duration_ms / 1000)
            if rec.stream:
                self._child(self.ttft, provider).observe(rec.latency_ms / 1000)
            if rec.prompt_tokens is not None:
                self._child(self.tokens, provider, rec.model, "prompt").inc(rec.prompt_tokens)
            if rec.completion_tokens is not None:
                self._child(self.tokens, provider, rec.model, "completion").inc(
                    rec.completion_tokens
                )
            if rec.cost_usd:
                self._child(self.cost, provider, rec.model).inc(rec.cost_usd)

    def exposition(self, health: dict[str, Any]) -> bytes:
        """`health`: provider id -> its status (`available`, `state`)."""
        for name, h in health.items():
            self.available.labels(name).set(1 if h.available else 0)
            self.circuit.labels(name).set(_STATES.get(h.state, 0))
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            prom_multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


class Stats:
    """The seed's counters, per process."""

    def __init__(self) -> None:
        self.requests_total = 0
        self.requests_success = 0
        self.fallback_used = 0
        self._latency: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])

    def record(self, rec: RequestRecord) -> None:
        self.requests_total += 1
        if rec.outcome == "ok":
            self.requests_success += 1
            if rec.attempts:
                self.fallback_used += 1
            total = self._latency[rec.provider]
            total[0] += rec.latency_ms
            total[1] += 1

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests_total": self.requests_total,
            "requests_success": self.requests_success,
            "fallback_used": self.fallback_used,
            "latency_by_provider": {
                p: round(total / count, 1) for p, (total, count) in self._latency.items()
            },
        }


class AuditLog:
    """JSON lines, batched: a request appends its line; a timer writes them all at once."""

    FLUSH_AFTER = 0.05

    def __init__(self, target: str | bool) -> None:
        if isinstance(target, bool):
            target = "stdout" if target else "off"
        self.target = target
        self._lines: list[bytes] = []
        self._pending = False
        if target in ("off", ""):
            self._file = None
        elif target in ("stdout", "stderr"):
            self._file = getattr(sys, target).buffer
        else:
            self._file = open(target, "ab")  # noqa: SIM115 - closed in close()

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def write(self, line: bytes) -> None:
        if self._file is None:
            return
        self._lines.append(line)
        if not self._pending:
            self._pending = True
            try:
                asyncio.get_running_loop().call_later(self.FLUSH_AFTER, self.flush)
            except RuntimeError:  # no loop (the sync Python API): write now
                self.flush()

    def flush(self) -> None:
        self._pending = False
        lines, self._lines = self._lines, []
        if lines and self._file is not None:
            try:
                self._file.write(b"\n".join(lines) + b"\n")
                self._file.flush()
            except OSError as exc:
                log.error("audit log write failed (%d lines lost): %s", len(lines), exc)

    def close(self) -> None:
        self.flush()
        if self._file is not None and self.target not in ("stdout", "stderr"):
            self._file.close()
        self._file = None


class Observer:
    """Where every finished request goes; shared across config reloads."""

    def __init__(
        self,
        aliases: set[str] | None = None,
        log_content: bool = False,
        audit: str | bool = "off",
    ) -> None:
        self.metrics = Metrics()
        self.stats = Stats()
        self.aliases = aliases or set()
        self.log_content = log_content
        self.audit = AuditLog(audit)

    def finished(self, rec: RequestRecord) -> None:
        # Unknown aliases are client input: keep them out of metric label values.
        alias_label = rec.alias if rec.alias in self.aliases else "unknown"
        self.metrics.record(rec, alias_label)
        self.stats.record(rec)
        if self.audit.enabled:
            self.audit.write(_audit_json(rec, self.log_content))


def _audit_json(rec: RequestRecord, log_content: bool) -> bytes:
    line = _AuditLine(
        ts=round(time.time(), 3),
        request_id=rec.request_id,
        alias=rec.alias,
        stream=rec.stream,
        status=rec.status,
        outcome=rec.outcome,
        attempts=[
            {
                "provider": a.provider,
                "model": a.model,
                "reason": a.reason,
                "status": a.status,
                "latency_ms": round(a.latency_ms, 1),
            }
            for a in rec.attempts
        ],  # fmt: skip
        duration_ms=round(rec.duration_ms, 1),
        queue_ms=round(rec.queue_ms, 1),
        provider=rec.provider or None,
        model=rec.model or None,
        latency_ms=round(rec.latency_ms, 1) if rec.provider else None,
        prompt_tokens=rec.prompt_tokens,
        completion_tokens=rec.completion_tokens,
        cost_usd=rec.cost_usd,
        key_id=rec.key_id or None,
        error=rec.error or None,
        messages=rec.messages if log_content else None,
    )
    return _encode(line)


def cost_usd(
    prompt: int | None, completion: int | None, price_in: float | None, price_out: float | None
) -> float | None:
    """Cost from per-million-token prices; None when a needed price or count is missing."""
    if price_in is None and price_out is None:
        return None
    if prompt is None or completion is None:
        return None
    total = (prompt * (price_in or 0.0) + completion * (price_out or 0.0)) / 1_000_000
    return round(total, 8)
