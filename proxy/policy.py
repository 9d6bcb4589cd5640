"""Upstream answers and exceptions as reasons: one status table, one exception table.

The policy of each reason (falls back? counts against health? retried?) lives on the
reason itself (`reasons.Reason`); here is only how an upstream's status, body and
transport errors become one.
"""

from __future__ import annotations

import asyncio
import email.utils
import re
import time
from collections.abc import Mapping

from . import upstream
from .errors import InvalidRequest, UpstreamError
from .reasons import Reason

_CLIENT_STATUSES = frozenset({400, 413, 422})
_STATUS_REASONS = {
    401: Reason.UPSTREAM_AUTH,
    402: Reason.PAYMENT_REQUIRED,
    403: Reason.UPSTREAM_AUTH,
    404: Reason.MODEL_MISSING,
    408: Reason.SERVER_ERROR,
    409: Reason.SERVER_ERROR,
    429: Reason.RATE_LIMITED,
}
MAX_RETRY_AFTER = 300.0
CLIENT_ERROR = Reason.CLIENT_ERROR
_CONTEXT_CODES = frozenset(
    {"context_length_exceeded", "context_too_long", "string_above_max_length"}
)
_CONTEXT_WORDS = re.compile(
    r"context[ _-]?(length|window|size)|maximum context|prompt is too long|too many tokens"
    r"|exceeds? the (model'?s? )?(max|limit|context)|input is too long|n_ctx",
    re.IGNORECASE,
)


def status_reason(status: int, message: str = "", code: str | None = None) -> Reason:
    """A non-200 upstream status as a reason. Only `client_error` stops the chain."""
    if status in _CLIENT_STATUSES:
        if status == 400 and (code in _CONTEXT_CODES or _CONTEXT_WORDS.search(message or "")):
            return Reason.CONTEXT_TOO_LONG
        return Reason.CLIENT_ERROR
    if 300 <= status < 400:
        return Reason.REDIRECT
    if status >= 500:
        return Reason.SERVER_ERROR
    if 400 <= status < 500:
        return _STATUS_REASONS.get(status, Reason.NOT_SERVED)
    return Reason.BAD_RESPONSE


def status_error(
    status: int,
    message: str,
    headers: Mapping[str, str],
    param: str | None = None,
    code: str | None = None,
) -> UpstreamError:
    """The one way an upstream's non-200 answer becomes an attempt's error."""
    reason = status_reason(status, message, code)
    if reason is Reason.REDIRECT:
        message = f"redirected to {headers.get('location', '?')!r} (redirects are not followed)"
    error = UpstreamError(reason, message or f"HTTP {status}", status, retry_after(headers))
    if reason is Reason.CLIENT_ERROR:  # relayed to the client as it is (redacted)
        error.param, error.code = param, code
    return error


# Transport exceptions -> reason, most specific first (like httpx's map_httpcore_exceptions).
_EXCEPTION_REASONS: tuple[tuple[type[BaseException], Reason], ...] = (
    (upstream.ConnectTimeout, Reason.CONNECT_TIMEOUT),
    (TimeoutError, Reason.TIMEOUT),  # upstream.ReadTimeout, and the chain's own deadlines
    (upstream.ProtocolError, Reason.BAD_RESPONSE),  # PayloadError too: cut mid-answer
    (ConnectionError, Reason.CONNECT_ERROR),  # upstream.ConnectError, Disconnected
    (OSError, Reason.CONNECT_ERROR),
)


def map_exception(exc: BaseException) -> UpstreamError:
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, InvalidRequest):  # an adapter found the request itself wrong
        return UpstreamError(Reason.CLIENT_ERROR, exc.message, 400, param=exc.param, code=exc.code)
    for exc_type, reason in _EXCEPTION_REASONS:
        if isinstance(exc, exc_type):
            return UpstreamError(reason, _describe(exc))
    return UpstreamError(Reason.BAD_RESPONSE, _describe(exc))


def client_error(message: str, param: str | None = None) -> UpstreamError:
    """The client's request is wrong (found while translating it): a 400, never a fallback."""
    return UpstreamError(Reason.CLIENT_ERROR, message, 400, param=param)


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
