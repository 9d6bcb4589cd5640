"""Every error a client sees is rendered here, once, in the caller's API shape.

    OpenAI     {"error": {"message", "type", "param", "code"}}
    Anthropic  {"type": "error", "error": {"type", "message"}}

Every string that goes out is passed through the gateway's redaction first, so no
configured secret can leave in an error, whatever an upstream echoed back.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from .errors import AllProvidersFailed, GatewayError, error_json

Redact = Callable[[str], str]
_encode = msgspec.json.Encoder().encode


def error_headers(exc: GatewayError) -> dict[str, str]:
    headers = dict(exc.headers)
    if exc.status == 401:
        headers["www-authenticate"] = "Bearer"
    if isinstance(exc, AllProvidersFailed):
        headers["x-omnimind-attempts"] = str(len(exc.attempts))
        if exc.attempts:
            headers["x-omnimind-fallbacks"] = ",".join(
                f"{a.provider}:{a.reason}" for a in exc.attempts
            )
    return headers


class Dialect:
    """OpenAI's error shape (the default for every route)."""

    def render(self, exc: GatewayError, redact: Redact) -> tuple[int, dict[str, str], bytes]:
        param = redact(exc.param) if exc.param else exc.param
        code = redact(exc.code) if exc.code else exc.code
        body = error_json(redact(exc.message), exc.type, param, code)
        return exc.status, error_headers(exc), body

    def frame(self, exc: GatewayError, redact: Redact) -> bytes:
        """The final SSE event of a stream that failed after it started."""
        return b"data: %b\n\n" % self.render(exc, redact)[2]


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "invalid_request_error",
    504: "timeout_error",
    529: "overloaded_error",
}


class AnthropicDialect(Dialect):
    """Anthropic's error shape, with its statuses."""

    def render(self, exc: GatewayError, redact: Redact) -> tuple[int, dict[str, str], bytes]:
        status = exc.status
        kind = _ANTHROPIC_TYPES.get(status) or (
            "invalid_request_error" if status < 500 else "api_error"
        )
        body = {"type": "error", "error": {"type": kind, "message": redact(exc.message)}}
        return status, error_headers(exc), _encode(body)

    def frame(self, exc: GatewayError, redact: Redact) -> bytes:
        return b"event: error\ndata: %b\n\n" % self.render(exc, redact)[2]


class InternalError(GatewayError):
    code = "internal_error"


def internal_error() -> GatewayError:
    return InternalError("The gateway hit an internal error.")
