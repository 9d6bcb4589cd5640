"""What is retryable: the fallback decision as pure functions, and one table for transport errors.

Reasons (the fixed vocabulary of `x-omnimind-fallbacks`, logs and metrics):

    connect_error   refused, reset, DNS, TLS: the provider is not there
    timeout         connect, attempt or first-token timeout
    rate_limited    429
    server_error    5xx, 408, 409
    upstream_auth   401/403 from the upstream: our credential is wrong there
    model_missing   404 from the upstream: the model is not there
    bad_response    200 whose body or first chunk is not valid JSON / not the protocol
    unavailable     provider not usable (no api key, failed to load)
    unsupported     this provider cannot serve this request (a remote image URL for
                    Ollama, n > 1 locally): the next may; not a fault of the provider
    queue_full      a local provider's bounded queue is full
    circuit_open    skipped by the circuit breaker
    cooling_down    skipped while a Retry-After from the provider runs
    deadline        the request's overall deadline ran out
    client_error    400/413/422: the request is wrong everywhere, never retried
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Mapping

import aiohttp

from .errors import InvalidRequest, UpstreamError

CLIENT_ERROR = "client_error"
_CLIENT_STATUSES = frozenset({400, 413, 422})
_STATUS_REASONS = {
    401: "upstream_auth",
    403: "upstream_auth",
    404: "model_missing",
    408: "server_error",
    409: "server_error",
    429: "rate_limited",
}
MAX_RETRY_AFTER = 300.0


def status_reason(status: int) -> str:
    """Map a non-200 upstream status to a reason. Only `client_error` stops the chain."""
    if status in _CLIENT_STATUSES:
        return CLIENT_ERROR
    if status >= 500:
        return "server_error"
    return _STATUS_REASONS.get(status, CLIENT_ERROR if 400 <= status < 500 else "bad_response")


def falls_back(error: UpstreamError) -> bool:
    """The one fallback decision: everything but a client error moves down the chain."""
    return error.reason != CLIENT_ERROR


# Transport exceptions -> reason, most specific first (like httpx's map_httpcore_exceptions).
_EXCEPTION_REASONS: tuple[tuple[type[BaseException], str], ...] = (
    (TimeoutError, "timeout"),  # also asyncio.TimeoutError and aiohttp's ServerTimeoutError
    (aiohttp.ClientConnectorError, "connect_error"),
    (aiohttp.ServerDisconnectedError, "connect_error"),
    (aiohttp.ClientPayloadError, "bad_response"),
    (aiohttp.ClientResponseError, "bad_response"),
    (aiohttp.ClientError, "connect_error"),
    (ConnectionError, "connect_error"),
    (OSError, "connect_error"),
)


def map_exception(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, InvalidRequest):  # an adapter found the request itself wrong
        return UpstreamError(CLIENT_ERROR, exc.message, 400, param=exc.param, code=exc.code)
    for exc_type, reason in _EXCEPTION_REASONS:
        if isinstance(exc, exc_type):
            return UpstreamError(reason, _describe(exc))
    return UpstreamError("bad_response", _describe(exc))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    name = type(exc).__name__
    if isinstance(exc, asyncio.TimeoutError | TimeoutError) and not text:
        return "timed out"
    return f"{name}: {text}" if text else name


def retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or HTTP date), capped."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return _cap(float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return _cap(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return _cap(when - (time.time() if now is None else now))


def _cap(seconds: float) -> float:
    return max(0.0, min(seconds, MAX_RETRY_AFTER))
