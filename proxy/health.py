"""Health per deployment (provider + upstream model) and per provider (the host).

Each has a circuit breaker after Envoy's outlier detection:

    closed --N consecutive hard failures--> open (ejected for base * 2**(ejections-1), capped)
    open   --cooldown over-->               half-open: exactly one probe request goes through
    half-open --probe succeeds-->           closed (ejection count decays)
    half-open --probe fails-->              open again, for longer

A failure's reason says which level it is about (`Reason.scope`): refused connections,
DNS, TLS and bad credentials are the host's; 5xx, timeouts after connecting, bad
answers and missing models are one model's. A 429 (or a 503 with Retry-After) is no hard
failure: it cools that deployment for as long as it asked. An entry is skipped while
either its deployment or its provider is open or cooling.

A stream's verdict comes when it ends (`started` at its first chunk only marks the host
reachable and keeps the time to first token): a failure after the first chunk counts
against the deployment like any other, so one that always dies mid-answer is ejected.

Failures of attempts admitted before an ejection count toward that ejection only
(`epoch`): twenty requests timing out together eject once, not twenty times.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import msgspec

from .config import BreakerSpec
from .errors import UpstreamError
from .reasons import Reason, Scope

Clock = Callable[[], float]


class LastError(msgspec.Struct):
    reason: str
    status: int | None
    message: str
    at: float


class Latency(msgspec.Struct):
    p50: float | None
    p95: float | None


class HealthSnapshot(msgspec.Struct):
    state: str
    consecutive_failures: int
    ejections: int
    circuit_open_remaining_s: float
    cooldown_remaining_s: float
    latency_ms: Latency
    ttft_ms: Latency
    requests: int
    successes: int
    errors: int
    last_error: LastError | None


class Health:
    """One breaker; every method is O(1) and safe to call on each request."""

    __slots__ = (
        "spec", "failures", "ejections", "open_until", "cool_until", "probing", "epoch",
        "last_error", "latencies", "ttfts", "requests", "successes", "errors", "clock",
    )  # fmt: skip

    def __init__(self, spec: BreakerSpec, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.failures = 0  # consecutive hard failures
        self.ejections = 0
        self.epoch = 0  # +1 at each ejection
        self.open_until = 0.0
        self.cool_until = 0.0
        self.probing = False
        self.last_error: LastError | None = None
        self.latencies: deque[float] = deque(maxlen=512)
        self.ttfts: deque[float] = deque(maxlen=512)
        self.requests = self.successes = self.errors = 0

    @property
    def state(self) -> str:
        if self.open_until == 0.0:
            return "closed"
        return "open" if self.clock() < self.open_until else "half_open"

    def blocked(self) -> tuple[Reason, float] | None:
        """Why this may not be tried now, without taking a probe slot."""
        if not self.cool_until and not self.open_until:
            return None  # never cooled nor ejected: the common case, no clock read
        now = self.clock()
        if now < self.cool_until:
            return Reason.COOLING_DOWN, self.cool_until - now
        if self.open_until and (now < self.open_until or self.probing):
            return Reason.CIRCUIT_OPEN, max(1.0, self.open_until - now)
        return None

    def admit(self) -> tuple[Reason, float] | None:
        """None to go ahead (taking the probe slot when half-open); else (reason, wait)."""
        verdict = self.blocked()
        if verdict is None and self.open_until:
            self.probing = True
        return verdict

    def success(self, latency_ms: float | None, ttft_ms: float | None = None) -> None:
        self.requests += 1
        self.successes += 1
        if latency_ms is not None:
            self.latencies.append(latency_ms)
        if ttft_ms is not None:
            self.ttfts.append(ttft_ms)
        self.failures = 0
        if self.open_until:
            self.open_until = 0.0
            self.ejections = max(0, self.ejections - 1)
        self.probing = False

    def failure(self, error: UpstreamError, epoch: int | None = None) -> None:
        now = self.clock()
        self.requests += 1
        self.errors += 1
        self.last_error = LastError(error.reason, error.status, error.message[:300], time.time())
        asked = error.retry_after is not None and (
            error.reason is Reason.RATE_LIMITED or error.status == 503
        )
        if asked:
            wait = min(error.retry_after or 0.0, self.spec.max_cooldown)
            self.cool_until = max(self.cool_until, now + wait)
        elif error.reason is Reason.RATE_LIMITED:
            self.cool_until = max(self.cool_until, now + self.spec.rate_limit_cooldown)
        if asked or not error.reason.hard:
            self.probing = False
            return
        if epoch is not None and epoch != self.epoch and not self.probing:
            return  # admitted before the last ejection: that ejection already counted it
        self.failures += 1
        if self.probing or self.failures >= self.spec.failures:
            self.eject(now)
        self.probing = False

    def eject(self, now: float) -> None:
        self.ejections += 1
        self.epoch += 1
        cooldown = self.spec.cooldown * 2 ** (self.ejections - 1)
        self.open_until = now + min(cooldown, self.spec.max_cooldown)
        self.failures = 0

    def cool(self, seconds: float) -> None:
        """Skip this for `seconds` (a Retry-After seen elsewhere, e.g. by another instance)."""
        self.cool_until = max(self.cool_until, self.clock() + seconds)

    def abandon(self) -> None:
        """The attempt ended without a verdict (the client left): free the probe slot."""
        self.probing = False

    def snapshot(self) -> HealthSnapshot:
        now = self.clock()
        return HealthSnapshot(
            state=self.state,
            consecutive_failures=self.failures,
            ejections=self.ejections,
            circuit_open_remaining_s=round(max(0.0, self.open_until - now), 3),
            cooldown_remaining_s=round(max(0.0, self.cool_until - now), 3),
            latency_ms=_window(self.latencies),
            ttft_ms=_window(self.ttfts),
            requests=self.requests,
            successes=self.successes,
            errors=self.errors,
            last_error=self.last_error,
        )


def _window(values: deque[float]) -> Latency:
    if not values:
        return Latency(None, None)
    ordered = sorted(values)
    n = len(ordered)
    return Latency(round(ordered[int(0.5 * n)], 1), round(ordered[min(n - 1, int(0.95 * n))], 1))


class Ticket(msgspec.Struct):
    """An admitted attempt: the epochs it was admitted in (see module doc)."""

    provider_epoch: int
    deployment_epoch: int


class ProviderHealth:
    """A provider's host-level breaker and one breaker per deployment (upstream model)."""

    def __init__(self, spec: BreakerSpec, clock: Clock = time.monotonic) -> None:
        self.spec = spec
        self.clock = clock
        self.host = Health(spec, clock)
        self.deployments: dict[str, Health] = {}
        self.reachable: bool | None = None  # as last seen (a request or a health probe)

    def deployment(self, model: str) -> Health:
        health = self.deployments.get(model)
        if health is None:  # models come from the config: the dict stays bounded
            health = self.deployments[model] = Health(self.spec, self.clock)
        return health

    def admit(self, model: str) -> Ticket | tuple[Reason, float]:
        deployment = self.deployment(model)
        verdict = self.host.blocked() or deployment.blocked()
        if verdict is not None:
            return verdict
        self.host.admit()
        deployment.admit()
        return Ticket(self.host.epoch, deployment.epoch)

    def success(self, model: str, latency_ms: float | None, ttft_ms: float | None = None) -> None:
        self.reachable = True
        self.host.success(latency_ms, ttft_ms)
        self.deployment(model).success(latency_ms, ttft_ms)

    def started(self, model: str, ttft_ms: float) -> None:
        """A stream's first chunk came: the host answers; the verdict waits for its end."""
        self.reachable = True
        self.host.ttfts.append(ttft_ms)
        self.deployment(model).ttfts.append(ttft_ms)

    def failure(self, model: str, error: UpstreamError, ticket: Ticket | None = None) -> None:
        deployment = self.deployment(model)
        if error.reason in (Reason.CONNECT_ERROR, Reason.CONNECT_TIMEOUT):
            self.reachable = False
        elif error.status is not None:  # it answered, if only with an error status
            self.reachable = True
        if error.reason.scope is Scope.PROVIDER:
            self.host.failure(error, ticket.provider_epoch if ticket else None)
            deployment.abandon()
        else:
            deployment.failure(error, ticket.deployment_epoch if ticket else None)
            self.host.abandon()
            self.host.last_error = deployment.last_error

    def abandon(self, model: str) -> None:
        self.host.abandon()
        self.deployment(model).abandon()

    def available(self) -> bool:
        """Can serve now: not ejected, and not unreachable when last seen."""
        return self.host.blocked() is None and self.reachable is not False
