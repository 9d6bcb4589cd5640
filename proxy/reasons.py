"""Why an attempt failed or was skipped: one vocabulary, each reason carrying its policy.

The values are what `x-omnimind-fallbacks`, logs, metrics and the audit log say.

    reason            falls back  counts against       retried on the same provider
    connect_error     yes         the provider         yes
    connect_timeout   yes         the provider         yes
    timeout           yes         the deployment       yes
    rate_limited      yes         cools the deployment no
    server_error      yes         the deployment       yes
    bad_response      yes         the deployment       yes
    stream_error      yes         the deployment       no   (failed after its first chunk)
    upstream_auth     yes         the provider         no
    payment_required  yes         the provider         no   (402: out of credits)
    model_missing     yes         the deployment       no
    not_served        yes         the deployment       no   (405, 410 and other 4xx)
    redirect          yes         the deployment       no   (3xx: never followed)
    context_too_long  yes         nothing              no
    unavailable       yes         nothing              no   (no api key, failed to load)
    unsupported       yes         nothing              no   (this provider cannot serve it)
    queue_full        yes         nothing              no
    circuit_open      yes         nothing              no   (skipped: breaker open)
    cooling_down      yes         nothing              no   (skipped: Retry-After runs)
    deadline          yes         nothing              no   (the request's deadline ran out)
    hedge_lost        yes         nothing              no   (another entry answered first)
    client_error      no          nothing              no   (400/413/422: wrong everywhere)

A deployment is one provider serving one upstream model; the provider is the host.
"""

from __future__ import annotations

import enum


class Scope(enum.Enum):
    NONE = 0
    DEPLOYMENT = 1
    PROVIDER = 2


class Reason(enum.StrEnum):
    scope: Scope
    retry_same: bool
    falls_back: bool

    def __new__(
        cls,
        value: str,
        scope: Scope = Scope.NONE,
        retry_same: bool = False,
        falls_back: bool = True,
    ) -> Reason:
        member = str.__new__(cls, value)
        member._value_ = value
        member.scope = scope
        member.retry_same = retry_same
        member.falls_back = falls_back
        return member

    CONNECT_ERROR = "connect_error", Scope.PROVIDER, True
    CONNECT_TIMEOUT = "connect_timeout", Scope.PROVIDER, True
    TIMEOUT = "timeout", Scope.DEPLOYMENT, True
    RATE_LIMITED = "rate_limited", Scope.NONE
    SERVER_ERROR = "server_error", Scope.DEPLOYMENT, True
    BAD_RESPONSE = "bad_response", Scope.DEPLOYMENT, True
    STREAM_ERROR = "stream_error", Scope.DEPLOYMENT
    UPSTREAM_AUTH = "upstream_auth", Scope.PROVIDER
    PAYMENT_REQUIRED = "payment_required", Scope.PROVIDER
    MODEL_MISSING = "model_missing", Scope.DEPLOYMENT
    NOT_SERVED = "not_served", Scope.DEPLOYMENT
    REDIRECT = "redirect", Scope.DEPLOYMENT
    CONTEXT_TOO_LONG = "context_too_long"
    UNAVAILABLE = "unavailable"
    UNSUPPORTED = "unsupported"
    QUEUE_FULL = "queue_full"
    CIRCUIT_OPEN = "circuit_open"
    COOLING_DOWN = "cooling_down"
    DEADLINE = "deadline"
    HEDGE_LOST = "hedge_lost"
    CLIENT_ERROR = "client_error", Scope.NONE, False, False

    @property
    def hard(self) -> bool:
        """A fault of the upstream that counts toward ejecting it."""
        return self.scope is not Scope.NONE

    @classmethod
    def of(cls, value: str | Reason) -> Reason:
        return value if isinstance(value, Reason) else cls(value)
