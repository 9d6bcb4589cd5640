"""The gateway's errors, and their one mapping to OpenAI's error JSON.

    GatewayError                  answered to the client as {"error": {...}}
    ├── InvalidRequest            400 invalid_request_error (bad JSON, missing fields)
    ├── Unauthorized              401 (gateway API key missing or wrong)
    ├── ModelNotFound             404 model_not_found, param "model"
    ├── PayloadTooLarge           413
    ├── RateLimited               429 with Retry-After (gateway-side limits)
    ├── UpstreamRejected          the upstream's 400/413/422, relayed: the request is wrong
    └── AllProvidersFailed        429 / 504 / 502 once every chain entry has failed
                                  (400 when no entry could serve this kind of request)

    UpstreamError                 one failed attempt at one provider (never shown raw);
                                  `reason` is a `reasons.Reason`, which carries its policy

Upstream errors stay inside the chain engine: it records them as attempts and
only a GatewayError ever reaches the client, rendered in one place (`render.py`) in
the caller's API shape, every string redacted.
"""

from __future__ import annotations

import msgspec

from .reasons import Reason


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


_encode = msgspec.json.Encoder().encode


class GatewayError(Exception):
    status = 500
    type = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = headers or {}

    def body(self) -> bytes:
        return error_json(self.message, self.type, self.param, self.code)


def error_json(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> bytes:
    return _encode(ErrorEnvelope(ErrorBody(message, type_, param, code)))


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class UpstreamRejected(GatewayError):
    """The upstream said the request itself is wrong (400/413/422): no fallback.

    `attempts` are the chain's attempts up to and including the rejecting one."""

    type = "invalid_request_error"

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None,
        code: str | None,
        attempts: list[Attempt] | None = None,
    ) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status
        self.attempts = attempts or []  # the rejecting attempt is the last


class UpstreamError(Exception):
    """One attempt at one provider failed. `reason` says why (a `Reason`, or its value)."""

    def __init__(
        self,
        reason: Reason | str,
        message: str,
        status: int | None = None,
        retry_after: float | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = Reason.of(reason)
        self.message = message
        self.status = status
        self.retry_after = retry_after
        # For client errors relayed verbatim (UpstreamRejected): the upstream's error fields.
        self.param = param
        self.code = code

    def __str__(self) -> str:
        status = f" {self.status}" if self.status else ""
        return f"{self.reason}{status}: {self.message}"


class Attempt(msgspec.Struct):
    """What one chain entry did, kept in order for headers, logs and the final error."""

    provider: str
    model: str
    reason: Reason
    status: int | None = None
    latency_ms: float = 0.0
    message: str = ""


EXCERPT = 200  # characters of an upstream's own message in the all-failed error


def excerpt(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= EXCERPT else text[: EXCERPT - 3] + "..."


class AllProvidersFailed(GatewayError):
    """Every entry of the chain failed; `attempts` keeps each provider's error in order."""

    def __init__(
        self,
        alias: str,
        attempts: list[Attempt],
        retry_after: float | None,
        largest_window: int | None = None,
    ) -> None:
        self.attempts = attempts
        reasons = [a.reason for a in attempts]
        headers: dict[str, str] = {}
        if attempts and all(r == Reason.UNSUPPORTED for r in reasons):
            self.status, self.type, code = 400, "invalid_request_error", "unsupported_request"
        elif attempts and all(r == Reason.CONTEXT_TOO_LONG for r in reasons):
            self.status, self.type, code = 400, "invalid_request_error", "context_length_exceeded"
        elif attempts and all(r in (Reason.RATE_LIMITED, Reason.COOLING_DOWN) for r in reasons):
            self.status, self.type, code = 429, "rate_limit_error", "rate_limit_exceeded"
            headers["retry-after"] = str(max(1, round(retry_after or 1)))
        elif attempts and reasons[-1] in (Reason.TIMEOUT, Reason.DEADLINE):
            self.status, self.type, code = 504, "timeout_error", "upstream_timeout"
        else:
            self.status, self.type, code = 502, "server_error", "all_providers_failed"
        if code == "context_length_exceeded" and largest_window is not None:
            message = (
                f"No provider for model '{alias}' can fit this request: the largest context "
                f"window in its chain is {largest_window} tokens; "
            ) + "; ".join(f"{a.provider}: {excerpt(a.message)}" for a in attempts)
        elif self.status == 400:
            message = f"No provider for model '{alias}' can serve this request: " + "; ".join(
                f"{a.provider}: {excerpt(a.message)}" for a in attempts
            )
        else:
            message = f"All providers for model '{alias}' failed: " + (
                "; ".join(_describe(a) for a in attempts) or "no entry could be tried"
            )
        super().__init__(message, code=code, headers=headers)


def _describe(a: Attempt) -> str:
    text = f"{a.provider} ({a.model}): {a.reason}" + (f" {a.status}" if a.status else "")
    return text + (f" - {excerpt(a.message)}" if a.message else "")
