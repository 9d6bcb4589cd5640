"""Per-provider health: circuit breaker, Retry-After cooling, recent latency.

The breaker follows Envoy's outlier detection:

    closed --N consecutive hard failures--> open (ejected for base * 2**(ejections-1), capped)
    open   --cooldown over-->               half-open: exactly one probe request goes through
    half-open --probe succeeds-->           closed (ejection count decays)
    half-open --probe fails-->              open again, for longer

Rate limits are not hard failures: a 429 (or a 503 carrying Retry-After) cools the
provider for as long as it asked, and later requests skip it without calling it.
Client errors (400/413/422) say nothing about the provider's health.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from .config import BreakerSpec
from .errors import UpstreamError
from .policy import CLIENT_ERROR

_NOT_HARD = frozenset(
    {CLIENT_ERROR, "rate_limited", "cooling_down", "circuit_open", "queue_full", "unsupported"}
)


@dataclass(slots=True)
class LastError:
    reason: str
    status: int | None
    message: str
    at: float


class Health:
    """One provider's state; every method is O(1) and safe to call on each request."""

    __slots__ = (
        "spec", "failures", "ejections", "open_until", "cool_until", "probing",
        "last_error", "latencies", "requests", "successes", "errors", "clock",
    )  # fmt: skip

    def __init__(self, spec: BreakerSpec, clock: Any = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.failures = 0  # consecutive hard failures
        self.ejections = 0
        self.open_until = 0.0
        self.cool_until = 0.0
        self.probing = False
        self.last_error: LastError | None = None
        self.latencies: deque[float] = deque(maxlen=512)
        self.requests = self.successes = self.errors = 0

    @property
    def state(self) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "open" if self.clock() < self.open_until else "half_open"

    def admit(self) -> tuple[str, float] | None:
        """None to go ahead; else (reason, seconds until it may be tried again)."""
        now = self.clock()
        if now < self.cool_until:
            return "cooling_down", self.cool_until - now
        if self.open_until:
            if now < self.open_until:
                return "circuit_open", self.open_until - now
            if self.probing:  # half-open: one probe at a time
                return "circuit_open", 1.0
            self.probing = True
        return None

    def success(self, latency_ms: float) -> None:
        self.requests += 1
        self.successes += 1
        self.latencies.append(latency_ms)
        self.failures = 0
        if self.open_until:
            self.open_until = 0.0
            self.ejections = max(0, self.ejections - 1)
        self.probing = False

    def failure(self, error: UpstreamError) -> None:
        now = self.clock()
        self.requests += 1
        self.errors += 1
        self.last_error = LastError(error.reason, error.status, error.message[:300], time.time())
        # Asked to wait (429, or 503 with Retry-After): cool for that long, not a hard failure.
        asked = error.retry_after is not None and (
            error.reason == "rate_limited" or error.status == 503
        )
        if asked:
            wait = min(error.retry_after or 0.0, self.spec.max_cooldown)
            self.cool_until = max(self.cool_until, now + wait)
        elif error.reason == "rate_limited":
            self.cool_until = max(self.cool_until, now + self.spec.rate_limit_cooldown)
        if asked or error.reason in _NOT_HARD:
            self.probing = False
            return
        self.failures += 1
        if self.probing or self.failures >= self.spec.failures:
            self.ejections += 1
            cooldown = self.spec.cooldown * 2 ** (self.ejections - 1)
            self.open_until = now + min(cooldown, self.spec.max_cooldown)
            self.failures = 0
        self.probing = False

    def abandon(self) -> None:
        """The attempt ended without a verdict (the client left): free the probe slot."""
        self.probing = False

    def percentile(self, q: float) -> float | None:
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        last = self.last_error
        return {
            "state": self.state,
            "consecutive_failures": self.failures,
            "ejections": self.ejections,
            "circuit_open_remaining_s": round(max(0.0, self.open_until - now), 3),
            "cooldown_remaining_s": round(max(0.0, self.cool_until - now), 3),
            "latency_ms": {"p50": self.percentile(0.5), "p95": self.percentile(0.95)},
            "requests": self.requests,
            "successes": self.successes,
            "errors": self.errors,
            "last_error": None
            if last is None
            else {"reason": last.reason, "status": last.status, "message": last.message,
                  "at": round(last.at, 3)},
        }  # fmt: skip
