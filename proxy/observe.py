"""What the gateway saw: one `RequestRecord` per request, fed to three sinks in one place.

- Prometheus metrics (`metrics.py`).
- The seed's counters (`requests_total`, `requests_success`, `fallback_used`,
  `latency_by_provider`), for `GET /v1/stats` and the Python router.
- The audit log (`audit.py`): one JSON line per request, written off the event loop.
  Message content only with `server.log_content: true`; secrets never (the redactor).

Each sink is isolated: one failing (logged once, counted) never drops the others.
Token counts are clamped (`clamp_tokens`) before any sink sees them.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import msgspec

from .audit import AuditLog, audit_json
from .errors import Attempt
from .metrics import Metrics
from .redact import Redactor

log = logging.getLogger("omnimind.observe")

MAX_TOKENS = 100_000_000  # as accounting.py: an upstream's usage beyond this is not believed


def clamp_tokens(count: object) -> int | None:
    """A token count within 0..MAX_TOKENS (None if it is not a number at all); accounting
    clamps usage already, this keeps every sink safe whoever fills a record."""
    if type(count) is int and 0 <= count <= MAX_TOKENS:
        return count  # the usual case: one check
    if isinstance(count, bool) or not isinstance(count, int):
        return None
    return max(0, min(count, MAX_TOKENS))


class RequestRecord(msgspec.Struct):
    request_id: str
    alias: str
    stream: bool
    status: int = 200
    outcome: str = "ok"  # ok | client_error | failed | cancelled | stream_error
    provider: str = ""
    model: str = ""
    attempts: list[Attempt] = msgspec.field(default_factory=list)
    latency_ms: float = 0.0  # non-stream: whole answer; stream: first chunk
    duration_ms: float = 0.0
    queue_ms: float = 0.0  # waiting for providers' concurrency slots
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost_usd: float | None = None
    key_id: str = ""
    messages: Any = None  # only with log_content
    error: str = ""


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


class Observer:
    """Where every finished request goes; shared across config reloads."""

    def __init__(
        self,
        aliases: set[str] | None = None,
        log_content: bool = False,
        audit: str | bool | AuditLog = "off",
        redactor: Redactor | None = None,
    ) -> None:
        self.metrics = Metrics()
        self.stats = Stats()
        self.aliases = aliases or set()
        self.log_content = log_content
        self.audit = audit if isinstance(audit, AuditLog) else AuditLog(audit)
        self.redactor = redactor or Redactor([])
        self.dropped_before = 0  # by audit logs replaced on reloads
        self.metrics.dropped_lines = lambda: self.dropped_before + self.audit.dropped
        self._failed: set[str] = set()

    def replace_audit(self, audit: AuditLog) -> None:
        old, self.audit = self.audit, audit
        self.dropped_before += old.dropped
        old.close()

    def finished(self, rec: RequestRecord) -> None:
        rec.prompt_tokens = clamp_tokens(rec.prompt_tokens)
        rec.completion_tokens = clamp_tokens(rec.completion_tokens)
        if rec.cost_usd is not None and not 0 <= rec.cost_usd < 1e6:
            rec.cost_usd = None
        # Unknown aliases are client input: keep them out of metric label values.
        alias_label = rec.alias if rec.alias in self.aliases else "unknown"
        try:
            self.metrics.record(rec, alias_label)
        except Exception:  # noqa: BLE001 - each sink on its own
            self._sink_failed("metrics")
        try:
            self.stats.record(rec)
        except Exception:  # noqa: BLE001
            self._sink_failed("stats")
        if self.audit.enabled:
            try:
                self.audit.write(audit_json(rec, self.log_content, self.redactor))
            except Exception:  # noqa: BLE001
                self._sink_failed("audit")

    def _sink_failed(self, sink: str) -> None:
        if sink not in self._failed:  # once per sink: a broken sink must not flood the log
            self._failed.add(sink)
            log.exception("observer sink %s failed; later failures are only counted", sink)
        try:
            self.metrics.sink_failures.labels(sink).inc()
        except Exception:  # noqa: BLE001 - the metrics sink itself may be the broken one
            pass
